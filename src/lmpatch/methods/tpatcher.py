"""T-Patcher: a few neurons added to a late FFN per edit (Huang et al., ICLR 2023).

The model keeps every weight. Each edit adds a *patch*: one or a few neurons in the FFN
of one late layer (the paper's is the last; here 0.8 of the depth by default, see
:class:`TPatcherHparams`), trained so that

* the edit holds: teacher-forced cross-entropy of the new target (``L_edit``);
* each neuron fires on its edit input: its score ``s = key·x + b`` there is high
  (``L_act = mean exp(act_margin - s_edit)``);
* it stays silent elsewhere: on a *memory* of other inputs its score is below
  ``memory_margin`` (-3) and at least ``gap_margin`` (3) below its edit score
  (``L_mem``, two hinge terms).

Loss = ``L_edit + alc·L_act + mlc·L_mem``, Adam, at most ``steps`` steps. The paper stops
once the edit holds and ``L_act < stop_act_loss``. On SmolLM2 that rule stopped after ~8
steps with memory scores still up to 10 (the neuron fired on most memory inputs;
locality 0.25 on 10 ``counterfact-train`` records, sequential). So training also goes
on until every memory score is at most ``stop_memory_score`` (0: silent), and ``L_edit``
stops pulling once the target's NLL is below ``edit_floor``, so the value does not keep
growing meanwhile (locality 0.85 on the same records, reliability 1.0).

Neurons. A key starts at ``amplify · q / ‖q‖²`` with q the FFN input at the edit input,
so its score there starts at ``amplify`` (10) whatever the scale of q; the value starts
at zero (the model is unchanged until training moves it). The paper adds neurons until
the edit holds (at most 5). A teacher-forced target of n tokens is n next-token
predictions, each read at its own position, so here neuron j is keyed on the FFN input
at the position that predicts target token j (at most ``max_neurons``; the prompt's last
token is the first): each is one key -> value memory, as in the paper's single-token
setting.

Activation. The paper's neurons are ``ReLU(q·k + b)·v``. Here a neuron computes what the
host's own hidden units compute (GELU for GPT-2, ``SiLU(gate·x)·(up·x)`` for Llama), so
the patch can be merged into a plain checkpoint exactly (:mod:`lmpatch.methods.neurons`).
The score is the pre-activation (the gate's, in a gated MLP). Below -3, GELU is ~0
(-0.004) and SiLU -0.14 of the up term, so "silent" means near zero rather than exactly
zero; gated MLPs without biases (Llama) also have no neuron bias, so the threshold lives
in the key.

Memory. The FFN inputs at every token of the prompts (and neighbourhood probes) of
``memory_prompts`` ``counterfact-train`` records: short factual prompts like the ones
locality is measured on, never one that is evaluated or tuned on, and none mentioning the
edit's subject (:mod:`lmpatch.methods.negatives`); optionally (``related``) training
prompts of the edited relation; and the FFN input at the last token of every earlier edit
applied to the model and of the earlier requests of the same call: in the sequential
regime earlier edits are natural memory, so a new patch does not fire on them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.hparams import recorded
from lmpatch.methods.negatives import memory_texts, related_prompts
from lmpatch.methods.neuron_train import hooked, host_inputs, nll_and_fixed, record_below, replaying
from lmpatch.methods.neurons import PLAIN, FFNNeurons, MlpForm, mlp_form
from lmpatch.methods.registry import Method, register
from lmpatch.methods.teacher import TARGET_NEW, target_batch
from lmpatch.model.loading import LoadedModel
from lmpatch.model.stamp import weights_stamp
from lmpatch.patch import ModuleAddition, Patch
from lmpatch.request import EditRequest

__all__ = ["TPatcherHparams", "apply_tpatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPatcherHparams:
    """T-Patcher's settings. ``lr``, ``alc``, ``mlc``, the margins, ``max_neurons`` and the
    stopping rule are the paper's; ``amplify`` sets the starting edit score (10) so the
    patch fires from the first step. ``layer_fraction=1.0`` is the paper's last layer.

    Tuned on 20 ``counterfact-train`` records (2000-2019, sequential, re-scored after the
    20th; the memory records 0-255 never hold their neighbourhood prompts), reliability 1.0
    throughout, locality: 64 memory records 0.725 (records 200-219), fixed up rows 0.75,
    256 records 0.825, 256 with whitened keys 0.875 (chosen), 1024 with whitened keys 0.825.
    Trained up rows grew ~30x and made the output large wherever the gate was barely open;
    keys along q fire on most last-layer inputs (they share a dominant direction).

    Round 2, after the memory stopped including evaluated prompts (see
    :mod:`lmpatch.methods.negatives`; CounterFact repeats prompts across records), on 50
    clean ``counterfact-train`` records (5000-5049), reliability 1.0 throughout:

    ===========================================================  ========  ======
    settings                                                      locality  s/edit
    ===========================================================  ========  ======
    round 1's defaults (last layer)                                0.86      5.8
    and 32 related negatives                                       0.88      6.5
    and stop only when every memory score is below -2              0.88      6.6
    related 32, edit_floor 0.3 (a smaller value)                   0.88      5.6
    related 32, layer 24 of 30 (``layer_fraction`` 0.8, defaults)  0.94      11.6
    ===========================================================  ========  ======

    The failures at the last layer were whole neighbourhood probes of the edited relation
    ("The mother tongue of Ferdinand de Saussure is" after editing Raymond Triboulet's):
    at the last layer the prompt's last token mostly encodes the answer about to be given,
    which the edit and its neighbours share, so no key separates them. Six layers down
    the subject is still told apart, at twice the cost per edit (the neuron's effect is
    trained through the layers above it).

    With these defaults, ``counterfact-edit`` records 0–99 (sequential, all re-scored after
    the 100th, ``benchmarks/lifelong.py``): reliability 1.00, generalization 0.11, locality
    0.90, perplexity 25.5 (unedited 23.3), 12.0 s per edit; the last-layer defaults with the
    uncleaned memory gave locality 0.84 at 6.5 s per edit."""

    layer: int | None = None          # None: ``layer_fraction`` of the depth
    layer_fraction: float = 0.8       # 1.0: the paper's last layer (see the docstring)
    max_neurons: int = 5              # per edit: one per predicted target token, at most this many
    amplify: float = 10.0             # a new key scores this much on its edit input
    lr: float = 1e-2
    steps: int = 200
    alc: float = 1.0                  # weight of L_act
    mlc: float = 5.0                  # weight of L_mem
    act_margin: float = 0.0           # L_act = mean exp(act_margin - edit score)
    memory_margin: float = -3.0       # memory scores must be below this ...
    gap_margin: float = 3.0           # ... and this far below the edit score
    stop_act_loss: float = 0.1
    stop_memory_score: float = 0.0    # ... and every memory score at most this (see the class docstring)
    edit_floor: float = 0.05          # L_edit stops pulling below this NLL (keeps the value from growing)
    memory_prompts: int = 256         # negative records whose prompts and neighbours are memory (tuned: see docstring)
    memory_edits: int = 512           # at most this many earlier edits (the latest) as memory
    related: int = 32                 # and this many training prompts of the edit's relation (hard negatives)
    train_ups: bool = False           # gated hosts: also train the up rows (see the module docstring)
    whiten_keys: bool = True          # start keys at Σ⁻¹q (memory second moment), see _new_neurons

    def check(self) -> None:
        if self.max_neurons < 1:
            raise InvalidRequestError(f"T-Patcher max_neurons must be >= 1, got {self.max_neurons}.")
        if not self.lr > 0 or self.steps < 1:
            raise InvalidRequestError(f"T-Patcher needs lr > 0 and steps >= 1, got lr={self.lr}, steps={self.steps}.")
        if not self.amplify > 0:
            raise InvalidRequestError(f"T-Patcher amplify must be positive, got {self.amplify}.")
        if min(self.alc, self.mlc, self.memory_prompts, self.memory_edits, self.related) < 0:
            raise InvalidRequestError("T-Patcher alc, mlc, memory_prompts, memory_edits and related must be >= 0.")


def tpatcher_layer(model: LoadedModel, hp: TPatcherHparams) -> int:
    spec = model.spec
    return spec.check_layer(hp.layer) if hp.layer is not None else spec.depth_layer(hp.layer_fraction)


# --------------------------------------------------------------------------- memory


@dataclass
class _MemoryCache:
    """FFN inputs already computed on the current weights: each memory text's (every
    token) and each earlier edit prompt's (last token). Kept in ``model.stack.solves``
    (the stack's caches derived from the current weights) while ``stamp`` matches, so a
    sequential run computes the memory texts once and each edit prompt once."""

    stamp: tuple
    texts: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)


def _stamp(model: LoadedModel, place: str) -> tuple:
    """What the host's input depends on: every weight (version and storage), every added
    module elsewhere, and how prompts are formatted. Neurons at ``place`` itself act on
    the host's output and leave its input alone."""
    weights = weights_stamp(model.model.parameters())
    others = tuple((a.place, id(a.module)) for a in model.stack.additions() if a.place != place)
    return weights, others, model.format_prompt("")


def _cache(model: LoadedModel, place: str) -> _MemoryCache:
    key = ("t-patcher memory", place)
    stamp = _stamp(model, place)
    found = model.stack.solves.get(key)
    if not isinstance(found, _MemoryCache) or found.stamp != stamp:
        found = _MemoryCache(stamp)
        model.stack.solves[key] = found
    return found


def _inputs(model: LoadedModel, host: torch.nn.Module, texts: list[str], store: dict, last_only: bool) -> list:
    fmt = model.format_prompt
    missing = [t for t in texts if t not in store]
    for t, x in zip(missing, host_inputs(model, host, [fmt(t) for t in missing], last_only=last_only)):
        store[t] = x
    return [store[t] for t in texts]


def memory_inputs(model: LoadedModel, host: torch.nn.Module, place: str, requests: Sequence[EditRequest],
                  hp: TPatcherHparams) -> torch.Tensor:
    """FFN inputs the new neurons must stay silent on, (n, d) float32 CPU."""
    cache = _cache(model, place)
    subjects = [r.subject for r in requests]
    own = {r.prompt for r in requests}
    texts = [] if hp.memory_prompts == 0 else [
        t for t in memory_texts(hp.memory_prompts) if not any(s in t for s in subjects)
    ]
    related = list(dict.fromkeys(p for r in requests for p, _ in related_prompts(r, hp.related, 0)))
    earlier = list(dict.fromkeys(r.prompt for e in model.stack for r in e.requests if r.prompt not in own))
    earlier = earlier[-hp.memory_edits:] if hp.memory_edits else []
    rows = _inputs(model, host, texts, cache.texts, last_only=False)
    rows += _inputs(model, host, related, {}, last_only=False)  # an edit's own: not kept for later ones
    rows += _inputs(model, host, earlier, cache.prompts, last_only=True)
    return torch.cat(rows) if rows else torch.zeros(0, model.spec.hidden_size)


# --------------------------------------------------------------------------- editing


def apply_tpatcher(model: LoadedModel, requests: Sequence[EditRequest], hp: TPatcherHparams) -> Patch:
    """One ``ffn.neurons`` module at the chosen layer's MLP, holding each request's neurons
    (requests are edited one after another, each seeing the earlier ones)."""
    hp.check()
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("T-Patcher needs at least one edit request.")
    layer = tpatcher_layer(model, hp)
    form = mlp_form(model.model, model.spec, layer)
    host = model.model.get_submodule(form.place)
    memory = memory_inputs(model, host, form.place, requests, hp).to(model.input_device)
    patches: list[FFNNeurons] = []
    infos = []
    for request in requests:
        t0 = time.perf_counter()
        module, queries, info = _edit_one(model, layer, form, host, request, hp, memory, patches)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        log.debug("t-patcher edit %r: %s", request.prompt, info)
        patches.append(module)
        infos.append(info)
        memory = torch.cat([memory, queries[:1].to(memory.device)])  # later edits keep off this input
    merged = _concat(form, patches)
    return Patch(
        parts=[ModuleAddition.of(form.place, merged)], method="t-patcher", model_fingerprint=model.fingerprint,
        model_name=model.name, hparams=recorded(hp, layer=layer), requests=requests,
        metrics={"edit": {"layer": layer, "neurons": len(merged), "memory_inputs": int(memory.shape[0]),
                          "requests": infos}},
    )


def _new_neurons(form: MlpForm, queries: torch.Tensor, amplify: float, memory: torch.Tensor | None) -> FFNNeurons:
    """Keys scoring ``amplify`` on their query, ups scoring 1 (gated), zero values.

    With ``memory``, a key is whitened by the memory's second moment, Σ⁻¹q (scaled to
    score ``amplify`` on q), instead of q itself: last-layer FFN inputs share a dominant
    direction (on SmolLM2 an unrelated prompt's input x gives q·x/‖q‖² ≈ 1), so a key
    along q fires on almost everything, while Σ⁻¹q scores typical inputs low from the start.
    """
    direction = queries
    if memory is not None and len(memory) > 0:
        m = memory.to(torch.float64)
        sigma = m.T @ m / len(m)
        sigma += 1e-2 * sigma.diagonal().mean() * torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
        direction = torch.linalg.solve(sigma, queries.to(torch.float64).T).T.to(queries.dtype)
    key = direction / (direction * queries).sum(-1, keepdim=True).clamp_min(1e-12)
    unit = queries / queries.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
    k = queries.shape[0]
    zeros = torch.zeros(k)
    return FFNNeurons(
        form, amplify * key, torch.zeros_like(queries),
        key_bias=zeros if form.key_bias else None,
        ups=None if form.kind == PLAIN else unit.clone(),
        up_bias=zeros.clone() if form.up_bias else None,
    )


def _edit_one(model: LoadedModel, layer: int, form: MlpForm, host: torch.nn.Module, request: EditRequest,
              hp: TPatcherHparams, memory: torch.Tensor, earlier: list[FFNNeurons]):
    batch = target_batch(model, [request], TARGET_NEW)
    with hooked([host] * len(earlier), earlier):
        blocks, recorded, (x,) = record_below(model, layer, batch, [host])
    n = min(len(batch.pos_cols), hp.max_neurons)
    queries = x[0, batch.pos_cols[:n]].to(model.input_device)
    module = _new_neurons(form, queries, hp.amplify, memory if hp.whiten_keys else None).to(model.input_device)
    if not hp.train_ups and module.ups is not None:
        module.ups.requires_grad_(False)
        if module.up_bias is not None:
            module.up_bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=hp.lr)
    own = torch.arange(n, device=queries.device)
    history = []
    with replaying(blocks, recorded), hooked([host] * (len(earlier) + 1), [*earlier, module]):
        for step in range(hp.steps):
            opt.zero_grad()
            l_edit, fixed = nll_and_fixed(model, batch)
            edit_scores = module.scores(queries)[own, own]
            l_act = torch.exp(hp.act_margin - edit_scores).mean()
            mem_scores = module.scores(memory)
            l_mem = (torch.relu(mem_scores - hp.memory_margin).mean()
                     + torch.relu(mem_scores - edit_scores[None] + hp.gap_margin).mean()) if len(memory) else l_act * 0
            mem_max = mem_scores.max().item() if len(memory) else -math.inf
            history.append((l_edit.item(), l_act.item(), l_mem.item(), fixed))
            if fixed and history[-1][1] < hp.stop_act_loss and mem_max <= hp.stop_memory_score:
                break
            loss = hp.alc * l_act + hp.mlc * l_mem
            if history[-1][0] > hp.edit_floor:
                loss = loss + l_edit
            if not math.isfinite(loss.item()):
                raise InvalidRequestError(f"T-Patcher diverged on {request.prompt!r}; lower lr (now {hp.lr}).")
            loss.backward()
            opt.step()
    module.requires_grad_(False)
    with torch.no_grad():
        edit_scores = module.scores(queries)[own, own]
        mem_max = float(module.scores(memory).max()) if len(memory) else None
    first, last = history[0], history[-1]
    info = {
        "neurons": n, "steps": len(history), "fixed": last[3],
        "initial_loss": round(first[0], 4), "final_loss": round(last[0], 4),
        "act_loss": round(last[1], 4), "memory_loss": round(last[2], 4),
        "edit_score_min": round(float(edit_scores.min()), 3),
        "memory_score_max": None if mem_max is None else round(mem_max, 3),
    }
    return module.cpu(), queries.cpu(), info


def _concat(form: MlpForm, modules: list[FFNNeurons]) -> FFNNeurons:
    def cat(name: str):
        parts = [getattr(m, name) for m in modules]
        return None if parts[0] is None else torch.cat([p.detach().float().cpu() for p in parts])

    return FFNNeurons(form, cat("keys"), cat("values"), key_bias=cat("key_bias"), ups=cat("ups"),
                      up_bias=cat("up_bias"))


register(Method(
    name="t-patcher", aliases=("tpatcher", "T-Patcher", "transformer-patcher"),
    summary="T-Patcher: a few trained neurons added to a late FFN per edit, silent on other inputs (Huang et al. 2023)",
    hparams=TPatcherHparams, edit=apply_tpatcher, regimes=frozenset({"single", "sequential"}),
    produces=frozenset({"module_additions"}),
    paper="Huang et al., Transformer-Patcher: One Mistake Worth One Neuron, ICLR 2023",
))
