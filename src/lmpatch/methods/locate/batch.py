"""Many facts, several layers: the shared core of MEMIT and its descendants (PMET, EMMET, AlphaEdit).

ROME writes one fact into one MLP. MEMIT writes a batch into a range of MLPs: a target
``z`` is optimised for each fact in the residual stream after the *last* edited layer,
then the layers are edited bottom-up, each one taking its share of what is still
missing. PMET, AlphaEdit and EMMET keep this loop and change one piece each:

* where the target lives (``target``: the block output, or the MLP output for PMET),
* how the missing part is shared between layers (``spread``: 1/remaining for MEMIT,
  1/√remaining for PMET),
* the closed-form solve (a :data:`LayerSolver`: MEMIT's ridge against C0 in
  :func:`~lmpatch.methods.locate.solve.batch_update`, AlphaEdit's null-space projection,
  EMMET's equality constraint), which may keep its own state across calls (AlphaEdit's
  keys of earlier batches).

The model is edited temporarily while the loop runs (each layer's keys must be read with
the updates below it in place) through :class:`~lmpatch.patch.Patch` apply/revert, so it
is restored bit-exactly, also when something fails half-way.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.methods.hparams import recorded
from lmpatch.methods.locate.keys import read_at
from lmpatch.methods.locate.post_norm import input_change
from lmpatch.methods.locate.target_cache import CachedTarget, TargetCache
from lmpatch.methods.locate.templates import context_templates
from lmpatch.methods.locate.values import ValueConfig, optimize_values
from lmpatch.model.hooks import record_outputs, replay_outputs
from lmpatch.model.loading import LoadedModel
from lmpatch.model.spec import factors_to_param_layout
from lmpatch.patch import Patch, WeightDelta, dense_is_smaller
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest
from lmpatch.tokens import encode, pad_right, subject_last_index

log = logging.getLogger(__name__)

#: (layer, keys n × d_ff, residuals n × d), both float64 -> (left d × r, right r × d_ff), ΔW = left @ right.
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

SPREADS = ("linear", "sqrt")
TARGETS = ("block", "mlp_out")


@dataclass(frozen=True)
class KeyRows:
    """Every (request, template) prompt cut after the subject's last token, right-padded.

    Row ``i * n_templates + t`` is request ``i`` under template ``t``; nothing after the
    subject can change the key or the hidden state there, so it is never run.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor        # index of the subject's last token in each row
    n_requests: int
    n_templates: int
    bare: int                 # the template that is the bare prompt ("{}")

    def chunks(self, size: int) -> list[torch.Tensor]:
        """Row indices in batches of ``size``, rows of similar length together (less
        padding), in an order that is the same on every call."""
        order = torch.argsort(self.last, stable=True)
        return list(order.split(size))


def key_rows(model: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str]) -> KeyRows:
    if "{}" not in templates:
        raise LmpatchError("The context templates must include the bare prompt '{}'.")
    tok = model.tokenizer
    seqs: list[list[int]] = []
    for request in requests:
        for template in templates:
            text = model.format_prompt(template.format(request.prompt))
            start = max(text.find(request.prompt), 0)
            s = subject_last_index(tok, text, request.subject, start=start)
            seqs.append(encode(tok, text)[: s + 1])
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids, mask = pad_right(seqs, pad)
    return KeyRows(
        ids=ids, mask=mask, last=mask.sum(-1) - 1, n_requests=len(requests),
        n_templates=len(templates), bare=list(templates).index("{}"),
    )


def template_weights(templates: Sequence[str]) -> torch.Tensor:
    """Weights of the templates in a fact's key: the bare prompt one half, the prefixed
    ones the other half between them (MEMIT averages its "{}" group and its prefix group
    separately, then the two), so many random prefixes cannot drown the prompt itself."""
    n = len(templates)
    bare = list(templates).index("{}")
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    w = torch.full((n,), 0.5 / (n - 1), dtype=torch.float64)
    w[bare] = 0.5
    return w


class FrozenBelow:
    """Replays the blocks below the lowest edited layer in every pass after the first.

    Every update of the loop is at or above that layer, so those blocks see the same
    input in each pass: their output is recorded per chunk once (only the last block's,
    which is all the next block reads) and replayed after, unless it would take more than
    ``max_bytes``.
    """

    def __init__(self, model: LoadedModel, rows: KeyRows, first_layer: int, chunk_rows: int,
                 max_bytes: int = 1 << 30):
        self.blocks = [model.spec.block(model.model, i) for i in range(first_layer)]
        size = int(rows.ids.numel()) * model.spec.hidden_size * 4
        self.enabled = bool(self.blocks) and size <= max_bytes
        self.outputs: dict[int, object] = {}

    @contextmanager
    def around(self, chunk: int) -> Iterator[None]:
        if not self.enabled:
            yield
        elif chunk in self.outputs:
            with replay_outputs(self.blocks, [self.outputs[chunk]] * len(self.blocks)):
                yield
        else:
            store: list = []
            with record_outputs(self.blocks[-1:], store):
                yield
            self.outputs[chunk] = store[0]


