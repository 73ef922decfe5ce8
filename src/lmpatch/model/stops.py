"""Which generated tokens end a text continuation.

Greedy decoding that stops only at EOS treats every other token as text. That is wrong
for tokens that never occur inside text: control tokens (``<end_of_turn>``, ``<unused7>``)
and the media markers of models trained on interleaved image and text data. Gemma-3-270M
is such a model: unedited, it gives ``<start_of_image>`` a probability of about 0.1 after
a finished phrase ("Paris, France"), and once one is emitted it keeps emitting image
markers, since in training a picture (never a token) followed. A continuation therefore
ends at the first token that is EOS, a special token, or a media marker.

GGUF files record media markers as ordinary user-defined tokens (like HTML tags) and a
text-only config names no image ids, so the markers are also recognised by name.

Some protocols also end an answer at a piece of *text* ("." or a newline): an answer
usually ends inside a token ("Paris." or ".\n" are often one token), so those are found
in the decoded text, not among token ids. :class:`CompletionCriterion` ends each row of a
batched ``generate`` as soon as its own new text contains one (:func:`contains_any`) or,
more generally, passes a completion test (MQuAKE: "the answer line has ended"), saving
the remaining decoding steps; :func:`cut_at` removes the stop and what follows.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

# Multimodal markers that may sit in a text-only model's vocabulary (Gemma 3).
MEDIA_MARKERS = (
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>",
)
# Tokenizer attributes and config keys that multimodal checkpoints use to name them.
_MEDIA_TOKEN_ATTRS = ("boi_token", "eoi_token", "image_token", "boa_token", "eoa_token", "audio_token", "video_token")
_MEDIA_ID_KEYS = (
    "boi_token_index", "eoi_token_index", "image_token_index", "image_token_id",
    "boa_token_index", "eoa_token_index", "audio_token_index", "audio_token_id", "video_token_id",
)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config (an int or a list) and the tokenizer."""
    ids: set[int] = set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (cfg_eos, tokenizer.eos_token_id):
        ids.update(_as_ids(value))
    return ids


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id at which a greedy text continuation must end (see module doc)."""
    ids = eos_token_ids(model, tokenizer)
    ids.update(_special_ids(tokenizer))
    ids.update(_media_ids(model, tokenizer))
    vocab = _vocab_size(model)
    return frozenset(i for i in ids if vocab is None or 0 <= i < vocab)


def until_stop(ids: Iterable[int], stops: frozenset[int] | set[int]) -> list[int]:
    """The tokens before the first stop token (the stop itself is not text)."""
    out: list[int] = []
    for t in ids:
        if t in stops:
            break
        out.append(t)
    return out


def cut_at(text: str, stop_texts: Sequence[str]) -> str:
    """``text`` before the earliest occurrence of any of ``stop_texts`` (all of it if none occurs)."""
    found = [at for at in (text.find(s) for s in stop_texts if s) if at >= 0]
    return text[: min(found)] if found else text


class CompletionCriterion:
    """Ends each row of a batched greedy ``generate`` once ``complete(its new text)`` is true.

    It has the call signature of ``transformers.StoppingCriteria`` (the batch's ids so far
    -> one bool per row) without subclassing it, so importing this module does not import
    ``transformers.generation``. Each row is judged on its own tokens only: finished rows
    are padded by ``generate`` and never affect another row's greedy choices, so a row's
    output is the same whatever else is in its batch. ``ends[row]`` is the number of new
    tokens the row had when its text first was complete; the tokens after that are
    padding and the caller drops them.

    ``prompt_width`` is the padded prompt length (all rows are left-padded to it), and
    text after a stop token (``stop_ids``: EOS and the like) is not text, as in
    :func:`until_stop`.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, complete: Callable[[str], bool],
                 stop_ids: frozenset[int] | set[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.complete = complete
        self.stop_ids = stop_ids
        self.ends: dict[int, int] = {}
        self._ended_by_token: set[int] = set()

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = [self._check(row, new) for row, new in enumerate(input_ids[:, self.prompt_width :].tolist())]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _check(self, row: int, new: list[int]) -> bool:
        if row in self.ends or row in self._ended_by_token:
            return True
        text_ids = until_stop(new, self.stop_ids)
        if len(text_ids) < len(new):
            self._ended_by_token.add(row)  # generate has finished this row at the stop token
            return True
        if self.complete(self.tokenizer.decode(text_ids, skip_special_tokens=True)):
            self.ends[row] = len(new)
            return True
        return False


def contains_any(stop_texts: Sequence[str]) -> Callable[[str], bool]:
    """The completion test "the text contains one of ``stop_texts``" (empty strings ignored)."""
    texts = tuple(s for s in stop_texts if s)
    if not texts:
        raise ValueError("stop_texts must contain at least one non-empty string")
    return lambda text: any(s in text for s in texts)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    return ids


def _media_ids(model: Any, tokenizer: Any) -> set[int]:
    names = set(MEDIA_MARKERS)
    names.update(v for v in (getattr(tokenizer, a, None) for a in _MEDIA_TOKEN_ATTRS) if isinstance(v, str))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = {int(i) for i, tok in added.items() if str(tok) in names}
    config = getattr(model, "config", None)
    for key in _MEDIA_ID_KEYS:
        ids.update(_as_ids(getattr(config, key, None)))
    return ids


def _vocab_size(model: Any) -> int | None:
    emb = getattr(model, "get_input_embeddings", None)
    try:
        return int(emb().weight.shape[0]) if emb else None
    except (AttributeError, TypeError):
        return None


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
