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
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