@torch.no_grad()
def read_state(
    model: LoadedModel,
    rows: KeyRows,
    weights: torch.Tensor,
    layer: int,
    value_layer: int,
    target: str = "block",
    chunk_rows: int = 256,
    frozen: FrozenBelow | None = None,
    own_output: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(keys, values) of the model as it is now, in one pass that stops at ``value_layer``.

    keys: n × d_ff float64, the template-weighted inputs of layer ``layer``'s MLP output
    projection at the subject's last token; values: n × d float64, the output of block
    ``value_layer`` (``target="block"``) or of its MLP (``"mlp_out"``) there, on the bare prompt.
    ``frozen`` (from the same ``rows`` and ``chunk_rows``) skips the blocks it covers.
    With ``own_output``, a third tensor: the output of layer ``layer``'s MLP output
    projection there (n × d float64, bare prompt), which an MLP post-norm reads.
    """
    spec = model.spec
    net = model.model
    key_module = spec.mlp_out(net, layer)
    value_module = spec.block(net, value_layer) if target == "block" else spec.mlp_out(net, value_layer)
    dev = model.device
    total = rows.ids.shape[0]
    keys = torch.empty(total, spec.mlp_size, dtype=torch.float64, device=dev)
    values = torch.empty(total, spec.hidden_size, dtype=torch.float64, device=dev)
    own = torch.empty(total, spec.hidden_size, dtype=torch.float64, device=dev) if own_output else None
    out_modules = [value_module] + ([key_module] if own_output else [])
    for c, index in enumerate(rows.chunks(chunk_rows)):
        width = int(rows.last[index].max()) + 1
        ids = rows.ids[index, :width].to(dev)
        mask = rows.mask[index, :width].to(dev)
        with frozen.around(c) if frozen is not None else nullcontext():
            k, outs = read_at(model, rows.last[index], key_module, out_modules, value_module,
                              input_ids=ids, attention_mask=mask, use_cache=False)
        keys[index.to(dev)] = k.double().to(dev)
        values[index.to(dev)] = outs[0].double().to(dev)
        if own is not None:
            own[index.to(dev)] = outs[1].double().to(dev)
    n, t = rows.n_requests, rows.n_templates
    k = keys.reshape(n, t, -1)
    v = values.reshape(n, t, -1)
    result = (torch.einsum("ntd,t->nd", k, weights.to(k.device)), v[:, rows.bare])
    if own is not None:
        result += (own.reshape(n, t, -1)[:, rows.bare],)
    return result


@dataclass
class Targets:
    """What the value optimisation produced for a batch: the vector each fact needs added."""

    deltas: torch.Tensor          # n × d float32: z_i = (value on the unedited model) + deltas[i]
    steps: list[int]
    target_probs: list[float]
    seconds: float
    cached: int = 0               # how many came from the target cache


def optimize_targets(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[str],
    config: ValueConfig,
    group_size: int = 16,
    progress: bool | None = None,
    cache: bool = False,
) -> Targets:
    """One value optimisation per fact, each on the model as the caller gave it.

    Facts are optimised ``group_size`` at a time in one batch (see
    :func:`~lmpatch.methods.locate.values.optimize_values`: the result is the same as one
    by one), grouped by token length so little of a batch is padding. ``progress``
    defaults to a bar when there is more than one group. With ``cache``, targets found in
    the :class:`~lmpatch.methods.locate.target_cache.TargetCache` of this model state and
    setting are reused and new ones are stored as soon as their group finishes, so an
    interrupted batch loses at most one group.
    """
    if group_size < 1:
        raise LmpatchError(f"group_size must be >= 1, got {group_size!r}.")
    start = time.perf_counter()
    store = TargetCache.for_optimisation(model, layer, templates, config) if cache else None
    results: dict[int, CachedTarget] = {}
    if store is not None:
        for i, request in enumerate(requests):
            hit = store.load(request)
            if hit is not None:
                results[i] = hit
    cached = len(results)
    tok = model.tokenizer
    todo = sorted((i for i in range(len(requests)) if i not in results),
                  key=lambda i: _suffix_length(tok, requests[i]))
    groups = [todo[i : i + group_size] for i in range(0, len(todo), group_size)]
    show = len(groups) > 1 if progress is None else progress
    with progress_bar(show, "optimising targets", len(todo), "facts") as advance:
        for group in groups:
            for i, v in zip(group, optimize_values(model, [requests[i] for i in group], layer, templates, config)):
                results[i] = CachedTarget(v.delta.detach().float().cpu(), v.steps, v.target_prob)
                if store is not None:
                    store.store(requests[i], results[i])
            advance(len(group))
    if cached:
        log.info("%d of %d targets reused from %s", cached, len(requests), store.folder)
    ordered = [results[i] for i in range(len(requests))]
    return Targets(
        torch.stack([v.delta for v in ordered]), [v.steps for v in ordered], [v.target_prob for v in ordered],
        time.perf_counter() - start, cached,
    )


def _suffix_length(tok, request: EditRequest) -> int:
    ids = encode(tok, request.prompt)
    last = subject_last_index(tok, request.prompt, request.subject)
    return len(ids) - last + len(encode(tok, " " + request.target_new, special=False))


def spread_update(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    deltas: torch.Tensor,
    templates: Sequence[str],
    layers: Sequence[int],
    solve: LayerSolver,
    *,
    target: str = "block",
    spread: str = "linear",
    chunk_rows: int = 256,
) -> tuple[list[WeightDelta], list[dict]]:
    """Write the facts' targets into the MLP output projections of ``layers``, bottom-up.

    ``deltas[i]`` is what fact i needs added at ``target`` of the top layer (on the bare
    prompt); the target z_i is that plus the value the unedited model has there. At layer
    l (the updates of the layers below applied), the residual z - (current value) is
    divided by the number of layers left (``linear``) or its square root (``sqrt``) and
    ``solve`` turns the keys and that share into a weight change. Returns one low-rank
    delta per layer (dense when that is smaller) and per-layer diagnostics; the model is
    left exactly as it was.

    Where an MLP's output passes through a post-norm before the residual stream
    (:attr:`~lmpatch.model.spec.LayerSpec.mlp_post_norm`), the share is a change of the
    norm's *output*: it is mapped through the norm (:func:`~lmpatch.methods.locate.post_norm.input_change`)
    to the change of the projection's output that makes it, and that is what is solved for.
    With an ``mlp_out`` target the top layer's values are likewise compared after its
    post-norm. Layers without a post-norm are solved exactly as before.
    """
    if spread not in SPREADS:
        raise LmpatchError(f"Unknown residual spread {spread!r}; choose one of {', '.join(SPREADS)}.")
    if target not in TARGETS:
        raise LmpatchError(f"Unknown target {target!r}; choose one of {', '.join(TARGETS)}.")
    order = sorted({model.spec.check_layer(layer) for layer in layers})
    if not order:
        raise LmpatchError("No layers to edit: give at least one layer.")
    if deltas.shape[0] != len(requests):
        raise ValueError(f"{deltas.shape[0]} target deltas for {len(requests)} requests")
    rows = key_rows(model, requests, templates)
    weights = template_weights(templates)
    frozen = FrozenBelow(model, rows, order[0], chunk_rows)
    top = order[-1]
    spec = model.spec
    top_norm = spec.mlp_post_norm(model.model, top) if target == "mlp_out" else None
    z: torch.Tensor | None = None
    out: list[WeightDelta] = []
    infos: list[dict] = []
    applied: list[Patch] = []
    try:
        for i, layer in enumerate(order):
            t0 = time.perf_counter()
            norm = spec.mlp_post_norm(model.model, layer)
            keys, current, *own = read_state(model, rows, weights, layer, top, target, chunk_rows, frozen,
                                             own_output=norm is not None)
            if z is None:
                z = current + deltas.to(current.device, torch.float64)
            if top_norm is None:
                missing = z - current
            else:  # the top MLP's value as the residual stream sees it: after its post-norm
                missing = _normed(top_norm, z) - _normed(top_norm, current)
            remaining = len(order) - i
            residual = missing / (remaining if spread == "linear" else math.sqrt(remaining))
            extra = {}
            if norm is not None:
                wanted = residual
                residual, achieved = input_change(norm, own[0], wanted)
                extra = _post_norm_info(spec.layers[layer].mlp_post_norm, own[0], wanted, residual, achieved)
            left, right = solve(layer, keys, residual)
            delta = weight_delta(model, layer, left, right)
            out.append(delta)
            infos.append({**_layer_info(layer, keys, missing, residual, left, right, time.perf_counter() - t0),
                          **extra})
            log.debug("layer %d: %s", layer, infos[-1])
            if i < len(order) - 1:
                part = Patch(parts=[delta], method="spread-partial", model_fingerprint=model.fingerprint,
                             model_name=model.name)
                part.apply(model)
                applied.append(part)
    finally:
        for part in reversed(applied):
            part.revert(model)
    return out, infos


def _normed(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    param = next(norm.parameters(), None)
    with torch.no_grad():
        if param is None:
            return norm(x.float()).double()
        return norm(x.to(param.device, param.dtype)).double().to(x.device)


def _post_norm_info(path: str, inputs, wanted, change, achieved) -> dict:
    """How the share fared through the post-norm: the residual change the mapped change
    makes relative to the share (1 = all of it) and the mapped change's size relative to
    the projection's output (what the solve now writes)."""
    w2 = (wanted * wanted).sum(-1).clamp_min(1e-30)
    return {
        "post_norm": path,
        "share_norm": float(wanted.norm(dim=-1).mean()),
        "share_reached": float(((achieved * wanted).sum(-1) / w2).mean()),
        "share_error": float(((achieved - wanted).norm(dim=-1) / w2.sqrt()).mean()),
        "relative_change": float((change.norm(dim=-1) / inputs.norm(dim=-1).clamp_min(1e-30)).mean()),
    }


def weight_delta(model: LoadedModel, layer: int, left: torch.Tensor, right: torch.Tensor) -> WeightDelta:
    """The update in the parameter's storage layout; factors unless the dense matrix is smaller."""
    path = model.spec.layers[layer].mlp_out
    module = model.spec.module(model.model, path)
    left, right = factors_to_param_layout(module, left, right)
    rows, rank = left.shape
    param = path + ".weight"
    if dense_is_smaller(rows, rank, right.shape[1]):
        return WeightDelta(param=param, dense=(left @ right).float().cpu())
    return WeightDelta(param=param, left=left.float().cpu(), right=right.float().cpu())


def _layer_info(layer: int, keys, missing, residual, left, right, seconds: float) -> dict:
    """How much of its share this layer wrote: ``written`` = mean of rᵢ·ΔWkᵢ / ‖rᵢ‖²
    (1 = every fact got its full share; far below 1 means λ is too large for this model)."""
    left, right = left.to(keys.device), right.to(keys.device)
    if dense_is_smaller(left.shape[0], left.shape[1], right.shape[1]):
        # Past the break-even the factored form's n × n products cost more than forming ΔW
        # once (9.9 s against 0.55 s per layer for 10,000 facts on SmolLM2's MLP shape).
        dense = left @ right
        produced = keys @ dense.T                                   # (ΔW kᵢ)ᵢ, n × d
        update_norm = dense.norm()
    else:
        produced = (right @ keys.T).T @ left.T
        update_norm = ((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt()
    r2 = (residual * residual).sum(-1).clamp_min(1e-30)
    return {
        "layer": layer,
        "missing_norm": float(missing.norm(dim=-1).mean()),
        "written": float(((produced * residual).sum(-1) / r2).mean()),
        "key_norm": float(keys.norm(dim=-1).mean()),
        "update_norm": float(update_norm),
        "seconds": round(seconds, 4),
    }


def batch_edit(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    hp: Any,
    method: str,
    solve: LayerSolver,
    layers: list[int],
    info: dict | None = None,
) -> Patch:
    """MEMIT's loop with any layer solver: optimise the targets at the top edited layer,
    spread them over the layers bottom-up, and package the deltas as a patch. MEMIT,
    AlphaEdit and EMMET differ only in ``solve``; PMET also in ``hp``'s value target and
    residual spread. ``hp`` is MEMIT's hyperparameters or a subclass; ``layers`` ascending."""
    templates = context_templates(model, hp.template_config())
    targets = optimize_targets(model, requests, layers[-1], templates, hp.value_config(), hp.z_group_size,
                               cache=hp.cache_targets)
    t0 = time.perf_counter()
    target, spread = hp.spread()
    deltas, layer_infos = spread_update(
        model, requests, targets.deltas, templates, layers, solve, target=target, spread=spread
    )
    info = {
        **(info or {}),
        "layers": layer_infos,
        "z_seconds": round(targets.seconds, 3),
        "z_cached": targets.cached,
        "spread_seconds": round(time.perf_counter() - t0, 3),
        "z_steps_mean": sum(targets.steps) / len(targets.steps),
        "z_target_prob_min": min(targets.target_probs),
        "z_delta_norm_mean": float(targets.deltas.norm(dim=-1).mean()),
    }
    log.debug("%s edit of %d requests: %s", method, len(requests), info)
    return Patch(
        parts=deltas, method=method, model_fingerprint=model.fingerprint, model_name=model.name,
        hparams=recorded(hp, layers=layers), requests=list(requests), metrics={"edit": info},
    )
