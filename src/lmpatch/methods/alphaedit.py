"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the update confined to the null space
of the preserved keys, remembering the keys of earlier edits.

Everything but the per-layer solve is MEMIT's (:func:`lmpatch.methods.memit.batch_edit`).
The solve, with P the projector onto the directions that preserved keys (C0) barely use,
K the batch's keys and K_p those of the edits already in the model, is

    ΔW = R Kᵀ · [P (K Kᵀ + K_p K_pᵀ) + α I]⁻ᵀ P      (rank ≤ batch size)

so ΔW k ≈ 0 for preserved keys (they live outside P's range) and for earlier edits' keys
(the K_p term), which is what keeps a long sequence of batches from collapsing the model.

Where the earlier keys come from: the patches applied to the model. Each AlphaEdit patch's
keys (read while it was computed, as the paper's ``cache_c``) are remembered on the
model by patch id; a patch applied from disk has its keys read again from its requests.
So the protected set is exactly the set of edits in the weights: reverting a patch
stops protecting its keys, and no state lives outside the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.batch import batch_edit, key_rows, read_state, template_weights
from lmpatch.methods.locate.templates import context_templates
from lmpatch.methods.memit import MEMITHparams, covariance_weight, edit_layers, memit_covariances, memit_one_offs
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaEditHparams(MEMITHparams):
    """MEMIT's settings (layers 4-8 on SmolLM2, same target optimisation) plus the null space.

    * ``nullspace_energy`` (default) picks the null space scale-free: the smallest
      eigen-directions of C0 holding at most this fraction of the preserved keys' energy.
      ``nullspace_threshold`` is the paper's absolute eigenvalue cut (2e-2 for LLaMA-3);
      set it and ``nullspace_energy=None`` to use it.
    * ``l2`` is the paper's α (10 for LLaMA-3, absolute, so also not portable). ``None``
      sets α = ``l2_relative`` × E‖P k‖², the null-space energy of a typical preserved
      key: a fact with a typical key then gets 1/(1 + l2_relative) of its share per layer,
      as MEMIT's λ does.
    * ``preserve_weight`` (β; 0 is the paper's form) adds β·λ·C0 to the solve, λ being
      MEMIT's (``mom2_update_weight``, or its d_ff-scaled default): the change to preserved
      keys is then also *penalised* inside the null space, as MEMIT does everywhere. The
      paper needs no such term because on LLaMA-3 its null space holds almost none of the
      keys' energy. On SmolLM2 there is no such space: the keys of CounterFact subjects put
      only 1.6-3x their share of energy into the low-energy directions of C0 (measured on
      200 ``counterfact-train`` facts, layers 4-8, for null spaces of 1-20% of the energy),
      so writing a fact through P moves every preserved key in proportion. The default 1.0
      was chosen on 500 sequential ``counterfact-train`` edits in batches of 100: WikiText-2
      perplexity 29.5 → 33.2 with efficacy 0.97 over all 500 and the unedited neighbourhood
      score (0.68). Shrinking the null space instead (energy 0.05, β = 0) took perplexity
      to 271 over the same 500 edits (efficacy 0.79): a smaller P only forces larger weights
      through it. No single β suits both regimes on 1,000 ``counterfact-edit`` facts: in one
      batch β = 0 / 1 / 3 gave efficacy 0.93 / 0.90 / 0.77 (perplexity +137% / +22% / +8%);
      over ten sequential batches of 100, β = 1 / 3 gave efficacy 0.94 / 0.87 with perplexity
      +30% / +10%. 1.0 stays the default as the value closest to both; pass 0 for one large
      batch and 3 for a long sequence (docs/mass-editing.md).

    ``nullspace_energy`` 0.2 was chosen on 100 ``counterfact-train`` facts in one batch:
    0.05 / 0.2 / 0.4 gave efficacy 1.0 each, paraphrase 0.92 / 0.93 / 0.93, neighbourhood
    0.72 / 0.74 / 0.73 (unedited 0.71) and WikiText-2 perplexity 25.2 / 23.9 / 24.0
    (unedited 23.3).
    """

    nullspace_energy: float | None = 0.2
    nullspace_threshold: float | None = None
    l2: float | None = None
    l2_relative: float = 0.5
    preserve_weight: float = 1.0


def _check(hp: AlphaEditHparams) -> None:
    if not hp.mom2_adjustment:
        raise LmpatchError("AlphaEdit needs the key statistics C0 for its null space; keep mom2_adjustment=True.")
    if (hp.nullspace_energy is None) == (hp.nullspace_threshold is None):
        raise LmpatchError("Set exactly one of nullspace_energy and nullspace_threshold (the other to None).")
    if hp.nullspace_energy is not None and not 0.0 < hp.nullspace_energy <= 1.0:
        raise LmpatchError(f"nullspace_energy must be in (0, 1], got {hp.nullspace_energy!r}.")
    if hp.nullspace_threshold is not None and not hp.nullspace_threshold > 0:
        raise LmpatchError(f"nullspace_threshold must be > 0, got {hp.nullspace_threshold!r}.")
    if hp.l2 is not None and not hp.l2 > 0:
        raise LmpatchError(f"l2 must be > 0, got {hp.l2!r}.")
    if not hp.l2_relative > 0:
        raise LmpatchError(f"l2_relative must be > 0, got {hp.l2_relative!r}.")
    if not hp.preserve_weight >= 0:
        raise LmpatchError(f"preserve_weight must be >= 0, got {hp.preserve_weight!r}.")


def apply_alphaedit(
    model: LoadedModel, requests: Sequence[EditRequest], hp: AlphaEditHparams, method: str = "alphaedit"
) -> Patch:
    _check(hp)
    layers = edit_layers(model, hp)
    covariances = memit_covariances(model, layers, hp)
    projectors: dict[int, torch.Tensor] = {}
    alphas: dict[int, float] = {}
    spaces: dict[int, dict] = {}
    for layer in layers:
        p, info = covariances[layer].null_space(hp.nullspace_energy, hp.nullspace_threshold)
        if info["rank"] == 0:
            raise LmpatchError(
                f"AlphaEdit's null space at layer {layer} is empty with these settings (smallest C0 eigenvalue "
                f"{float(covariances[layer].eigh()[0][0]):.3g}); raise nullspace_energy or nullspace_threshold."
            )
        projectors[layer] = p
        alphas[layer] = hp.l2 if hp.l2 is not None else hp.l2_relative * max(info["null_key_energy"], 1e-12)
        spaces[layer] = {**info, "alpha": alphas[layer]}
    earlier = earlier_key_moments(model, layers, hp)
    beta = hp.preserve_weight * covariance_weight(model, hp) if hp.preserve_weight else 0.0
    batch_keys: dict[int, torch.Tensor] = {}

    def solve(layer, keys, residuals):
        batch_keys[layer] = keys.float().cpu()
        p = projectors[layer].to(keys.device)
        moment = keys.T @ keys
        if layer in earlier:
            moment = moment + earlier[layer].to(keys.device)
        if beta:
            moment = moment + beta * covariances[layer].matrix.to(keys.device, moment.dtype)
        system = p @ moment
        system.diagonal().add_(alphas[layer])
        x = torch.linalg.solve(system, p @ keys.T)               # d_ff × n
        return residuals.T, x.T

    patch = batch_edit(model, requests, hp, method, solve, layers, {
        "null_space": {str(k): v for k, v in spaces.items()},
        "earlier_edits": sum(len(r.requests) for r in model.applied),
        "preserve_weight": beta,
    })
    model.stack.edit_keys[patch.patch_id] = batch_keys
    return patch


def earlier_key_moments(model: LoadedModel, layers: Sequence[int], hp: AlphaEditHparams) -> dict[int, torch.Tensor]:
    """Σ k kᵀ over the keys of every edit in the patches applied to ``model``, per layer
    (float64): remembered from when each AlphaEdit patch was computed, else read again
    once and remembered from then on (a resumed run, or patches of other methods, would
    otherwise re-read every earlier edit's keys at every edit)."""
    moments: dict[int, torch.Tensor] = {}
    missing = [
        record for record in model.applied
        if not all(layer in model.stack.edit_keys.get(record.patch_id, {}) for layer in layers)
    ]
    if missing:
        requests = [r for record in missing for r in record.requests]
        templates = context_templates(model, hp.template_config())
        rows = key_rows(model, requests, templates)
        weights = template_weights(templates)
        read = {layer: read_state(model, rows, weights, layer, layer)[0].float().cpu() for layer in layers}
        start = 0
        for record in missing:
            n = len(record.requests)
            known = model.stack.edit_keys.setdefault(record.patch_id, {})
            for layer in layers:
                known[layer] = read[layer][start : start + n]
            start += n
    if not model.applied:
        return moments
    for layer in layers:
        # one product over all earlier keys: summing a d x d outer product per patch made
        # each edit cost O(T d^2) memory traffic (20 s per edit at T = 800)
        keys = torch.cat([model.stack.edit_keys[record.patch_id][layer] for record in model.applied]).double()
        moments[layer] = keys.T @ keys
    return moments


register(Method(
    name="alphaedit", aliases=("alpha-edit", "alpha_edit"),
    summary="AlphaEdit: MEMIT confined to the null space of preserved and earlier keys (Fang et al. 2025)",
    hparams=AlphaEditHparams, edit=apply_alphaedit, prepare=memit_one_offs,
    paper="Fang et al., AlphaEdit: Null-Space Constrained Knowledge Editing, ICLR 2025",
))
