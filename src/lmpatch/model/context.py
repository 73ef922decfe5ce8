"""Which tokens of the running forward pass are real, for hooks that summarise a sequence.

A forward hook sees a layer's activations but not the attention mask, so a module that
decides per *sequence* (WISE's router averages over a sequence's tokens) would count
padding as text. ``LoadedModel.forward`` and ``LoadedModel.generate`` publish the mask
they were given for the duration of the call; hooks read the part of it that covers the
tokens they see (during cached generation that is the newest token, always real).

A context variable rather than an attribute on the model: nested or concurrent calls
(threads, the bf16 compute copy) each see their own mask, and nothing outlives the call.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

_ATTENTION_MASK: ContextVar[torch.Tensor | None] = ContextVar("lmpatch_attention_mask", default=None)


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
