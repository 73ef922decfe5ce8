"""LSDM (Cai et al., 2024): trace where a profession's gender lives, then a least-squares edit there.

Causal tracing (:mod:`lmpatch.methods.locate.causal_trace`) of the signal
``log P(he) - log P(she)`` after prompts such as "The surgeon laughed because" finds
the MLPs, at the profession's last token, whose clean output restores most of the
gender preference once the profession's embeddings are noised. The paper found them
in the bottom layers; LSDM edits a window of ``n_layers`` consecutive layers with the
largest summed effect.

The edit is MEMIT's least squares: each prompt gets a target in the residual stream
after the top located layer, at the profession's last token, optimised so that the
model finds "he" and "she" equally likely (the loss is their mean NLL, which two words
competing for one position minimise at equal probability); the located layers' MLP
output projections then map the professions' keys to those targets while the
preserved keys (C0, weighted by λ) keep their outputs. The solve and the spread over
layers are MEMIT's (:mod:`lmpatch.methods.locate.batch`).

As a plain edit method LSDM reads each request's prompt and subject (the profession)
and ignores its target; ``lmpatch debias`` feeds it DAMA's training prompts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.locate.batch import spread_update
from lmpatch.methods.locate.causal_trace import Trace, TraceConfig, pronoun_gap, trace_mlp_effects
from lmpatch.methods.locate.prepare import locate_one_offs
from lmpatch.methods.locate.solve import batch_update
from lmpatch.methods.locate.templates import context_templates
from lmpatch.methods.locate.values import optimize_values
from lmpatch.methods.memit import MEMITHparams, covariance_weight, memit_covariances
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LSDMHparams(MEMITHparams):
    """LSDM's choices on top of MEMIT's solve.

    * ``layers`` None: located by causal tracing over up to ``trace_prompts`` of the
      requests, a window of ``n_layers`` within the lower ``trace_depth`` of the model
      (the paper's finding: bottom MLPs). Give ``layers`` to skip the trace.
    * The balanced target never reaches a loss of 0 (its floor is log 2), so the value
      optimisation runs its ``v_steps`` unless ``stop_prob`` is met; the probabilities
      compared with ``stop_prob`` are the mean over the two words.
    * ``compute_dtype`` float32, not "auto": every point where he and she tie is an
      optimum, so the targets are not unique and bfloat16's rounding picks among them
      at random. Measured on SmolLM2 (64 prompts, layers 0-2, WinoBias test): in
      bfloat16 a change of padding alone moved 64 targets by 14% on average (float32:
      0.1%) and the gap after the edit from 0.035 to 0.047 of 0.071; in float32 it is
      0.034. The 64 targets then take about 110 s instead of 60 s on two cores.
    """

    layers: tuple[int, ...] | None = None
    n_layers: int = 3
    trace_depth: float = 0.5
    trace_prompts: int = 48
    trace_samples: int = 2
    contrast: tuple[str, str] = ("he", "she")
    v_steps: int = 20
    stop_prob: float | None = None
    cache_targets: bool = False
    compute_dtype: str = "float32"
    template_lengths: tuple[tuple[int, int], ...] = ((10, 2),)  # measured so (docs/applications.md)

    value_target: ClassVar[str] = "block"


def locate_layers(model: LoadedModel, requests: Sequence[EditRequest], hp: LSDMHparams) -> tuple[list[int], Trace | None]:
    """The layers to edit and the trace they were chosen by (None when given)."""
    if hp.layers is not None:
        layers = sorted({model.spec.check_layer(layer) for layer in hp.layers})
        if not layers:
            raise InvalidRequestError("LSDM needs at least one layer; give layers=(...) or leave it unset.")
        return layers, None
    n = len(model.spec.layers)
    if not 1 <= hp.n_layers <= n:
        raise InvalidRequestError(f"n_layers must be between 1 and {n}, got {hp.n_layers!r}.")
    step = max(1, len(requests) // max(1, hp.trace_prompts))
    sample = list(requests)[::step][: hp.trace_prompts]
    signal = pronoun_gap(model, " " + hp.contrast[0].strip(), " " + hp.contrast[1].strip())
    trace = trace_mlp_effects(model, [(r.prompt, r.subject) for r in sample], signal,
                              TraceConfig(samples=hp.trace_samples))
    hi = max(hp.n_layers - 1, int(round(hp.trace_depth * n)) - 1)
    return trace.best_window(hp.n_layers, 0, min(hi, n - 1)), trace


def balanced_targets(
    model: LoadedModel, requests: Sequence[EditRequest], layer: int, templates: list[str], hp: LSDMHparams,
) -> torch.Tensor:
    """n × d: what each prompt needs added after block ``layer`` for he and she to tie."""
    words = tuple(w.strip() for w in hp.contrast)
    deltas = []
    group = hp.z_group_size
    with progress_bar(len(requests) > group, "LSDM targets", len(requests), "prompts") as advance:
        for start in range(0, len(requests), group):
            chunk = list(requests[start : start + group])
            results = optimize_values(model, chunk, layer, templates, hp.value_config(),
                                      alternatives=[words] * len(chunk))
            deltas += [r.delta.float().cpu() for r in results]
            advance(len(chunk))
    return torch.stack(deltas)


def apply_lsdm(model: LoadedModel, requests: Sequence[EditRequest], hp: LSDMHparams) -> Patch:
    if len(hp.contrast) != 2 or any(not w.strip() for w in hp.contrast):
        raise InvalidRequestError(f"contrast must be two words, such as ('he', 'she'); got {hp.contrast!r}.")
    t0 = time.perf_counter()
    layers, trace = locate_layers(model, requests, hp)
    t_trace = time.perf_counter() - t0
    templates = context_templates(model, hp.template_config())
    t1 = time.perf_counter()
    deltas = balanced_targets(model, requests, layers[-1], templates, hp)
    t_targets = time.perf_counter() - t1
    weight = covariance_weight(model, hp)
    covariances = memit_covariances(model, layers, hp)

    def solve(layer, keys, residuals):
        return batch_update(keys, residuals, covariances[layer], weight, hp.solve_form)

    parts, layer_infos = spread_update(model, requests, deltas, templates, layers, solve, target="block", spread="linear")
    info = {
        "layers": layer_infos, "located": layers, "mom2_update_weight": weight,
        "trace_seconds": round(t_trace, 3), "target_seconds": round(t_targets, 3),
        "target_norm_mean": float(deltas.norm(dim=-1).mean()),
    }
    if trace is not None:
        info["trace"] = {"effects": trace.effects, "clean": trace.clean, "corrupted": trace.corrupted,
                         "n_prompts": trace.n_prompts}
    log.info("LSDM edited layers %s", layers)
    return Patch(
        parts=parts, method="lsdm", model_fingerprint=model.fingerprint, model_name=model.name,
        hparams=asdict(hp), requests=list(requests), metrics={"edit": info},
    )


def _one_offs(model: LoadedModel, hp: LSDMHparams):
    if hp.layers is None:  # the trace decides the layers at edit time; their C0 is computed then
        return locate_one_offs(model, replace(hp, mom2_adjustment=False), [])
    return locate_one_offs(model, hp, sorted(hp.layers))


register(Method(
    name="lsdm",
    summary="LSDM: causal tracing of the he/she signal, then a least-squares (MEMIT) edit balancing it",
    hparams=LSDMHparams, edit=apply_lsdm, prepare=_one_offs,
    paper="Cai et al., Locating and Mitigating Gender Bias in Large Language Models, ICIC 2024",
))
