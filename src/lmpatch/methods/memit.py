"""MEMIT (Meng et al., ICLR 2023): many facts in one update spread over several MLPs.

Each fact gets a target in the residual stream after the last edited layer (the value
optimisation of ROME, moved to the block output); the layers are then edited bottom-up
by a least-squares update that maps the facts' keys to their share of the missing
output while disturbing the preserved keys (C0) as little as possible.
The loop and the solve live in :mod:`lmpatch.methods.locate`, so PMET, AlphaEdit and
EMMET reuse them; this module is only MEMIT's choices.

Where a block normalises its MLP output before the residual stream (Gemma 2/3, OLMo 2;
``LayerSpec.mlp_post_norm``), each layer's share of the missing residual is mapped through
that norm to the change of the output projection's output that makes it
(:mod:`lmpatch.methods.locate.post_norm`); adding the share itself, as for Llama, made the
residual change 2-22x what was asked on Gemma-3-270M and broke its neighbourhood.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.batch import batch_edit
from lmpatch.methods.locate.hparams import LocateHparams
from lmpatch.methods.locate.prepare import locate_one_offs
from lmpatch.methods.locate.solve import SOLVE_FORMS, KeyCovariance, batch_update, layer_covariances
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MEMITHparams(LocateHparams):
    """MEMIT's hyperparameters, adapted to small LLaMA-style models.

    * ``layers`` default to the depth range 0.125-0.25: EasyEdit's LLaMA-2-7B layers 4-8 of
      32, which is 4-8 of SmolLM2's 30 (GPT-J's 3-8 of 28 is nearly the same range).
    * ``mom2_update_weight`` (λ) is *not* portable across models: how much of its share a
      layer writes for a fact with key k is s/(1+s), s = kᵀ(λC0)⁻¹k, and for a typical key
      E[kᵀC0⁻¹k] = d_ff. GPT-J's λ = 15000 with d_ff = 16384 writes about half; SmolLM2's
      d_ff is 1536, so the same λ writes about a fifth (measured on 10 ``counterfact-train``
      records: 0.15-0.22 per layer, efficacy 0.3). ``None`` keeps GPT-J's d_ff/λ ratio,
      λ = 15000·d_ff/16384 (1406 for SmolLM2: 0.7 written per layer, efficacy 1.0, same
      neighbourhood score as unedited on those records; on 50 records λ = 700 gave the same
      efficacy, paraphrase 0.96 instead of 0.94 and a smaller neighbourhood margin).
      With ``mom2_adjustment=False`` C0 is the identity and λ must be set for the key norms.
    * The value optimisation keeps ROME's SmolLM2 settings (lr 2.0, weight decay 1e-3, early
      stop on the per-template target probability) with MEMIT's clamp 0.75 (of the residual
      stream's norm, ~139 at SmolLM2's layer 8, so ‖δ‖ ≤ ~104) and 25 steps. ``stop_prob``
      0.9 is near the paper's stop at loss < 0.05: each layer writes only part of its share,
      so the target should be firmly reached at the top.
    * Two templates (the bare prompt and one 10-token prefix) instead of the paper's six.
      Every pass of the target optimisation runs each fact once per template, so in float32
      its cost follows the template count. On 200 ``counterfact-train`` facts in one batch
      (torch held to AVX2, float32): two templates gave efficacy 0.995-1.0, paraphrase
      0.91-0.92 and neighbourhood 0.675-0.685 over three prefix seeds, in 94-99 s of edit
      time; three (the default until 2026-12-05) gave 1.0 / 0.925 / 0.67 in 128 s. Earlier,
      on 100 facts, three had matched six (1.0 / 0.93 / 0.72) in 46 s instead of 78 s.
      ``stop_prob`` 0.7 and groups of 32 facts changed nothing or were slower.
    * ``cache_targets``: optimised targets are kept on disk keyed by the model state, the
      settings and the fact (:mod:`~lmpatch.methods.locate.target_cache`), so MEMIT,
      AlphaEdit and EMMET (the same target optimisation) and reruns on the same facts
      optimise each fact once.
    """

    layers: tuple[int, ...] | None = None         # None: ``layer_range`` of the depth
    layer_range: tuple[float, float] = (0.125, 0.25)
    mom2_update_weight: float | None = None       # λ; None: GPT-J's 15000 scaled by d_ff/16384
    v_lr: float = 2.0
    v_steps: int = 25
    clamp_norm_factor: float = 0.75
    stop_prob: float | None = 0.9
    template_lengths: tuple[tuple[int, int], ...] = ((10, 1),)
    solve_form: str = "auto"                      # "push_through" | "direct" | "auto" (push-through if n < d_ff)
    z_group_size: int = 16                        # facts whose targets are optimised in one batch
    cache_targets: bool = True                    # reuse optimised targets (see locate.target_cache)

    value_target: ClassVar[str] = "block"         # MEMIT's z: the residual stream after the block

    def spread(self) -> tuple[str, str]:
        """Where the targets live for the layer loop and how the residual is shared
        between layers (:func:`~lmpatch.methods.locate.batch.spread_update`): MEMIT's
        block output, 1/remaining."""
        return "block", "linear"


def edit_layers(model: LoadedModel, hp: MEMITHparams) -> list[int]:
    """The layers to edit, ascending: ``hp.layers`` as given, or the depth range."""
    if hp.layers is not None:
        layers = sorted({model.spec.check_layer(layer) for layer in hp.layers})
        if not layers:
            raise LmpatchError("Give at least one layer to edit: layers=(...), or leave it unset.")
        return layers
    lo, hi = hp.layer_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise LmpatchError(f"layer_range must be two fractions 0 <= lo <= hi <= 1, got {hp.layer_range!r}.")
    return list(range(model.spec.depth_layer(lo), model.spec.depth_layer(hi) + 1))


GPTJ_LAMBDA, GPTJ_D_FF = 15000.0, 16384


def covariance_weight(model: LoadedModel, hp: MEMITHparams) -> float:
    """λ as given, or GPT-J's λ rescaled so a typical key's kᵀ(λC0)⁻¹k is the same."""
    if hp.mom2_update_weight is not None:
        if not hp.mom2_update_weight > 0:
            raise LmpatchError(f"mom2_update_weight must be > 0, got {hp.mom2_update_weight!r}.")
        return float(hp.mom2_update_weight)
    return GPTJ_LAMBDA * model.spec.mlp_size / GPTJ_D_FF


def memit_covariances(model: LoadedModel, layers: Sequence[int], hp: MEMITHparams) -> dict[int, KeyCovariance | None]:
    """C0 of every edited layer, computed in one pass over the corpus when not cached;
    their Cholesky factors are remembered on the model between batches."""
    if not hp.mom2_adjustment:
        return {layer: None for layer in layers}
    from lmpatch.stats.covariance import StatsConfig

    return layer_covariances(model, layers, StatsConfig(corpus=hp.stats_corpus, n_tokens=hp.stats_tokens))


def apply_memit(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    hp: MEMITHparams,
    method: str = "memit",
    covariances: Mapping[int, KeyCovariance | None] | None = None,
) -> Patch:
    """All ``requests`` in one update: a patch with one rank ≤ n delta per edited layer."""
    if hp.solve_form not in SOLVE_FORMS:
        raise LmpatchError(f"Unknown solve_form {hp.solve_form!r}; choose one of {', '.join(SOLVE_FORMS)}.")
    weight = covariance_weight(model, hp)
    layers = edit_layers(model, hp)
    if covariances is None or any(layer not in covariances for layer in layers):
        covariances = memit_covariances(model, layers, hp)

    def solve(layer, keys, residuals):
        return batch_update(keys, residuals, covariances[layer], weight, hp.solve_form)

    return batch_edit(model, requests, hp, method, solve, layers, {"mom2_update_weight": weight})


def memit_one_offs(model: LoadedModel, hp: MEMITHparams):
    """Templates and C0 for every layer the update is spread over (shared by MEMIT's family)."""
    return locate_one_offs(model, hp, edit_layers(model, hp))


register(Method(
    name="memit", summary="MEMIT: a batch of facts in one update spread over several MLPs (Meng et al. 2023)",
    hparams=MEMITHparams, edit=apply_memit, prepare=memit_one_offs,
    paper="Meng et al., Mass-Editing Memory in a Transformer, ICLR 2023",
))
