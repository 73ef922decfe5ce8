"""Token-level bookkeeping shared by every method and metric.

Two rules fix the tokenisation bugs common in research code:
prompt+target sequences are built by concatenating *ID lists* (never by re-tokenising
glued strings), and the subject's last token is found from character offsets, not by
tokenising pieces of the prompt separately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmpatch.errors import InvalidRequestError


def encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def target_ids(tokenizer, prompt_text: str, target: str, prompt_ids: list[int] | None = None) -> list[int]:
    """The tokens the model would read for ``target`` right after ``prompt_text``.

    A space separates prompt and target unless either side already has one. When the
    joint tokenisation keeps the prompt's tokens as a prefix, its tail is the target;
    otherwise (a merge across the seam) the target is tokenised on its own.
    """
    if prompt_ids is None:
        prompt_ids = encode(tokenizer, prompt_text)
    sep = "" if (not prompt_text or prompt_text[-1].isspace() or target[:1].isspace()) else " "
    joint = encode(tokenizer, prompt_text + sep + target)
    n = len(prompt_ids)
    if joint[:n] == prompt_ids and len(joint) > n:
        ids = joint[n:]
    else:
        ids = encode(tokenizer, sep + target, special=False)
    if not ids:
        raise InvalidRequestError(f"Target {target!r} tokenises to nothing.")
    return ids


def subject_last_index(tokenizer, text: str, subject: str, start: int = 0) -> int:
    """Index of the token holding the last character of ``subject`` in ``text``.

    ``start`` is where to search from (the edit prompt's offset inside a templated or
    chat-wrapped text), so a subject that also appears in a random prefix is not picked.
    """
    pos = text.find(subject, start)
    if pos < 0:
        raise InvalidRequestError(f"Subject {subject!r} not found in {text!r}.")
    last_char = pos + len(subject) - 1
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    if offsets:
        for i, (a, b) in enumerate(offsets):
            if a <= last_char < b:
                return i
        # Some tokenizers report empty spans for byte pieces: fall back to the nearest before.
        best = max((i for i, (a, b) in enumerate(offsets) if b and a <= last_char), default=None)
        if best is not None:
            return best
    return len(encode(tokenizer, text[: last_char + 1])) - 1


@dataclass(frozen=True)
class PromptTarget:
    """A prompt and a target as token IDs; ``ids`` is their concatenation."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids


def prompt_target(tokenizer, prompt_text: str, target: str) -> PromptTarget:
    p = encode(tokenizer, prompt_text)
    return PromptTarget(tuple(p), tuple(target_ids(tokenizer, prompt_text, target, p)))


def pad_right(seqs: list[list[int]] | list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a batch of ID lists."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]] | list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (for generation and prefix caches)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask
