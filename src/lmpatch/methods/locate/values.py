"""Optimise the vector that, added at one layer, makes the model say the new target.

This is the expensive half of every locate-and-edit method (ROME's v*, MEMIT's z), and
it is where lmpatch is fast by construction:

* The vector is injected at the subject's last token. By causality, nothing at earlier
  positions changes at any layer, so every prompt is split there: the *prefix* runs once
  through the whole model and its attention keys/values are cached; each optimisation
  step runs only the short *suffix* (subject's last token, rest of the prompt, target)
  on top of that cache.
* Logits are computed only where the loss reads them (target positions and the single
  KL position), never over the full vocabulary at every position.
* The passes run in a low-precision copy of the model when the hardware multiplies
  bfloat16 fast (:mod:`lmpatch.model.shadow`); the keys and the unedited value the weight
  update is solved from come from one short float32 pass of the real model up to the
  edit layer, so the update itself loses no precision. When the passes run on the real
  model anyway, that read runs only the subject's last token on the prefix cache.

Where the vector is added is the one thing the methods disagree on: ROME adds it to one
layer's MLP output (``target="mlp_out"``); MEMIT and its descendants add it to the
residual stream, i.e. the output of the last edited decoder block (``target="block"``),
and then spread the change over several MLPs. PMET adds two vectors, one to the
attention output and one to the MLP output of that block (``target="attn_mlp"``), so
the MLP's share of the new fact is optimised apart from what attention contributes.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.delta_steps import STEPPERS, make_stepper
from lmpatch.methods.locate.keys import read_at
from lmpatch.model.compat import output_cache, with_cache
from lmpatch.model.hooks import edit_output, record_outputs, replay_outputs
from lmpatch.model.loading import LoadedModel
from lmpatch.model.shadow import computes_exactly, resolve_compute_dtype
from lmpatch.request import EditRequest
from lmpatch.tokens import encode, pad_left, pad_right, subject_last_index, target_ids

VALUE_TARGETS = ("mlp_out", "block", "attn_mlp")


@dataclass(frozen=True)
class ValueConfig:
    """Hyperparameters of the value optimisation (ROME repo names in comments)."""

    lr: float = 0.5                  # v_lr
    steps: int = 20                  # v_num_grad_steps
    weight_decay: float = 0.5        # v_weight_decay (on ||delta|| / ||v_init||^2, not squared)
    clamp_norm_factor: float = 4.0   # ||delta|| <= factor * ||v_init||
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2          # early stop on the total loss (ROME)
    stop_prob: float | None = None   # also stop once every template gives the target at least this
                                     # (per-token geometric-mean) probability: MPES-style early stop
    kl_prompts: tuple[str, ...] = ("{} is a",)
    compute_dtype: str = "auto"      # dtype of the optimisation passes (model.shadow)
    target: str = "mlp_out"          # where delta is added: "mlp_out" (ROME's v*), "block"
                                     # (the residual stream after the block: MEMIT's z) or
                                     # "attn_mlp" (attention and MLP outputs, one delta each: PMET)
    optimizer: str = "adam"          # "adam" (the papers; ``lr`` is its rate) or "lbfgs"
                                     # (locate.delta_steps: the same optimum in fewer passes)
    first_step: float = 1.0          # lbfgs: length of the first step, in units of ||v_init||

    def __post_init__(self) -> None:
        if self.target not in VALUE_TARGETS:
            raise LmpatchError(
                f"Unknown value target {self.target!r}; choose one of {', '.join(VALUE_TARGETS)}."
            )
        if self.optimizer not in STEPPERS:
            raise LmpatchError(
                f"Unknown value optimizer {self.optimizer!r}; choose one of {', '.join(STEPPERS)}."
            )
        if not self.first_step > 0:
            raise LmpatchError(f"v_first_step must be > 0 (a fraction of ||v_init||), got {self.first_step!r}.")


@dataclass
class ValueResult:
    """What one optimisation produced, plus the by-products the weight update needs."""

    delta: torch.Tensor            # the optimised additive change at the edit point (for "attn_mlp": the MLP's)
    v_init: torch.Tensor           # value at that edit point (MLP output or block output) on the bare prompt
    key_prompt: torch.Tensor       # key at the subject's last token, bare prompt
    key_mean: torch.Tensor         # key averaged over all context templates
    steps: int
    losses: list[float] = field(default_factory=list)
    target_prob: float = 0.0       # mean P(target) over templates at the last step


@dataclass
class _Rows:
    """The prompts of one optimisation (one or several requests), split at the subject's
    last token. Row tensors are indexed by row; ``owner`` says which request a row serves."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    positions: torch.Tensor
    owner: torch.Tensor            # (rows,) request index of each row
    tgt_rows: torch.Tensor         # (n_target_tokens,) row of each supervised token
    tgt_pos: torch.Tensor          # its position in the suffix (the logit that predicts it)
    tgt_tok: torch.Tensor          # the token id
    tgt_weight: torch.Tensor       # 1 / (target length * n_rewrite): per-row mean, then mean over rows
    n_rewrite: int                 # rewrite (template) rows per request
    kl_rows: torch.Tensor          # rows whose position 0 carries the KL term
    rewrite_rows: torch.Tensor     # (requests, n_rewrite) the template rows of each request, template order

    @property
    def n_requests(self) -> int:
        return int(self.rewrite_rows.shape[0])


