"""EMMET (Gupta et al., 2024, "A Unified Framework for Model Editing"): batched ROME.

ROME writes one fact *exactly* (an equality constraint) while preserving other keys in
least squares; MEMIT writes a batch in least squares too. EMMET keeps ROME's equality
constraint for every fact of a batch:

    ΔW = R (K C⁻¹ Kᵀ + λ_e I)⁻¹ K C⁻¹,   C = λ_c C0 (+ μ I)

(:func:`~lmpatch.methods.locate.solve.equality_update`). Everything else, the targets
at the top edited layer and the bottom-up residual spreading, is MEMIT's loop
(:func:`~lmpatch.methods.memit.batch_edit`), as in EasyEdit's EMMET.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.batch import batch_edit
from lmpatch.methods.locate.solve import equality_update
from lmpatch.methods.memit import MEMITHparams, edit_layers, memit_covariances, memit_one_offs
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest


@dataclass(frozen=True)
class EMMETHparams(MEMITHparams):
    """MEMIT's SmolLM2 settings (layers 4-8, the same target optimisation) with EMMET's solve.

    * ``mom2_update_weight`` is λ_c, 1 as in the EMMET authors' repository for GPT-J and
      LLaMA-2 (EasyEdit uses 1e4-1e5). Under the equality constraint λ_c only scales the
      ridge: the effective one is λ_c·λ_e = 0.1, small next to a typical key's
      kᵀC0⁻¹k ≈ d_ff, so every fact gets (almost exactly) its share at every layer.
    * ``emmet_lambda`` λ_e = 0.1 (both repositories), added only for batches of 2 or more.
    * ``update_norm_lambda`` μ (0 = off) adds μ·I to C, which also penalises the update's norm.
    """

    mom2_update_weight: float | None = 1.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0


def apply_emmet(model: LoadedModel, requests: Sequence[EditRequest], hp: EMMETHparams) -> Patch:
    """All ``requests`` in one update, each written exactly; one rank ≤ n delta per layer."""
    if hp.mom2_update_weight is None or not hp.mom2_update_weight > 0:
        raise LmpatchError(f"mom2_update_weight (λ_c) must be > 0 for EMMET, got {hp.mom2_update_weight!r}.")
    if hp.emmet_lambda < 0 or hp.update_norm_lambda < 0:
        raise LmpatchError("emmet_lambda and update_norm_lambda must be >= 0.")
    layers = edit_layers(model, hp)
    covariances = memit_covariances(model, layers, hp)

    def solve(layer, keys, residuals):
        return equality_update(keys, residuals, covariances[layer], hp.mom2_update_weight,
                               hp.emmet_lambda, hp.update_norm_lambda)

    return batch_edit(model, requests, hp, "emmet", solve, layers, {"mom2_update_weight": hp.mom2_update_weight})


register(Method(
    name="emmet", summary="EMMET: batched ROME, every fact written exactly under an equality constraint (Gupta et al. 2024)",
    hparams=EMMETHparams, edit=apply_emmet, prepare=memit_one_offs,
    paper="Gupta et al., A Unified Framework for Model Editing, 2024",
))
