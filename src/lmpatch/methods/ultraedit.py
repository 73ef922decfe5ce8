"""UltraEdit (Gu et al., 2025): one closed-form step per batch from the edit's hidden states
and gradients, normalised by running ("lifelong") statistics.

There is no per-fact optimisation and nothing is trained. One *turn* (one call, a batch of
edits) is:

1. One forward/backward pass of the new targets' teacher-forced loss
   (:func:`lmpatch.methods.token_grads.gradient_factors`). At every position that predicts
   a target token (the prompt's last token and the target's tokens but the last; the
   paper's "answer tokens") and at every edited matrix W (y = W k) it keeps the matrix's
   input k and the gradient of the loss with respect to its output, g = dL/dy.
2. The *lifelong normaliser*: z = [k ‖ g] is standardised per coordinate,
   ẑ = (z - μ) / (σ + ε), with the mean and standard deviation of every z seen so far,
   this batch included.
3. Each token's *pseudo value*: v = -lr · ‖k̂‖² · ĝ, the change of that token's output
   that one normalised gradient step on W would make (a step -lr ĝ k̂ᵀ moves the output
   at k̂ by -lr ‖k̂‖² ĝ).
4. A ridge regression from the *raw* keys to those values, one per matrix:
   ΔW = Vᵀ K (KᵀK + λI)⁻¹ (rank ≤ the batch's target tokens), MEMIT's solve with the
   identity for C0 (:func:`lmpatch.methods.locate.solve.batch_update`).

All matrices are edited from the same pass, so a batch costs one forward pass and one
backward pass from the lowest edited matrix, plus small solves.

**Where the lifelong statistics live.** The normaliser's state is not global and not
kept on the side: every UltraEdit patch carries *its own batch's* contribution, the count,
mean and sum of squared deviations of its features per statistics group, in
``patch.metrics["lifelong_statistics"]`` (float64 values, exact in JSON, saved in the
patch file). An edit computes its statistics as the exact merge (Chan et al.'s parallel
formula, order-free) of

* the warm-up statistics (below),
* the contributions of the UltraEdit patches applied to the model (``model.applied``),
* and its own batch.

So the statistics are exactly those of the edits in the weights, as AlphaEdit's protected
keys are: a sequential run (``lmpatch eval --mode sequential``, which applies each update
before computing the next) accumulates them batch after batch with no hook; a run resumed
from saved patches re-applies them and gets the same statistics to the bit; reverting a
patch takes its statistics out too; the batch regime (every batch from the unedited model)
is the paper's first turn each time. A patch made by ``compose`` keeps no metrics and so
no statistics. The patch's own contribution was measured on the model it was computed
on, as the paper's running statistics are; this is why they are stored rather than read
again (after its edit a fact's gradient is much smaller than when it was written).

**Departures from the reference code, each for a reason:**

* Warm-up (``warmup``; StableEdit, arXiv 2605.11836, also warms up). The paper starts
  from empty statistics, so its first turn standardises with that turn's features alone.
  For one edit with a one-token target that is a single row: ẑ = 0 and nothing is
  written; for a few edits the statistics are a handful of rows for hundreds of
  coordinates. Here the statistics start from the features of ``warmup`` training edits
  (``counterfact-train`` records 0-4999 whose prompts are not evaluated or tuned on, see
  :mod:`lmpatch.methods.negatives`), read once from the model and cached on disk.
  ``warmup=0`` is the paper's cold start.
* A fact's loss is the mean NLL over its own target tokens and the facts' losses are
  summed (the per-request loss every trained editor here uses); the paper takes the mean
  over all answer tokens of a mini-batch of ten prompts. Only the relative weight of
  short and long targets differs: the normaliser removes any common scale.
* The variance merge is exact; the reference adds n·Var(x) (unbiased) where the merge
  of squared deviations has (n-1)·Var(x), which inflates σ by a few percent.
* ``preserve`` (default 1): the ridge also holds the keys of every UltraEdit edit already in
  the weights (α K_pᵀK_p), so a batch moves earlier edits' outputs less. Without it the
  later batches overwrite the earlier ones: 0.78 of 2,000 training edits kept, 0.89-0.94 with it.
* ``covariance`` (default on): λC0, MEMIT's key covariance of ordinary text, in place of
  λI, so the update avoids the directions text uses: 2,000 training edits kept 0.915 for
  +26% perplexity, where the identity gave 0.81 for +22% or 0.94 for more than +50%.
* ``statistics="shape"`` (default) keeps the reference's sharing of one normaliser by
  all edited matrices of the same shape; ``"module"`` gives each matrix its own.
* ``turns`` (default 3): a call makes up to three turns, each later one for the requests
  the one before left losing. At 10,000 sequential edits three turns at 3e-4 kept 0.845
  of them at +19% perplexity, where one turn at 5e-4 kept 0.730 at +42%; ``turns=1`` is
  the paper's single turn.
* ``margin``, ``retry_lr`` and ``refresh`` (defaults 0.5, 4e-4, 2 per request) aim at the
  edits a long stream loses: a narrow win gets another turn; the edits lost most are the
  latest, written weakly against everything preserved, and a larger step for the later
  turns finishes them; a call re-edits a sample of earlier edits later batches turned back
  (``docs/ultraedit.md``, *Edits that last* and after). With ``lr=2e-4`` they keep 0.926 of
  10,000 edits at +18% perplexity (the former defaults 0.845, +19%).
* ``compute_dtype="auto"``: the passes run in bfloat16 where the CPU multiplies it in
  hardware; 10,000 edits took 465 s of edit time on a 2-core Xeon with AMX (655 s with
  float32 passes).

Defaults are adapted to SmolLM2-135M and measured on ``counterfact-train`` records 5000 on
(see :class:`UltraEditHparams` and ``docs/ultraedit.md``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.fileio import atomic_write_json
from lmpatch.methods.frozen_bottom import FrozenBottom, replaying_batch
from lmpatch.methods.learned_editing import MODULE_KINDS, edit_modules
from lmpatch.methods.locate.solve import KeyCovariance, added_rows_inverse, batch_update, layer_covariances
from lmpatch.methods.locate.values import length_buckets
from lmpatch.methods.memit import edit_layers
from lmpatch.methods.registry import Method, OneOff, register
from lmpatch.methods.teacher import (
    TARGET_NEW,
    first_token_rows,
    hits_per_request,
    nll_per_request,
    request_nll,
    target_batch,
    target_logprobs,
)
from lmpatch.methods.token_grads import gradient_factors
from lmpatch.model.forced import pair_ids
from lmpatch.model.hooks import capture_input
from lmpatch.model.loading import LoadedModel, cache_dir
from lmpatch.model.shadow import COMPUTE_DTYPES, resolve_compute_dtype
from lmpatch.model.spec import factors_to_param_layout, linear_dims
from lmpatch.model.stamp import weights_stamp
from lmpatch.patch import Patch, WeightDelta, dense_is_smaller
from lmpatch.request import EditRequest

__all__ = ["Moments", "UltraEditHparams", "apply_ultraedit", "running_statistics", "warmup_statistics"]

log = logging.getLogger(__name__)

METHOD = "ultraedit"
#: Where a patch keeps its batch's contribution to the running statistics.
STATS_KEY = "lifelong_statistics"
STATISTICS = ("shape", "module")
PRESERVE_SCALES = ("sum", "batch")
#: Added to σ before dividing, as in the reference (float32's machine epsilon).
EPS = float(torch.finfo(torch.float32).eps)
#: Requests per forward/backward pass of the warm-up.
WARMUP_CHUNK = 64


@dataclass(frozen=True)
class UltraEditHparams:
    """Which matrices UltraEdit edits, its step size and its ridge; SmolLM2-135M defaults.

    * ``modules`` / ``layers`` / ``layer_range``: the edited matrices, "mlp_out" (the MLP's
      down projection) or "mlp_in" (gate and up), in ``layers`` or, when that is None, the
      layers at the depth fractions ``layer_range``. The paper edits the upper part of the
      network: down projections at 0.64-0.93 of GPT-J's depth and the top two of
      Mistral-7B's 32 layers, gate/up projections at 0.34-0.75 of LLaMA-3-8B's.
    * ``lr``: the step of step 3 (the paper's 1e-6 for every model). ‖k̂‖² ≈ d_in and ĝ has
      unit-variance coordinates, so a token's value has norm ≈ lr·d_in·√d_out; for the
      same relative output change a smaller model needs a larger lr.
    * ``ridge``: λ of step 4 (the paper's 1, on the raw keys).
    * ``statistics``: "shape" (the paper: one normaliser per matrix shape) or "module".
    * ``warmup``: training edits whose features seed the statistics (0: the paper's empty start).
    * ``preserve``: weight α of the earlier edits' keys in the ridge (0: the paper). With
      α > 0 step 4 solves ΔW = Vᵀ K (KᵀK + λI + α K_pᵀK_p)⁻¹, K_p the keys of every
      UltraEdit edit already in the weights, so a new batch moves their outputs less
      (AlphaEdit's and RLEdit's remedy for lifelong forgetting; see ``docs/ultraedit.md``).
    * ``preserve_scale``: "sum" (each earlier key weighs α) or "batch" (all earlier keys
      together weigh α times this batch's: α·(n/n_p)·K_pᵀK_p, n and n_p the two token
      counts). Under "sum" a new batch's share shrinks as edits accumulate: at 10,000
      edits the update wrote 0.12 of its pseudo values against 0.84 for the first batch.
    * ``covariance``: the ridge weighs ΔW by the key covariance C0 of ordinary text (MEMIT's
      statistics, ``lmpatch stats``) instead of the identity, λ C0 in place of λ I, so the
      update moves the outputs of ordinary text's keys least. Down projections only;
      ``stats_corpus`` / ``stats_tokens`` say what C0 is estimated from.
    * ``turns``: at most this many turns per call (1: the paper; 3 by default). Turn k > 1 edits, on top
      of the turns before it, only those of turn k - 1's requests whose new target does not
      yet beat the true one (or, without a true one, is not yet every token's argmax): a late batch in
      a long stream is written weakly against the keys already preserved, and a second
      turn writes those edits from where the first left them. The call still returns one
      patch (the turns' changes summed, their statistics and keys together).
    * ``retry_lr``: the step of the turns after the first (None: ``lr``).
    * ``margin``: a request still loses, and is taken into the next turn, while its new
      target's mean NLL is not at least this much (nats) below the true target's (0: it
      only has to win). A fact written with room to spare survives more later batches.
    * ``refresh``: before its first turn a call checks up to this many earlier UltraEdit
      edits *per request it makes* (2 with a batch of 100: 200; :func:`refresh_count`),
      still in the model (a sample that depends only on the stack, see
      :func:`earlier_sample`), and re-edits, with its own requests, those a later batch has
      turned back (0: never). Per request, so a stream checks as many earlier edits per
      edit whether it comes in batches or one at a time. The latest edit of a prompt is the one kept; see
      ``docs/ultraedit.md`` for what this means for reverting an earlier patch.
    * ``compute_dtype``: the dtype of the passes that read keys and gradients and check
      which requests lose ("auto": bfloat16 where the CPU multiplies it in hardware, AMX
      or AVX-512 BF16, else the model's own; :mod:`lmpatch.model.shadow`). The update is
      solved in float64 and written in the model's dtype either way.
    """

    modules: tuple[str, ...] = ("mlp_out",)
    layers: tuple[int, ...] | None = None
    layer_range: tuple[float, float] = (0.67, 0.93)
    lr: float = 2e-4
    ridge: float = 100.0
    statistics: str = "shape"
    warmup: int = 100
    preserve: float = 1.0
    preserve_scale: str = "sum"
    covariance: bool = True
    turns: int = 3
    retry_lr: float | None = 4e-4
    margin: float = 0.5
    refresh: float = 2.0
    compute_dtype: str = "auto"
    stats_corpus: str = "wikitext-2-raw"
    stats_tokens: int = 100_000

    def stats_config(self):
        """Where C0 comes from (``covariance``): the same statistics MEMIT reads."""
        from lmpatch.stats import StatsConfig

        return StatsConfig(corpus=self.stats_corpus, n_tokens=self.stats_tokens)

    def check(self) -> None:
        """One clear error for settings that cannot run."""
        unknown = [m for m in self.modules if m not in MODULE_KINDS]
        if unknown or not self.modules:
            raise InvalidRequestError(
                f"UltraEdit modules must be a non-empty choice of {', '.join(MODULE_KINDS)}; got {self.modules!r}."
            )
        if len(set(self.modules)) != len(self.modules):
            raise InvalidRequestError(f"UltraEdit modules lists a kind twice: {self.modules!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InvalidRequestError(f"UltraEdit lr must be a finite number > 0, got {self.lr!r}.")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0):
            raise InvalidRequestError(f"UltraEdit ridge must be a finite number > 0, got {self.ridge!r}.")
        if self.statistics not in STATISTICS:
            raise InvalidRequestError(
                f"UltraEdit statistics must be one of {', '.join(STATISTICS)}; got {self.statistics!r}."
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidRequestError(f"UltraEdit warmup must be a whole number >= 0, got {self.warmup!r}.")
        if self.covariance and self.modules != ("mlp_out",):
            raise InvalidRequestError(
                "UltraEdit covariance=True needs modules=('mlp_out',): key statistics exist for the "
                "MLP's down projection only."
            )
        if self.covariance:
            self.stats_config()  # a bad corpus size is one clear error before anything runs
        if not (isinstance(self.preserve, (int, float)) and math.isfinite(self.preserve) and self.preserve >= 0):
            raise InvalidRequestError(f"UltraEdit preserve must be a finite number >= 0, got {self.preserve!r}.")
        if self.retry_lr is not None and not (isinstance(self.retry_lr, (int, float)) and math.isfinite(self.retry_lr)
                                              and self.retry_lr > 0):
            raise InvalidRequestError(f"UltraEdit retry_lr must be a finite number > 0 or None, got {self.retry_lr!r}.")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin >= 0):
            raise InvalidRequestError(f"UltraEdit margin must be a finite number >= 0, got {self.margin!r}.")
        if isinstance(self.refresh, bool) or not (isinstance(self.refresh, (int, float))
                                                  and math.isfinite(self.refresh) and self.refresh >= 0):
            raise InvalidRequestError(
                f"UltraEdit refresh must be a finite number >= 0 (earlier edits checked per request), got {self.refresh!r}."
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InvalidRequestError(
                f"UltraEdit compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}."
            )
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or self.turns < 1:
            raise InvalidRequestError(f"UltraEdit turns must be a whole number >= 1, got {self.turns!r}.")
        if self.preserve_scale not in PRESERVE_SCALES:
            raise InvalidRequestError(
                f"UltraEdit preserve_scale must be one of {', '.join(PRESERVE_SCALES)}; got {self.preserve_scale!r}."
            )


# --------------------------------------------------------------------------- running statistics


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (M2) of feature rows, float64.

    This is the lifelong normaliser's whole state. Two sets merge exactly and in any
    order (Chan et al.), so the statistics of several batches do not depend on the order
    their patches were applied in, and each patch can carry its own share.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor) -> "Moments":
        rows = rows.double()
        mean = rows.mean(0)
        return cls(int(rows.shape[0]), mean, ((rows - mean) ** 2).sum(0))

    def merged(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + delta * delta * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def std(self) -> torch.Tensor:
        """The sample standard deviation per coordinate (0 for fewer than two rows)."""
        return (self.m2 / max(self.count - 1, 1)).clamp_min(0).sqrt()

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.double() - self.mean.to(rows.device)) / (self.std().to(rows.device) + EPS)

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.double().cpu().tolist(), "m2": self.m2.double().cpu().tolist()}

    @classmethod
    def from_json(cls, entry: dict) -> "Moments":
        return cls(int(entry["count"]), torch.tensor(entry["mean"], dtype=torch.float64),
                   torch.tensor(entry["m2"], dtype=torch.float64))


def _merge(parts: Iterable[Moments]) -> Moments | None:
    out: Moments | None = None
    for part in parts:
        out = part if out is None else out.merged(part)
    return out


@dataclass(frozen=True)
class _Group:
    """Matrices that share one normaliser: its name in a patch, and the parameters it covers."""

    key: str
    params: tuple[str, ...]
    dims: tuple[int, int]          # (d_in, d_out) of every matrix in the group


def _groups(model: LoadedModel, params: Sequence[str], mode: str) -> list[_Group]:
    """The statistics groups of ``params``: one per parameter, or one per (d_in, d_out)."""
    dims = {p: linear_dims(m) for p, m in zip(params, edit_modules(model, params))}
    if mode == "module":
        return [_Group(p, (p,), dims[p]) for p in params]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for p in params:
        by_shape.setdefault(dims[p], []).append(p)
    return [_Group(f"{d_in}x{d_out}", tuple(ps), (d_in, d_out)) for (d_in, d_out), ps in by_shape.items()]


def _contribution(group: _Group, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Moments:
    """One batch's statistics for ``group``: every token row [k ‖ g] of every matrix in it."""
    rows = torch.cat([torch.cat(features[p], dim=1) for p in group.params])
    return Moments.of(rows)


def _stored(patch: Patch, group: _Group) -> Moments | None:
    """The contribution ``patch`` recorded for ``group`` (same matrices, same widths), if any."""
    entry = (patch.metrics.get(STATS_KEY) or {}).get(group.key)
    if not isinstance(entry, dict) or tuple(entry.get("params") or ()) != group.params:
        return None
    if len(entry.get("mean") or ()) != sum(group.dims):
        return None
    return Moments.from_json(entry)


def running_statistics(model: LoadedModel, params: Sequence[str], hp: UltraEditHparams) -> dict[str, Moments]:
    """Per group, the statistics the next edit starts from: the warm-up merged with the
    contribution of every UltraEdit patch applied to ``model``, oldest first (the merge is
    order-free; the order only fixes the floating-point sums)."""
    out: dict[str, Moments] = {}
    warm = warmup_statistics(model, params, hp) if hp.warmup else {}
    for group in _groups(model, params, hp.statistics):
        stored = [m for entry in model.applied if (m := _stored(entry.patch, group)) is not None]
        merged = _merge([*([warm[group.key]] if group.key in warm else []), *stored])
        if merged is not None:
            out[group.key] = merged
    return out


# --------------------------------------------------------------------------- features


def edit_params(model: LoadedModel, hp: UltraEditHparams) -> list[str]:
    """Weight names of the edited matrices, lowest layer first (gate before up in a layer)."""
    names: list[str] = []
    for layer in edit_layers(model, hp):
        paths = model.spec.layers[layer]
        for kind in MODULE_KINDS:
            if kind in hp.modules:
                names += [f"{p}.weight" for p in (paths.mlp_in if kind == "mlp_in" else (paths.mlp_out,))]
    return names


def _length_runs(model: LoadedModel, requests: Sequence[EditRequest]) -> list[list[int]]:
    """The requests' indices in runs of similar length (MEMIT's target search splits the
    same way): CounterFact's prompts run from 5 to 17 tokens, so one padded batch of 100
    computes about 45% padding."""
    lengths = []
    for r in requests:
        ids = pair_ids(model, model.format_prompt(r.prompt), r.target_new)
        lengths.append(len(ids.prompt_ids) + len(ids.target_ids))
    return length_buckets(lengths)


def token_features(
    model: LoadedModel, requests: Sequence[EditRequest], params: Sequence[str],
    bottom: FrozenBottom | None = None, compute_dtype: torch.dtype | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per matrix, (keys, output gradients) at the positions that predict target tokens,
    one row per target token in request order (float64); and each request's NLL of its new
    target before the edit. One forward/backward pass per run of similar-length requests
    (a request's features do not depend on the others in its pass); with ``bottom`` the
    layers below the edited ones are replayed from (or kept in) it, which must then serve
    the same ``compute_dtype`` (the dtype of the passes, :meth:`LoadedModel.forward`)."""
    modules = edit_modules(model, params, compute_dtype)
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {p: [None] * len(requests) for p in params}
    losses = torch.zeros(len(requests))
    for run in _length_runs(model, requests):
        batch = target_batch(model, [requests[i] for i in run], TARGET_NEW)
        with replaying_batch(bottom, batch):
            factors, run_losses = gradient_factors(model, modules, [requests[i] for i in run],
                                                   batch=batch, compute_dtype=compute_dtype)
        losses[run] = run_losses.float()
        counts = torch.bincount(batch.pos_rows, minlength=len(run)).tolist()
        for name, f in zip(params, factors):
            keys = f.inputs[batch.pos_rows, batch.pos_cols].double().split(counts)
            grads = f.grads[batch.pos_rows, batch.pos_cols].double().split(counts)
            for i, k, g in zip(run, keys, grads):
                pieces[name][i] = (k, g)
    out = {name: (torch.cat([k for k, _ in rows]), torch.cat([g for _, g in rows])) for name, rows in pieces.items()}
    return out, losses


def token_keys(model: LoadedModel, requests: Sequence[EditRequest], params: Sequence[str]) -> dict[str, torch.Tensor]:
    """The keys of :func:`token_features` alone (float64), from a forward pass: what
    ``preserve`` needs of a patch whose keys were not remembered, with no backward pass."""
    batch = target_batch(model, list(requests), TARGET_NEW)
    stores: dict[str, list] = {p: [] for p in params}
    with ExitStack() as stack, torch.no_grad():
        for p, module in zip(params, edit_modules(model, params)):
            stack.enter_context(capture_input(module, stores[p]))
        request_nll(model, batch)
    return {p: stores[p][0][batch.pos_rows, batch.pos_cols].double() for p in params}


# --------------------------------------------------------------------------- warm-up


def _warmup_requests(n: int) -> list[EditRequest]:
    """The first ``n`` training records whose prompt is never evaluated or tuned on."""
    from lmpatch.methods.negatives import held_out, training_records

    skip = held_out()
    return [r for r in training_records() if r.prompt.strip() not in skip][:n]


def warmup_file(model: LoadedModel, params: Sequence[str], hp: UltraEditHparams) -> Path:
    """Where the warm-up statistics of ``model`` for these matrices and settings are cached."""
    from lmpatch.methods.negatives import NEGATIVE_DATA, NEGATIVE_RECORDS

    blob = json.dumps({"params": list(params), "statistics": hp.statistics, "warmup": hp.warmup,
                       "data": NEGATIVE_DATA, "records": NEGATIVE_RECORDS, "loss": TARGET_NEW}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return cache_dir() / METHOD / f"{model.fingerprint}-{key}.json"


def warmup_statistics(model: LoadedModel, params: Sequence[str], hp: UltraEditHparams) -> dict[str, Moments]:
    """The statistics of ``hp.warmup`` training edits, per group: read from the cache, or
    computed (``WARMUP_CHUNK`` requests per pass) and cached. Computed on a model with
    patches applied, they are used but not cached: the cache holds the base model's."""
    groups = _groups(model, params, hp.statistics)
    path = warmup_file(model, params, hp)
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            return {g.key: Moments.from_json(stored[g.key]) for g in groups}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("Ignoring unreadable UltraEdit warm-up statistics %s (%s); computing them again.", path, exc)
    requests = _warmup_requests(hp.warmup)
    parts: dict[str, list[Moments]] = {g.key: [] for g in groups}
    for start in range(0, len(requests), WARMUP_CHUNK):
        features, _ = token_features(model, requests[start : start + WARMUP_CHUNK], params)
        for g in groups:
            parts[g.key].append(_contribution(g, features))
    out = {key: merged for key, moments in parts.items() if (merged := _merge(moments)) is not None}
    if model.applied:
        log.info("UltraEdit warm-up statistics computed with %d patches applied; not cached.", len(model.applied))
    else:
        atomic_write_json(path, {key: m.to_json() for key, m in out.items()})
    return out


def ultraedit_one_offs(model: LoadedModel, hp: UltraEditHparams) -> list[OneOff]:
    """The key statistics and the warm-up statistics, when ``hp`` asks for them."""
    hp.check()
    params = edit_params(model, hp)
    jobs = []
    if hp.covariance:
        from lmpatch.methods.locate.prepare import covariance_one_off

        jobs.append(covariance_one_off(model, edit_layers(model, hp), hp.stats_config()))
    if not hp.warmup:
        return jobs
    return [*jobs, OneOff(
        what=f"UltraEdit warm-up statistics from {hp.warmup} counterfact-train edits",
        where=warmup_file(model, params, hp),
        done=lambda: warmup_file(model, params, hp).is_file(),
        run=lambda show: warmup_statistics(model, params, hp),
    )]


# --------------------------------------------------------------------------- earlier edits' keys

#: Where the running K_pᵀK_p of each matrix is remembered on the model (``model.stack.solves``).
GRAM_MEMO = "ultraedit-earlier-keys"


def earlier_key_grams(model: LoadedModel, params: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per matrix, K_pᵀK_p (float64) over the token keys of every UltraEdit patch applied to
    ``model``, for ``preserve``.

    The keys are those each patch solved for, remembered on the model by patch id when it
    was computed with ``preserve`` > 0 (as AlphaEdit's). A patch applied from disk, or
    computed without ``preserve``, has its keys read once from its requests on the current
    model (close to, not exactly, the keys it was solved for) and remembered from then on.
    The sum is kept on the model with the ids it covers, so a sequential run adds one
    batch's product per edit instead of all of them again.
    """
    entries = [e for e in model.applied if e.method == METHOD]
    missing = [e for e in entries if not all(p in model.stack.edit_keys.get(e.patch_id, {}) for p in params)]
    for entry in missing:
        keys = token_keys(model, entry.requests, params)
        model.stack.edit_keys.setdefault(entry.patch_id, {}).update({p: k.float() for p, k in keys.items()})
    ids = tuple(e.patch_id for e in entries)
    out: dict[str, torch.Tensor] = {}
    for p in params:
        memo = model.stack.solves.get((GRAM_MEMO, p))
        added = _added_since(memo[0], ids) if memo is not None else None
        gram = memo[1] if added is not None else None
        for pid in added if added is not None else ids:
            k = model.stack.edit_keys[pid][p].float()  # kept in float32; one batch's product in float32
            term = (k.T @ k).double()                  # is 4× faster and summed in float64
            gram = term if gram is None else gram + term
        if gram is not None:
            model.stack.solves[(GRAM_MEMO, p)] = (ids, gram)
            out[p] = gram
    return out


def _added_since(done: tuple[str, ...], ids: tuple[str, ...]) -> tuple[str, ...] | None:
    """The patch ids applied after ``done``, when a memo covering ``done`` can be brought up
    to ``ids`` by adding them; None when ``done`` is not where ``ids`` starts (a patch under
    the memo's last one was reverted or reordered), and the memo must be recomputed."""
    return ids[len(done):] if ids[: len(done)] == done else None


def _ridge_matrix(base: KeyCovariance | None, gram: torch.Tensor | None, weight: float,
                  hp: UltraEditHparams) -> KeyCovariance | None:
    """A of the solve's λA: the identity (None) or C0, plus (w/λ) K_pᵀK_p for ``preserve``,
    so that λA = λI (or λC0) + w K_pᵀK_p (w: :func:`preserve_weight`). C0 alone is passed
    on as it is (its factor is cached)."""
    if gram is None or not weight:
        return base
    scale = weight / hp.ridge
    if base is not None:  # one pass over d × d, promoted to float64 (C0 is kept in float32)
        return KeyCovariance(torch.add(base.matrix, gram.to(base.matrix.device), alpha=scale))
    matrix = gram.mul(scale)
    matrix.diagonal().add_(1.0)
    return KeyCovariance(matrix)


#: Where a stream of small calls keeps each matrix's ridge between calls (``model.stack.solves``).
RIDGE_MEMO = "ultraedit-ridge-inverse"
#: A call counts as small, and keeps its ridge for the next call, when its tokens are at most
#: 1/SMALL of the matrix's input width (SmolLM2: 192 of 1536); the next call then adds the
#: keys the stack gained since, if they are as few, by a Woodbury update of the ridge's inverse.
SMALL = 8
#: A kept inverse is computed afresh after this many Woodbury updates in a row.
RIDGE_REFRESH = 64


def _ridges(model: LoadedModel, params: Sequence[str], covs: dict[str, KeyCovariance],
            grams: dict[str, torch.Tensor], weight: float, hp: UltraEditHparams,
            n_tokens: int) -> dict[str, KeyCovariance | None]:
    """The ridge of each matrix for a call's first turn (:func:`_ridge_matrix`).

    Why the ridge is kept: it changes with every call (it holds every earlier edit's keys),
    and factorising it costs O(d³): nine 1536 × 1536 factorisations were about half the
    time of a single edit on SmolLM2 (0.4 of 0.85 s). A stream of small calls (single
    edits, the service's case) adds a few keys per call, so a small call keeps its ridge on
    the model, and the next one adds the keys of the patches applied since to the ridge's
    inverse with :func:`~lmpatch.methods.locate.solve.added_rows_inverse`, O(d²k). A large
    call, another patch order (a revert below the top), other statistics or another weight
    start afresh, and so does every :data:`RIDGE_REFRESH`-th update, so rounding cannot pile up.

    The inverse is formed only when the next call does add few keys. A freshly factorised
    ridge is kept as its Cholesky factor, because a call of a hundred requests also
    counts as small but is followed by one that adds all its turns' keys, too many for an
    update: forming its inverse anyway cost 0.3 s of a 7.5 s late call (nine
    ``cholesky_inverse``), for nothing."""
    ids = tuple(e.patch_id for e in model.applied if e.method == METHOD)
    scale = weight / hp.ridge
    out: dict[str, KeyCovariance | None] = {}
    for p in params:
        base = covs.get(p)
        ridge = out[p] = _ridge_matrix(base, grams.get(p), weight, hp)
        kept = model.stack.solves.pop((RIDGE_MEMO, p), None)
        if ridge is None or ridge is base:  # the identity, or C0 alone (its factor is cached)
            continue
        d = ridge.matrix.shape[0]
        if n_tokens * SMALL > d:
            continue
        inverse, updates = _kept_inverse(model, kept, ids, p, base, scale, d)
        if inverse is not None:
            ridge._inverse = inverse
            held = ("inverse", inverse)
        else:  # the factor the first turn's solve computes anyway; kept alone (not the d × d ridge)
            held = ("factor", ridge.cholesky())
        model.stack.solves[(RIDGE_MEMO, p)] = (ids, base, scale, held, updates)
    return out


def _kept_inverse(model: LoadedModel, kept: tuple | None, ids: tuple, param: str, base: KeyCovariance | None,
                  scale: float, d: int) -> tuple[torch.Tensor | None, int]:
    """The kept ridge's inverse brought up to the current stack (None if it cannot be), and
    how many Woodbury updates it has had since the ridge was last factorised afresh. The
    kept ridge is ("inverse", its inverse), or ("factor", the Cholesky factor of a ridge
    factorised afresh by the call that kept it), whose inverse is formed here."""
    if kept is None:
        return None, 0
    done, kept_base, kept_scale, held, updates = kept
    added = _added_since(done, ids)
    if kept_base is not base or kept_scale != scale or added is None:
        return None, 0
    new = [model.stack.edit_keys[pid][param] for pid in added]
    rows = torch.cat(new) if new else None
    if rows is not None and (rows.shape[0] * SMALL > d or updates + 1 >= RIDGE_REFRESH):
        return None, 0
    kind, tensor = held
    inverse = torch.cholesky_inverse(tensor) if kind == "factor" else tensor
    if rows is None:
        return inverse, updates
    return added_rows_inverse(inverse, rows, scale), updates + 1


def preserve_weight(hp: UltraEditHparams, n_tokens: int, n_preserved: int) -> float:
    """The weight of K_pᵀK_p: α per earlier key ("sum"), or α·n/n_p so that the earlier keys
    together weigh α times this batch's ("batch")."""
    if hp.preserve_scale == "batch" and n_preserved:
        return hp.preserve * n_tokens / n_preserved
    return hp.preserve


def key_covariances(model: LoadedModel, params: Sequence[str], hp: UltraEditHparams) -> dict[str, KeyCovariance]:
    """C0 of each edited down projection's keys, when ``hp.covariance`` asks for it."""
    if not hp.covariance:
        return {}
    layers = edit_layers(model, hp)
    covs = layer_covariances(model, layers, hp.stats_config())
    return {param: covs[layer] for param, layer in zip(params, layers)}


# --------------------------------------------------------------------------- the edit


def _weight_delta(model: LoadedModel, param: str, left: torch.Tensor, right: torch.Tensor) -> WeightDelta:
    """ΔW = left @ right (math layout, out × in) in the parameter's layout; dense when smaller."""
    module = model.model.get_submodule(param.rsplit(".", 1)[0])
    left, right = factors_to_param_layout(module, left, right)
    if dense_is_smaller(left.shape[0], left.shape[1], right.shape[1]):
        return WeightDelta(param=param, dense=(left @ right).float().cpu())
    return WeightDelta(param=param, left=left.float().cpu(), right=right.float().cpu())


def apply_ultraedit(model: LoadedModel, requests: Sequence[EditRequest], hp: UltraEditHparams) -> Patch:
    """UltraEdit: one turn for every request (see the module docstring), then, up to
    ``hp.turns``, more turns for the requests that still lose; one patch. With
    ``hp.refresh``, the first turn also re-edits earlier edits a later batch turned back."""
    hp.check()
    if hp.turns == 1 and not hp.refresh:
        return _turn(model, requests, hp)
    params = edit_params(model, hp)
    call = _Call(dtype=pass_dtype(model, hp), bottom=_bottom(model, hp))
    earlier = earlier_sample(model, requests, refresh_count(hp, len(requests)))
    refreshed = _still_losing(model, earlier, call.bottom, hp.margin, call.dtype) if earlier else []
    # Only the first turn reads the running K_pᵀK_p (the later ones reuse its ridge), so the
    # memo it leaves covers the patches applied before the call and stays valid after it.
    turns = [_turn(model, [*requests, *refreshed], hp, call)]
    # The turns so far are in the weights as *one* patch on top of the stack: taking the top
    # patch out restores its saved weights, where taking out a patch below it would replay
    # every patch of a long sequential run (the turns' time grew with the run's length).
    current = _combined(model, requests, hp, params, turns, refreshed)
    try:
        current.apply(model)
        for _ in range(hp.turns - 1):
            # a turn's own requests only: the ones it won were held by its update's
            # preserved keys, and re-reading all of them every turn would cost a pass each
            losing = _still_losing(model, turns[-1].requests, call.bottom, hp.margin, call.dtype)
            if not losing:
                break
            turns.append(_turn(model, losing, hp, call))
            current.revert(model)
            current = _combined(model, requests, hp, params, turns, refreshed)
            current.apply(model)
    finally:
        if current.is_applied(model):
            current.revert(model)
    if hp.preserve:  # the turns' keys, preserved together under the call's patch
        model.stack.edit_keys[current.patch_id] = {p: torch.cat(call.keys[p]).float() for p in params}
    return current


def refresh_count(hp: UltraEditHparams, n_requests: int) -> int:
    """How many earlier edits a call of ``n_requests`` checks: ``hp.refresh`` per request,
    rounded up, so that any refresh > 0 checks at least one."""
    return math.ceil(hp.refresh * n_requests - 1e-9) if hp.refresh > 0 else 0


def earlier_sample(model: LoadedModel, requests: Sequence[EditRequest], n: int) -> list[EditRequest]:
    """Up to ``n`` of the edits earlier UltraEdit patches put into the model, to check again.

    Only an edit that is still the latest of its prompt qualifies: a later patch of any
    method, or one of ``requests``, that edits the same prompt supersedes it, and
    re-asserting it would undo the newer fact. The sample is drawn uniformly, seeded by the
    number of applied patches, so it is a function of the stack alone (a resumed run
    draws the same) and successive calls of a run look at different edits."""
    if n <= 0:
        return []
    latest: dict[str, tuple[str, EditRequest]] = {}
    for entry in model.applied:
        for r in entry.requests:
            latest.pop(r.prompt.strip(), None)  # re-inserted last: the pool keeps edit order
            latest[r.prompt.strip()] = (entry.method, r)
    mine = {r.prompt.strip() for r in requests}
    pool = [r for key, (method, r) in latest.items() if method == METHOD and key not in mine]
    return random.Random(len(model.applied)).sample(pool, min(n, len(pool)))


@dataclass
class _Call:
    """What the turns of one call share, so that a later turn costs little more than its pass.

    * ``dtype``: what the passes run in (:func:`pass_dtype`).
    * ``bottom``: the layers below the edited ones, computed once per text (:func:`_bottom`).
    * ``ridges``, ``weight``, ``n_preserved``: the first turn's ridge matrix per edited
      matrix (λC0 plus the keys of the patches applied before the call), whose Cholesky
      factor the matrix object caches, and the weight of those keys.
    * ``stats``: the lifelong statistics after the latest turn: the next turn's starting
      point, which reading them again from every applied patch would only reproduce.
    * ``keys``: the keys of the call's turns so far, per matrix. A later turn must also
      preserve them; rather than a new d_in × d_in factorisation per turn, they join the
      turn's own keys as rows with zero residual (``held``), scaled by √weight. That is the
      same least-squares problem (the normal equations gain w·KᵀK of those rows and nothing
      on the right-hand side), solved with the first turn's factor and a slightly larger
      n × n system; the turn's change keeps rank ≤ its own token count.
      The weight is the first turn's (it differs from a fresh call's only under
      ``preserve_scale="batch"``, where it depends on the turn's token count).
    """

    dtype: torch.dtype | None = None
    bottom: FrozenBottom | None = None
    ridges: dict[str, KeyCovariance | None] | None = None
    weight: float = 0.0
    n_preserved: int = 0
    stats: dict[str, Moments] | None = None
    keys: dict[str, list[torch.Tensor]] = field(default_factory=dict)


#: Where a run with ``refresh`` keeps the states below the edited layers between calls
#: (``model.stack.solves``, the stack's caches derived from the current weights).
BOTTOM_MEMO = "ultraedit-bottom"
#: At most this many texts' states are kept between calls (about 35 KB each on SmolLM2,
#: so at most about 1.8 GB); an edit brings at most two texts (new and true target).
BOTTOM_KEEP = 50_000


def pass_dtype(model: LoadedModel, hp: UltraEditHparams) -> torch.dtype | None:
    """The dtype of a call's passes (``hp.compute_dtype``, :mod:`lmpatch.model.shadow`);
    None for the model's own, which then runs them itself.

    The passes read keys and gradients and check which requests still lose; the update
    itself is solved in float64 and applied in the model's dtype whatever this is. Why
    not the packed copy :func:`~lmpatch.model.shadow.compute_model` gives in the model's
    own dtype: its gain is for a few dozen tokens, and a call's passes run a hundred
    requests at once, while each apply and revert of a turn re-packs the edited
    matrices (measured at 10,000 edits: 7.49 s per late call against 7.36 unpacked)."""
    dtype = resolve_compute_dtype(hp.compute_dtype, model.model)
    return None if dtype == next(model.model.parameters()).dtype else dtype


def _bottom(model: LoadedModel, hp: UltraEditHparams) -> FrozenBottom | None:
    """The layers below the lowest edited one, kept for the turns of one call.

    No turn changes them, so each text's state there is computed once per call: the
    first turn's pass keeps it, and the checks and later turns run the edited layers and
    up only (a third of SmolLM2 for the defaults). Not for an encoder-decoder, whose
    decoder reads an encoder output the edit may change.

    With ``refresh`` the states outlive the call, while :func:`_bottom_stamp` says the
    layers below are unchanged: a call checks earlier edits whose texts an earlier call
    already ran, and computing their lower two thirds again was a sixth of a late call's time."""
    lowest = min(edit_layers(model, hp))
    if lowest == 0 or model.spec.encoder_decoder:
        return None
    dtype = pass_dtype(model, hp)
    if not hp.refresh:
        return FrozenBottom(model, lowest, compute_dtype=dtype)
    key, stamp = (BOTTOM_MEMO, lowest, dtype), _bottom_stamp(model, lowest)
    found = model.stack.solves.get(key)
    if not (isinstance(found, tuple) and found[0] == stamp):
        found = (stamp, FrozenBottom(model, lowest, max_states=BOTTOM_KEEP, compute_dtype=dtype))
        model.stack.solves[key] = found
    return found[1]


def _bottom_stamp(model: LoadedModel, lowest: int) -> tuple:
    """What the states entering block ``lowest`` depend on: the token embedding and the
    blocks below (:func:`~lmpatch.model.stamp.weights_stamp`) and every added module
    (conservatively, wherever it sits). Retrieval memories rewrite the prompt's text, and
    the states are kept per token sequence, so they need no part in it."""
    weights = [model.model.get_input_embeddings().weight,
               *(p for i in range(lowest) for p in model.spec.block(model.model, i).parameters())]
    return weights_stamp(weights), tuple(id(a.module) for a in model.stack.additions())


@torch.no_grad()
def _still_losing(model: LoadedModel, requests: Sequence[EditRequest], bottom: FrozenBottom | None = None,
                  margin: float = 0.0, dtype: torch.dtype | None = None) -> list[EditRequest]:
    """The requests the model does not yet answer with the new target: its mean NLL not
    ``margin`` below the true target's, or, without a true target, not every token the argmax.

    One pass over the new targets' sequences (the texts the turn was computed on, so
    ``bottom`` has them), in runs of similar length: a one-token true target is read where
    the new target's first token is, from the same prompt; only longer true targets add a
    sequence of their own."""
    true_ids = [None if r.target_true is None else pair_ids(model, model.format_prompt(r.prompt), r.target_true).target_ids
                for r in requests]
    longer = [i for i, ids in enumerate(true_ids) if ids is not None and len(ids) > 1]
    rows = [*requests, *(replace(requests[i], target_new=requests[i].target_true, target_true=None) for i in longer)]
    # per row: its mean NLL, whether every token is the argmax, and the NLL of a one-token
    # true target read where its first token is
    nll, hit, true_nll = [0.0] * len(rows), [True] * len(rows), {}
    for run in _length_runs(model, rows):
        batch = target_batch(model, [rows[i] for i in run], TARGET_NEW)
        with replaying_batch(bottom, batch):
            logp = target_logprobs(model, batch, dtype)
        firsts = first_token_rows(batch).tolist()
        for i, value, ok, first in zip(run, nll_per_request(batch, logp).tolist(), hits_per_request(batch, logp), firsts):
            nll[i], hit[i] = value, ok
            if i < len(requests) and true_ids[i] is not None and len(true_ids[i]) == 1:
                true_nll[i] = -float(logp[first, true_ids[i][0]])
    true_nll.update({i: nll[len(requests) + j] for j, i in enumerate(longer)})
    return [r for i, r in enumerate(requests)
            if (not hit[i] if true_ids[i] is None else nll[i] >= true_nll[i] - margin)]


def _combined(model: LoadedModel, requests: Sequence[EditRequest], hp: UltraEditHparams,
              params: Sequence[str], turns: list[Patch], refreshed: Sequence[EditRequest] = ()) -> Patch:
    """One patch for a call's turns: their changes summed per matrix, their statistics merged.
    Its requests are the call's; earlier edits it re-asserted are named in its metrics."""
    groups = _groups(model, params, hp.statistics)
    stats = {}
    for g in groups:
        merged = _merge([m for t in turns if (m := _stored(t, g)) is not None])
        stats[g.key] = {"params": list(g.params), **merged.to_json()}
    info = dict(turns[0].metrics["edit"])
    info["turns"] = [len(t.requests) for t in turns]
    if refreshed:
        info["refreshed"] = [r.prompt for r in refreshed]
    return Patch(parts=WeightDelta.compose([part for t in turns for part in t.parts]), method=METHOD,
                 model_fingerprint=model.fingerprint, model_name=model.name, hparams=asdict(hp),
                 requests=list(requests), metrics={"edit": info, STATS_KEY: stats})


def _turn(model: LoadedModel, requests: Sequence[EditRequest], hp: UltraEditHparams,
          call: _Call | None = None) -> Patch:
    """One UltraEdit turn: every request in one update of every edited matrix. Within a
    call of several turns, ``call`` carries what the turns share (see :class:`_Call`)."""
    alone = call is None  # a call of one turn: its patch is the call's, and keeps its keys
    call = call if call is not None else _Call(dtype=pass_dtype(model, hp))
    params = edit_params(model, hp)
    groups = _groups(model, params, hp.statistics)
    earlier = call.stats if call.stats is not None else running_statistics(model, params, hp)
    t0 = time.perf_counter()
    features, losses = token_features(model, requests, params, call.bottom, call.dtype)
    t1 = time.perf_counter()
    n_tokens = int(next(iter(features.values()))[0].shape[0])
    first = call.ridges is None
    if first:  # the call's first turn: the earlier edits' keys and C0 into one ridge
        grams = earlier_key_grams(model, params) if hp.preserve else {}
        covs = key_covariances(model, params, hp)
        call.n_preserved = sum(int(model.stack.edit_keys[e.patch_id][params[0]].shape[0])
                               for e in model.applied if e.method == METHOD) if grams else 0
        call.weight = preserve_weight(hp, n_tokens, call.n_preserved)
        call.ridges = _ridges(model, params, covs, grams, call.weight, hp, n_tokens)
    preserved = call.n_preserved + sum(int(k.shape[0]) for k in call.keys.get(params[0], []))
    lr = hp.lr if first or hp.retry_lr is None else hp.retry_lr
    mine = {g.key: _contribution(g, features) for g in groups}
    stats = {g.key: earlier[g.key].merged(mine[g.key]) if g.key in earlier else mine[g.key] for g in groups}
    call.stats = stats
    deltas: list[WeightDelta] = []
    layers: list[dict] = []
    for group in groups:
        d_in = group.dims[0]
        for param in group.params:
            keys, grads = features[param]
            normed = stats[group.key].normalise(torch.cat([keys, grads], dim=1))
            k_hat, g_hat = normed[:, :d_in], normed[:, d_in:]
            values = -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat           # tokens × d_out
            # ΔW = Vᵀ K (KᵀK + λI + α K_pᵀK_p)⁻¹ (α = 0: the paper's ridge; λC0 for I with covariance);
            # the call's earlier turns' keys as zero-residual rows (see _Call)
            earlier_turns = call.keys.get(param, [])
            held = torch.cat([math.sqrt(call.weight) * k for k in earlier_turns]) if earlier_turns else None
            left, right = batch_update(keys, values, call.ridges[param], hp.ridge, held=held)
            deltas.append(_weight_delta(model, param, left, right))
            layers.append(_info(param, keys, values, left, right))
    if hp.preserve:
        for param in params:
            call.keys.setdefault(param, []).append(features[param][0])
    info = {
        "tokens": n_tokens,
        "pre_edit_nll": round(float(losses.mean()), 4),
        "statistics_count": {key: m.count for key, m in stats.items()},
        "earlier_count": {key: m.count for key, m in earlier.items()},
        "preserved_keys": preserved,
        "preserve_weight": call.weight,
        "gradient_seconds": round(t1 - t0, 4),
        "solve_seconds": round(time.perf_counter() - t1, 4),
        "layers": layers,
    }
    metrics = {
        "edit": info,
        STATS_KEY: {g.key: {"params": list(g.params), **mine[g.key].to_json()} for g in groups},
    }
    patch = Patch(parts=deltas, method=METHOD, model_fingerprint=model.fingerprint, model_name=model.name,
                  hparams=asdict(hp), requests=list(requests), metrics=metrics)
    if hp.preserve and alone:
        model.stack.edit_keys[patch.patch_id] = {p: features[p][0].float() for p in params}
    return patch


def _info(param: str, keys: torch.Tensor, values: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> dict:
    """How much of its pseudo values the update writes at the batch's own keys
    (``written`` = mean of vᵢ·ΔWkᵢ / ‖vᵢ‖²; 1 when the ridge takes nothing away)."""
    produced = (keys @ right.T) @ left.T
    v2 = (values * values).sum(-1).clamp_min(1e-300)
    return {
        "param": param,
        "value_norm": float(values.norm(dim=-1).mean()),
        "key_norm": float(keys.norm(dim=-1).mean()),
        "written": float(((produced * values).sum(-1) / v2).mean()),
        "update_norm": float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt()),
    }


register(Method(
    name=METHOD, aliases=("ultra-edit", "ultra_edit"),
    summary="UltraEdit: one closed-form step from hidden states and gradients, with lifelong normalisation (Gu et al. 2025)",
    hparams=UltraEditHparams, edit=apply_ultraedit, prepare=ultraedit_one_offs,
    regimes=frozenset({"single", "batch", "sequential"}),
    paper="Gu et al., UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Language Models, arXiv 2505.14679",
))