def build_rows(model: LoadedModel, request: EditRequest, templates: list[str], kl_prompts) -> _Rows:
    """The rows of a single request (see :func:`build_group_rows`)."""
    return build_group_rows(model, [request], templates, kl_prompts)


def build_group_rows(
    model: LoadedModel, requests: Sequence[EditRequest], templates: list[str], kl_prompts,
    alternatives: Sequence[Sequence[str]] | None = None,
) -> _Rows:
    """Each request under every template (its rewrite rows), then its KL prompts; all
    requests of a group share one padded batch so one pass serves them all.

    ``alternatives[i]``, when given, replaces request i's one target by several whose
    mean NLL is the loss: each template then gets one row per alternative (the first
    alternative's rows are the request's rewrite rows). Two alternatives that compete
    for the same position, such as " he" and " she", are jointly most likely at equal
    probability, which is how LSDM asks for a balanced continuation.
    """
    tok = model.tokenizer
    prefixes: list[list[int]] = []
    suffixes: list[list[int]] = []
    owner, rows_t, pos_t, tok_t, w_t, kl_rows, rewrite = [], [], [], [], [], [], []
    for index, request in enumerate(requests):
        mine = []
        first_row = len(prefixes)
        targets = tuple(alternatives[index]) if alternatives is not None else (request.target_new,)
        for template in templates:
            text = model.format_prompt(template.format(request.prompt))
            ctx = encode(tok, text)
            start = text.find(request.prompt)
            s = subject_last_index(tok, text, request.subject, start=max(start, 0))
            for k, target in enumerate(targets):
                row = len(prefixes)
                tgt = target_ids(tok, text, target, ctx)
                full = ctx + tgt
                prefixes.append(full[:s])
                suffixes.append(full[s:-1])
                owner.append(index)
                if k == 0:
                    mine.append(row)
                for j, t in enumerate(tgt):
                    rows_t.append(row)
                    pos_t.append(len(ctx) - 1 + j - s)
                    tok_t.append(t)
                    w_t.append(1.0 / (len(tgt) * len(templates) * len(targets)))
        rewrite.append(mine)
        for kp in kl_prompts:
            text = model.format_prompt(kp.format(request.subject))
            ids = encode(tok, text)
            s = subject_last_index(tok, text, request.subject)
            # When the prompt starts with the subject (80% of CounterFact), the bare
            # template row already holds this exact prefix and token: read the KL term
            # there instead of paying for a row that repeats it.
            same = next((r for r in range(first_row, len(prefixes))
                         if prefixes[r] == ids[:s] and suffixes[r][:1] == ids[s : s + 1]), None)
            if same is not None:
                kl_rows.append(same)
                continue
            kl_rows.append(len(prefixes))
            owner.append(index)
            prefixes.append(ids[:s])
            suffixes.append(ids[s : s + 1])
    pad = tok.pad_token_id
    if any(prefixes):
        p_ids, p_mask = pad_left(prefixes, pad)
    else:
        p_ids = p_mask = torch.zeros(len(prefixes), 0, dtype=torch.long)
    s_ids, s_mask = pad_right(suffixes, pad)
    positions = p_mask.sum(-1, keepdim=True) + torch.arange(s_ids.shape[1])[None, :]
    return _Rows(
        prefix_ids=p_ids, prefix_mask=p_mask, suffix_ids=s_ids, suffix_mask=s_mask, positions=positions,
        owner=torch.tensor(owner, dtype=torch.long), tgt_rows=torch.tensor(rows_t, dtype=torch.long),
        tgt_pos=torch.tensor(pos_t, dtype=torch.long), tgt_tok=torch.tensor(tok_t, dtype=torch.long),
        tgt_weight=torch.tensor(w_t), n_rewrite=len(templates), kl_rows=torch.tensor(kl_rows, dtype=torch.long),
        rewrite_rows=torch.tensor(rewrite, dtype=torch.long).reshape(len(requests), len(templates)),
    )


