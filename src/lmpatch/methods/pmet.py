"""PMET (Li et al., AAAI 2024): MEMIT with the MLP's own share of the new fact as target.

In a transformer block the residual stream gains both an attention output and an MLP
output, and MEMIT's target (the block output) asks the MLPs to produce all of the
change. PMET optimises two vectors at the top edited layer, one added to the attention
output and one to the MLP output, so attention takes the part it can carry during the
optimisation; only the MLP vector is then written into the MLP weights:

* target z_i = MLP output of the top layer + δ_mlp,i (``target="attn_mlp"`` in
  :func:`~lmpatch.methods.locate.values.optimize_values`);
* at each edited layer the residual is read at the top layer's MLP output and divided by
  √(layers remaining) instead of MEMIT's (layers remaining);
* the solve is MEMIT's ridge against C0, so everything else is MEMIT's loop
  (:func:`~lmpatch.methods.memit.batch_edit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from lmpatch.methods.memit import MEMITHparams, apply_memit, memit_one_offs
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest


@dataclass(frozen=True)
class PMETHparams(MEMITHparams):
    """MEMIT's SmolLM2 settings (layers 4-8, λ rescaled by d_ff, lr 2, weight decay 1e-3,
    early stop at p ≥ 0.9, two templates) with PMET's clamp for LLaMA (EasyEdit:
    1.0, applied to each vector against its own unedited value: the attention and the MLP
    output of the top layer). The paper's GPT-J clamp is 0.75 and its KL factor 1.0;
    EasyEdit's LLaMA-2 settings keep MEMIT's 0.0625, as here.
    """

    clamp_norm_factor: float = 1.0

    value_target: ClassVar[str] = "attn_mlp"   # one vector for the attention and one for the MLP output

    def spread(self) -> tuple[str, str]:
        return "mlp_out", "sqrt"


def apply_pmet(model: LoadedModel, requests: Sequence[EditRequest], hp: PMETHparams) -> Patch:
    """All ``requests`` in one update; one rank ≤ n delta per edited MLP."""
    return apply_memit(model, requests, hp, method="pmet")


register(Method(
    name="pmet", summary="PMET: MEMIT whose targets are the MLP's share, optimised beside attention's (Li et al. 2024)",
    hparams=PMETHparams, edit=apply_pmet, prepare=memit_one_offs,
    paper="Li et al., PMET: Precise Model Editing in a Transformer, AAAI 2024",
))
