"""A KL term towards fixed next-token distributions: the one implementation trained editors share.

Two jobs need the same thing: DINM keeps the model's distributions on general
instructions where the unedited model had them (a locality constraint), and the
``ft-generic`` unlearning method pulls a forgotten person's distributions towards those
the model gives a stranger. Both are "these teacher-forced positions should have these
distributions": a :class:`~lmpatch.methods.teacher.TargetBatch` that says where, and the
log-probabilities to match, computed once before training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lmpatch.methods.teacher import TARGET_NEW, TargetBatch, target_batch, target_logprobs, text_batch
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest

__all__ = ["KLReference", "answers_reference", "kl_from", "kl_to", "own_reference", "texts_reference"]


@dataclass(frozen=True)
class KLReference:
    """Where (``batch``'s supervised positions) and what (``logp``, one row per position)."""

    batch: TargetBatch
    logp: torch.Tensor

    def __post_init__(self) -> None:
        if self.logp.shape[0] != self.batch.tokens.shape[0]:
            raise ValueError(f"{self.logp.shape[0]} reference rows for {self.batch.tokens.shape[0]} positions.")


@torch.no_grad()
def own_reference(model: LoadedModel, batch: TargetBatch) -> KLReference:
    """The model's own distributions at ``batch``'s positions, as they are now (a locality anchor)."""
    return KLReference(batch, target_logprobs(model, batch, None).detach())


def answers_reference(model: LoadedModel, pairs: Sequence[tuple[str, str]]) -> KLReference:
    """The model's own distributions at each answer token of (prompt, answer) pairs, teacher-forced."""
    requests = [EditRequest(prompt=p, subject=p, target_new=a) for p, a in pairs]
    return own_reference(model, target_batch(model, requests, TARGET_NEW))


def texts_reference(model: LoadedModel, texts: Sequence[str]) -> KLReference:
    """The model's own distributions over plain texts (no chat template), after their first words."""
    return own_reference(model, text_batch(model, texts))


def kl_to(model: LoadedModel, ref: KLReference) -> torch.Tensor:
    """Mean over the reference's positions of KL(reference ‖ model) of the next-token distribution."""
    return kl_from(target_logprobs(model, ref.batch, None), ref)


def kl_from(now: torch.Tensor, ref: KLReference) -> torch.Tensor:
    """:func:`kl_to` from the model's log-probabilities ``now`` at the reference's positions."""
    return F.kl_div(now, ref.logp.to(now.device), log_target=True, reduction="none").sum(-1).mean()