class SuffixRunner:
    """Runs the suffix of every row on top of the once-computed prefix cache.

    ``net`` is the module to run (the model or its low-precision compute copy); it must
    have the same module tree as the model ``spec`` was read from. The decoder blocks
    below ``frozen_below`` see the same inputs at every step (the edit sits above them),
    so their suffix outputs are recorded on the first call and replayed afterwards.
    """

    def __init__(self, model: LoadedModel, dtype: torch.dtype, rows: _Rows, frozen_below: int = 0):
        spec = model.spec
        net = self.net = model.network(dtype)
        self.run = partial(model.forward, compute_dtype=dtype, body_only=True)
        self.rows = rows
        self.frozen = [spec.module(net, spec.layers[i].block) for i in range(frozen_below)]
        self.replay: list | None = None
        self.device = next(net.parameters()).device
        self.base = spec.base_model(net)
        self.prefix_len = rows.prefix_ids.shape[1]
        self.cache = None
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mask = torch.cat([rows.prefix_mask, rows.suffix_mask], dim=1).to(self.device)
        self.positions = rows.positions.to(self.device)
        self.suffix_ids = rows.suffix_ids.to(self.device)
        if self.prefix_len:
            self.prefix_kv = self._prefix_cache(rows.prefix_ids, rows.prefix_mask)

    def _prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Attention keys/values of every row's prefix, left-padded to the longest.

        Why in buckets: a group's prefixes range from a bare prompt's few tokens to a
        ten-token context plus the prompt, so about half of the padded batch is padding
        (measured on MEMIT groups of 16 facts: 46-56% real tokens). Rows of similar length
        run together (:func:`length_buckets`) and their keys/values are padded back on the
        left; padded positions are masked, so their zeros are never read. A real token's
        position id counts real tokens only, so it is the same in a bucket as in the full
        batch.
        """
        width = ids.shape[1]
        lengths = mask.sum(-1).tolist()
        merged: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for bucket in length_buckets(lengths, RUN_OVERHEAD_TOKENS):
            span = max(lengths[i] for i in bucket)
            if span == 0:
                continue  # rows without a prefix: their (masked) slots stay zero
            idx = torch.tensor(bucket, device=self.device)
            sub_mask = mask[bucket, width - span:].to(self.device)
            with torch.no_grad():
                out = self.run(
                    input_ids=ids[bucket, width - span:].to(self.device), attention_mask=sub_mask,
                    position_ids=(sub_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                )
            kv = _cache_tensors(output_cache(out))
            if merged is None:
                merged = [(k.new_zeros((len(lengths), k.shape[1], width, *k.shape[3:])),
                           v.new_zeros((len(lengths), v.shape[1], width, *v.shape[3:]))) for k, v in kv]
            for (k_all, v_all), (k, v) in zip(merged, kv):
                k_all[idx, :, width - span:] = k
                v_all[idx, :, width - span:] = v
        assert merged is not None, "called only when some row has a prefix"
        return merged

    def edit_point_state(self, model: LoadedModel, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`edit_point_state`, read on top of the prefix cache when this runner computes
        with the model itself: only each row's first suffix token (the subject's last) runs,
        up to block ``layer``.

        Why: the separate read runs every prefix again, up to the edit layer (0.41 s of a
        MEMIT group of 16 facts in float32), although the prefix cache already holds what
        those tokens leave for the next one. A low-precision compute copy cannot stand in:
        the keys and the unedited value must come from the real weights in their own
        precision, so then the separate read runs. (A packed float32 copy computes what
        the model computes, up to float rounding, so it may read them.)
        """
        if not computes_exactly(model, self.net):
            return edit_point_state(model, self.rows, layer, target)
        self.reset()
        inputs = dict(input_ids=self.suffix_ids[:, :1], attention_mask=self.mask[:, :self.prefix_len + 1],
                      position_ids=self.positions[:, :1], use_cache=self.cache is not None,
                      **with_cache(self.base, self.cache))
        last = torch.zeros(self.suffix_ids.shape[0], dtype=torch.long)
        try:
            return _read_edit_point(model, self.rows, layer, target, last, self.rows.rewrite_rows, inputs)
        finally:
            self.cache = None

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows where ``keep`` is true (requests that finished early leave the
        batch); the prefix cache and the replayed lower blocks are cut to match."""
        idx = keep.nonzero().flatten().to(self.device)
        self.mask = self.mask[idx]
        self.positions = self.positions[idx]
        self.suffix_ids = self.suffix_ids[idx]
        if self.prefix_kv is not None:
            self.prefix_kv = [(k[idx], v[idx]) for k, v in self.prefix_kv]
        if self.replay is not None:
            self.replay = [_take_rows(out, idx) for out in self.replay]

    def reset(self) -> None:
        """A fresh cache holding only the prefix: each step must start from a cache that
        belongs to no earlier autograd graph (cropping would keep views of old graphs)."""
        if self.prefix_kv is None:
            return
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.prefix_kv):
            cache.update(k, v, i)
        self.cache = cache

    def hidden(self) -> torch.Tensor:
        """Final hidden states of the suffix tokens (hooks placed by the caller apply)."""
        self.reset()
        if self.replay is None:
            store: list = []
            with record_outputs(self.frozen, store):
                out = self._forward()
            self.replay = store
        else:
            with replay_outputs(self.frozen, self.replay):
                out = self._forward()
        return out.last_hidden_state

    def _forward(self):
        return self.run(
            input_ids=self.suffix_ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=self.cache is not None,
            **with_cache(self.base, self.cache),
        )


def _edit_point_inputs(rows: _Rows, device) -> dict[str, torch.Tensor]:
    """The rewrite rows cut right after the subject's last token (all the edit point sees),
    request by request in template order."""
    index = rows.rewrite_rows.reshape(-1)
    ids = torch.cat([rows.prefix_ids[index], rows.suffix_ids[index, :1]], dim=1)
    mask = torch.cat([rows.prefix_mask[index], rows.suffix_mask[index, :1]], dim=1)
    return dict(
        input_ids=ids.to(device), attention_mask=mask.to(device),
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False,
    )


def edit_points(spec, net: torch.nn.Module, layer: int, target: str) -> list[torch.nn.Module]:
    """The modules of ``net`` whose outputs get a delta for ``target``; the last one is the
    point the weight update is solved for."""
    if target == "block":
        return [spec.block(net, layer)]
    if target == "attn_mlp":
        return [spec.module(net, spec.layers[layer].attn_out), spec.mlp_out(net, layer)]
    return [spec.mlp_out(net, layer)]


def edit_point_state(model: LoadedModel, rows: _Rows, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 keys (inputs of layer ``layer``'s MLP output projection) at the subject's last
    token of every rewrite row, (requests, templates, d_ff), and the outputs of the edit
    points there on each request's bare prompt (its first template row), (requests, points,
    d); from the real model, in one pass that stops after block ``layer``."""
    inputs = _edit_point_inputs(rows, model.device)
    n, width = inputs["input_ids"].shape
    last = torch.full((n,), width - 1, dtype=torch.long)  # rows end at the subject's last token
    in_order = torch.arange(n).reshape(rows.n_requests, rows.n_rewrite)
    return _read_edit_point(model, rows, layer, target, last, in_order, inputs)


