"""ROME (Meng et al., 2022) and r-ROME (Gupta et al., 2024): one rank-one edit per fact.

The fact's subject is located at one MLP; its key (the input of the MLP output
projection at the subject's last token) is made to map to an optimised value that makes
the model produce the new target. r-ROME differs in one line: the key in the update's
denominator is the same template-averaged key as its direction, which removes the
"disabling edits" of the original.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch

from lmpatch.methods.locate.batch import weight_delta
from lmpatch.methods.locate.prepare import locate_one_offs
from lmpatch.methods.locate.solve import KeyCovariance, layer_covariances, rank_one_update
from lmpatch.methods.locate.templates import TemplateConfig, context_templates
from lmpatch.methods.locate.values import ValueConfig, optimize_value
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch, WeightDelta, compose
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEHparams:
    """ROME's hyperparameters (Meng et al., NeurIPS 2022), with four changes for speed and for LLaMA-style
    models, each chosen on ``counterfact-train`` records only (benchmarks/tune_rome.py):

    * ``v_weight_decay`` 1e-3 (EasyEdit's LLaMA value): with the repo's 0.5, the decay term
      of a SmolLM2 value (‖v‖≈25-45, ‖δ‖≈90) alone exceeds the 0.05 stop threshold, so the
      optimisation could never stop early.
    * ``v_lr`` 2.0 instead of 0.5 and ``stop_prob`` 0.6 (stop once every context template
      gives the new target ≥ 0.6 probability per token, as MPES/ENCORE stop once the target
      ranks first): ~8-10 instead of 20 steps.
    * ``clamp_norm_factor`` 1.5 instead of 4: on 24 ROME-schema training cases the
      neighbourhood score fell 0.050 below the unedited model's with 4, 0.025 with 2 and
      0.008 with 1.5, at the same efficacy (1.0) and paraphrase score (0.98).
    * 5 context prefixes (3 of 5 tokens, 2 of 10) plus the bare prompt instead of 20 + 1:
      a quarter of the tokens per step. On the 24 tuning cases, 5 prefixes gave efficacy
      1.0, paraphrase 0.98, reliability 1.0 and ~20% shorter edits than 10 prefixes
      (efficacy 1.0, paraphrase 0.96, reliability 0.96); neighbourhood was the same (0.588).
      Stopping once only 80% of the templates reached ``stop_prob`` saved ~1.5 steps but
      cost 0.08-0.17 of reliability, so every template must reach it.

    The paper's exact settings remain one override away: ``v_lr=0.5, stop_prob=None,
    v_weight_decay=0.5, clamp_norm_factor=4, template_lengths=((5, 10), (10, 10))``.
    """

    layer: int | None = None          # None: ``layer_fraction`` of the depth
    layer_fraction: float = 0.17      # ROME: GPT-J 5/28, LLaMA-7B 5/32 -> SmolLM2 5/30
    v_lr: float = 2.0
    v_steps: int = 20
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 1.5
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2
    stop_prob: float | None = 0.6
    template_lengths: tuple[tuple[int, int], ...] = ((5, 3), (10, 2))
    template_seed: int = 0
    mom2_adjustment: bool = True      # use C0 (the paper); False = EasyEdit's default
    stats_corpus: str = "wikitext-2-raw"
    stats_tokens: int = 100_000
    consistent_keys: bool = False     # True = r-ROME
    compute_dtype: str = "auto"       # optimisation passes; "auto" = bfloat16 where fast, see model.shadow

    def value_config(self) -> ValueConfig:
        return ValueConfig(
            lr=self.v_lr, steps=self.v_steps, weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor, stop_loss=self.stop_loss,
            stop_prob=self.stop_prob, compute_dtype=self.compute_dtype,
        )

    def template_config(self) -> TemplateConfig:
        return TemplateConfig(lengths=self.template_lengths, seed=self.template_seed)


@dataclass(frozen=True)
class RROMEHparams(ROMEHparams):
    consistent_keys: bool = True


def edit_layer(model: LoadedModel, hp: ROMEHparams) -> int:
    return model.spec.check_layer(hp.layer) if hp.layer is not None else model.spec.depth_layer(hp.layer_fraction)


def key_covariance(model: LoadedModel, layer: int, hp: ROMEHparams) -> KeyCovariance | None:
    if not hp.mom2_adjustment:
        return None
    from lmpatch.stats.covariance import StatsConfig

    return layer_covariances(model, [layer], StatsConfig(corpus=hp.stats_corpus, n_tokens=hp.stats_tokens))[layer]


def rome_delta(
    model: LoadedModel, request: EditRequest, hp: ROMEHparams, layer: int,
    templates: list[str], covariance: KeyCovariance | None,
) -> tuple[WeightDelta, dict]:
    """The rank-one weight delta for one request on ``model`` as it is now."""
    module_path = model.spec.layers[layer].mlp_out
    module = model.spec.module(model.model, module_path)
    v = optimize_value(model, request, layer, templates, hp.value_config())
    den_key = v.key_mean if hp.consistent_keys else v.key_prompt
    with torch.no_grad():
        current = module(den_key.to(module.weight.dtype)[None]).float()[0].to(v.delta.device)
        # ROME's target is v_init + delta on the bare prompt; r-ROME's is "current + delta"
        # at the averaged key, i.e. a residual of exactly delta.
        residual = v.delta if hp.consistent_keys else v.v_init + v.delta - current
    r, u = rank_one_update(v.key_mean, den_key, residual, covariance)
    a, b = r.float().cpu()[:, None], u.float().cpu()[None, :]
    info = {
        "layer": layer, "steps": v.steps, "final_loss": v.losses[-1] if v.losses else None,
        "target_prob": v.target_prob, "delta_norm": float(v.delta.norm()),
        "update_norm": float(r.norm()), "denominator": float(torch.dot(den_key.double().cpu(), u.cpu())),
    }
    return weight_delta(model, layer, a, b), info  # ΔW = a b in math layout (out x in)


def apply_rome(model: LoadedModel, requests: Sequence[EditRequest], hp: ROMEHparams, method: str = "rome") -> Patch:
    """One rank-one delta per request; several requests are edited one after another
    (each on top of the previous ones), as ROME itself does, and composed into one patch."""
    layer = edit_layer(model, hp)
    templates = context_templates(model, hp.template_config())
    covariance = key_covariance(model, layer, hp)
    parts: list[Patch] = []
    for request in requests:
        previous = compose(parts) if parts else None
        if previous is not None:
            previous.apply(model)
        try:
            delta, info = rome_delta(model, request, hp, layer, templates, covariance)
        finally:
            if previous is not None:
                previous.revert(model)
        log.debug("%s edit %r: %s", method, request.prompt, info)
        parts.append(Patch(
            parts=[delta], method=method, model_fingerprint=model.fingerprint, model_name=model.name,
            hparams=_hparams_dict(hp), requests=[request], metrics={"edit": info},
        ))
    if len(parts) == 1:
        return parts[0]
    merged = compose(parts)
    merged.method = method
    merged.hparams = _hparams_dict(hp)
    return merged


def _hparams_dict(hp: ROMEHparams) -> dict:
    from dataclasses import asdict

    return asdict(hp)


def _one_offs(model: LoadedModel, hp: ROMEHparams):
    return locate_one_offs(model, hp, [edit_layer(model, hp)])


register(Method(
    name="rome", summary="ROME: rank-one locate-and-edit of one MLP (Meng et al. 2022)",
    hparams=ROMEHparams, edit=partial(apply_rome, method="rome"), prepare=_one_offs,
    paper="Meng et al., Locating and Editing Factual Associations in GPT, NeurIPS 2022",
))
register(Method(
    name="r-rome", aliases=("rrome", "r_rome"),
    summary="r-ROME: ROME with consistent keys, no disabling edits (Gupta et al. 2024)",
    hparams=RROMEHparams, edit=partial(apply_rome, method="r-rome"), prepare=_one_offs,
    paper="Gupta et al., Rebuilding ROME, 2024",
))
