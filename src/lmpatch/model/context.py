"""Which tokens of the running forward pass are real, for hooks that summarise a sequence.

A forward hook sees a layer's activations but not the attention mask, so a module that
decides per *sequence* (WISE's router averages over a sequence's tokens) would count
padding as text. ``LoadedModel.forward`` and ``LoadedModel.generate`` publish the mask
they were given for the duration of the call; hooks read the part of it that covers the
tokens they see (during cached generation that is the newest token, always real).

A context variable rather than an attribute on the model: nested or concurrent calls
(threads, the bf16 compute copy) each see their own mask, and nothing outlives the call.

The same holds for :func:`memories_paused`: while an edit is being *computed*, applied
retrieval memories must not rewrite the prompts the method reads (its hooks index token
positions of the edit prompt, and a weight edit is computed against weights; a memory is
a layer on top). Other threads - a server answering requests - keep seeing them.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

_ATTENTION_MASK: ContextVar[torch.Tensor | None] = ContextVar("lmpatch_attention_mask", default=None)
_MEMORIES_PAUSED: ContextVar[bool] = ContextVar("lmpatch_memories_paused", default=False)


@contextmanager
def memories_paused() -> Iterator[None]:
    """Format prompts without the applied retrieval memories while the block runs."""
    token = _MEMORIES_PAUSED.set(True)
    try:
        yield
    finally:
        _MEMORIES_PAUSED.reset(token)


def memories_active() -> bool:
    """False inside :func:`memories_paused`."""
    return not _MEMORIES_PAUSED.get()


@contextmanager
def attention_mask_of(inputs: dict) -> Iterator[None]:
    """Publish ``inputs["attention_mask"]`` (if any) while the block runs."""
    token = _ATTENTION_MASK.set(inputs.get("attention_mask"))
    try:
        yield
    finally:
        _ATTENTION_MASK.reset(token)


def real_tokens(batch: int, n_tokens: int, device: torch.device) -> torch.Tensor:
    """(batch, n_tokens) float mask of the real tokens among the last ``n_tokens`` positions
    of the current call (all ones when no mask was published or it does not fit)."""
    mask = _ATTENTION_MASK.get()
    if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < n_tokens:
        return torch.ones(batch, n_tokens, device=device)
    return mask[:, -n_tokens:].to(device=device, dtype=torch.float32)