def _read_edit_point(
    model: LoadedModel, rows: _Rows, layer: int, target: str, last: torch.Tensor, row_of: torch.Tensor, inputs: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one read behind both forms of :func:`edit_point_state`: ``inputs`` run on the real
    model up to block ``layer``, read at ``last``; ``row_of`` (requests, templates) says
    which input row is each request's template row."""
    spec, net = model.spec, model.model
    keys, outs = read_at(model, last, spec.mlp_out(net, layer), edit_points(spec, net, layer, target),
                         spec.block(net, layer), **inputs)
    keys = keys[row_of.reshape(-1).to(keys.device)].reshape(rows.n_requests, rows.n_rewrite, -1)
    values = torch.stack([out[row_of[:, 0].to(out.device)] for out in outs], dim=1)
    return keys, values


def _take_rows(out, idx: torch.Tensor):
    """``out`` (a recorded module output: tensor or tuple of them) restricted to rows ``idx``."""
    if isinstance(out, torch.Tensor):
        return out[idx.to(out.device)] if out.dim() > 0 else out
    if isinstance(out, tuple):
        taken = [_take_rows(x, idx) for x in out]
        return type(out)(*taken) if hasattr(out, "_fields") else type(out)(taken)
    return out


#: What one extra forward costs beyond its tokens, in tokens: a run over a handful of rows
#: is bound by reading the weights (25 SmolLM2 blocks: 52 ms at 7 tokens, 77 ms at 42, in
#: float32 on two Zen 4 cores), so splitting a batch only pays where it saves this much padding.
RUN_OVERHEAD_TOKENS = 64


def length_buckets(lengths: Sequence[int], overhead: int = RUN_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices split into runs of similar length, minimising the padded tokens
    (rows x longest row of the run) plus ``overhead`` tokens per run.

    Exact by dynamic programming over the rows sorted by length: an optimal split of a
    sorted list is into contiguous runs, since swapping a shorter row into a run of
    longer ones never reduces that run's padded width.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n       # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + overhead + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers cache, across its API generations."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]  # legacy tuple-of-tuples


def optimize_value(
    model: LoadedModel,
    request: EditRequest,
    layer: int,
    templates: list[str],
    config: ValueConfig = ValueConfig(),
) -> ValueResult:
    """Find delta so that adding it at layer ``layer`` at the subject makes the model
    predict ``request.target_new`` after every context template (see :func:`optimize_values`;
    an encoder-decoder's is :mod:`lmpatch.methods.locate.seq2seq_values`)."""
    if model.spec.encoder_decoder:
        from lmpatch.methods.locate.seq2seq_values import optimize_value_seq2seq

        return optimize_value_seq2seq(model, request, layer, templates, config)
    return optimize_values(model, [request], layer, templates, config)[0]


def optimize_values(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[str],
    config: ValueConfig = ValueConfig(),
    alternatives: Sequence[Sequence[str]] | None = None,
) -> list[ValueResult]:
    """One delta per request, optimised together: delta_i is added at layer ``layer`` at the
    subject's last token of request i's rows only, to the MLP output for
    ``config.target == "mlp_out"`` (ROME's v*), to the block output for ``"block"`` (MEMIT's z),
    or one delta each to the attention and the MLP output for ``"attn_mlp"`` (PMET; the
    result's ``delta`` is then the MLP's, each delta decayed and clamped against its own
    unedited value).

    Why together: at a few dozen tokens a pass is bound by reading the weights, so a pass
    over the rows of many requests costs little more than over one request's. The
    requests do not interact: each loss term depends on its own delta only, and Adam is
    elementwise, so every delta follows exactly the path it would follow alone. A request
    leaves the batch when it meets its own stopping rule. The weight decay and the norm
    clamp are relative to each request's unedited value at the edit point.
    """
    if not requests:
        return []
    spec = model.spec
    rows = build_group_rows(model, requests, templates, config.kl_prompts, alternatives)
    n_req = rows.n_requests
    dtype = resolve_compute_dtype(config.compute_dtype, model.model)
    net = model.network(dtype)
    # Blocks below ``layer`` are replayed. So is block ``layer`` when the delta is added to
    # its output (MEMIT's z): the hook adds it to the replayed output. Where the delta goes
    # inside the block (its MLP's or attention's output), the block runs at every step.
    frozen = layer + 1 if config.target == "block" else layer
    runner = SuffixRunner(model, dtype, rows, frozen_below=frozen)
    keys, v_init = runner.edit_point_state(model, layer, config.target)
    v_norm = v_init.norm(dim=-1)                                   # (requests, points)
    points = edit_points(spec, net, layer, config.target)
    dev = runner.device
    v_norm = v_norm.to(dev)
    state = _Active.start(rows, dev)

    shape = (n_req, len(points), spec.hidden_size)
    stepper = make_stepper(config, shape, v_norm, dev)
    results: list[ValueResult | None] = [None] * n_req
    history: list[list[float]] = [[] for _ in range(n_req)]
    box: dict[str, torch.Tensor] = {}

    def adder(point: int):
        def add_delta(y: torch.Tensor) -> torch.Tensor:
            # Some architectures (OPT) run their MLP on flattened (batch*seq, d) tokens.
            y3 = y.reshape(state.n_rows, -1, y.shape[-1])
            bumped = y3[:, :1] + box["delta"][state.row_slot, point].to(y.dtype)[:, None, :]
            return torch.cat([bumped, y3[:, 1:]], dim=1).reshape(y.shape)

        return add_delta

    kl_init = None
    with ExitStack() as hooks:
        for point, module in enumerate(points):
            hooks.enter_context(edit_output(module, adder(point)))
        for step in range(config.steps):
            delta = box["delta"] = stepper.trial()
            h = runner.hidden()
            all_logp = torch.log_softmax(model.logits(h[state.read_rows, state.read_pos], dtype).float(), dim=-1)
            n_tgt = state.tgt_slot.numel()
            logp = all_logp[:n_tgt].gather(1, state.tgt_tok[:, None]).squeeze(1)
            kl_logp = all_logp[n_tgt:]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            n_act = state.active.numel()
            nll = torch.zeros(n_act, device=dev).index_add(0, state.tgt_slot, -(logp * state.tgt_w))
            kl_terms = F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)
            kl = torch.zeros(n_act, device=dev).index_add(0, state.kl_slot, kl_terms) / state.kl_per_request
            decay = config.weight_decay * (delta.norm(dim=-1) / v_norm[state.active] ** 2).sum(-1)
            loss = nll + config.kl_factor * kl + decay                 # (active requests,)
            with torch.no_grad():
                done = _finished(config, rows.n_rewrite, state, logp.detach(), loss.detach(), step)
                probs = torch.zeros(n_act, device=dev).index_add(0, state.tgt_slot, logp.detach().exp() * state.tgt_w)
            for slot, request in enumerate(state.active.tolist()):
                history[request].append(float(loss[slot].detach()))
                if done[slot]:
                    best = stepper.best(slot, delta, float(loss[slot].detach()))
                    results[request] = ValueResult(
                        delta=best[-1].float().clone(), v_init=v_init[request, -1],
                        key_prompt=keys[request, 0].clone(), key_mean=keys[request].mean(0),
                        steps=step + 1, losses=history[request], target_prob=float(probs[slot]),
                    )
            if bool(done.all()):
                break
            stepper.zero_grad()
            loss.sum().backward()  # finished requests take this step too, then leave the batch
            stepper.observe(delta, loss.detach())
            if bool(done.any()):
                keep = ~done
                kl_init = kl_init[keep[state.kl_slot]]
                runner.select(keep[state.row_slot])
                state = state.keep(keep, rows, dev)
                stepper.keep(keep)

    runner.cache = None
    return [r for r in results if r is not None]


def _finished(config: ValueConfig, n_rewrite: int, state, logp, loss, step: int) -> torch.Tensor:
    """Which active requests stop after this step: the last step, a total loss below
    ``stop_loss`` (ROME), or every template giving the target at least ``stop_prob``."""
    if step == config.steps - 1:
        return torch.ones_like(loss, dtype=torch.bool)
    done = loss < config.stop_loss
    if config.stop_prob is not None:
        # per-row mean NLL of the target tokens (tgt_w is 1/(len * n_rewrite) per token)
        row_nll = torch.zeros(state.n_rows, device=logp.device).index_add(
            0, state.tgt_row, -logp * state.tgt_w * n_rewrite
        )
        ok = (torch.exp(-row_nll) >= config.stop_prob) | ~state.is_rewrite
        failing = torch.zeros(done.shape, device=ok.device).index_add(0, state.row_slot, (~ok).float())
        done = done | (failing == 0)
    return done


@dataclass
class _Active:
    """Index maps of the requests still being optimised, in the runner's current row order."""

    active: torch.Tensor      # request index of each slot of ``delta``
    row_slot: torch.Tensor    # (rows,) slot of each row's request
    is_rewrite: torch.Tensor  # (rows,) a row with target tokens (not a KL-only row)
    tgt_row: torch.Tensor     # (targets,) row of each supervised token, in current row numbering
    tgt_slot: torch.Tensor
    tgt_pos: torch.Tensor
    tgt_tok: torch.Tensor
    tgt_w: torch.Tensor
    kl_slot: torch.Tensor     # (kl rows,) slot of each KL row
    read_rows: torch.Tensor   # rows and positions whose logits a step reads: targets, then KL rows
    read_pos: torch.Tensor
    kl_per_request: int
    row_ids: torch.Tensor     # original row index of each current row

    @property
    def n_rows(self) -> int:
        return int(self.row_slot.numel())

    @classmethod
    def start(cls, rows: _Rows, dev) -> "_Active":
        return cls._build(rows, torch.arange(rows.n_requests), torch.arange(rows.owner.numel()), dev)

    def keep(self, keep: torch.Tensor, rows: _Rows, dev) -> "_Active":
        kept_rows = self.row_ids[keep.cpu()[self.row_slot.cpu()]]
        return self._build(rows, self.active[keep.cpu()], kept_rows, dev)

    @classmethod
    def _build(cls, rows: _Rows, active: torch.Tensor, row_ids: torch.Tensor, dev) -> "_Active":
        slot_of = torch.full((rows.n_requests,), -1, dtype=torch.long)
        slot_of[active] = torch.arange(active.numel())
        new_index = torch.full((rows.owner.numel(),), -1, dtype=torch.long)
        new_index[row_ids] = torch.arange(row_ids.numel())
        tgt_keep = new_index[rows.tgt_rows] >= 0
        tgt_row = new_index[rows.tgt_rows[tgt_keep]]
        has_target = torch.zeros(rows.owner.numel(), dtype=torch.bool)
        has_target[rows.tgt_rows] = True        # a template row may also carry a KL read
        kl_orig = rows.kl_rows[new_index[rows.kl_rows] >= 0]
        kl_row = new_index[kl_orig]
        row_slot = slot_of[rows.owner[row_ids]]
        tgt_pos = rows.tgt_pos[tgt_keep]
        return cls(
            active=active, row_slot=row_slot.to(dev), is_rewrite=has_target[row_ids].to(dev),
            tgt_row=tgt_row.to(dev), tgt_slot=row_slot[tgt_row].to(dev), tgt_pos=tgt_pos.to(dev),
            tgt_tok=rows.tgt_tok[tgt_keep].to(dev), tgt_w=rows.tgt_weight[tgt_keep].to(dev),
            kl_slot=row_slot[kl_row].to(dev),
            read_rows=torch.cat([tgt_row, kl_row]).to(dev),
            read_pos=torch.cat([tgt_pos, torch.zeros_like(kl_row)]).to(dev),
            kl_per_request=max(1, rows.kl_rows.numel() // max(1, rows.n_requests)), row_ids=row_ids,
        )
