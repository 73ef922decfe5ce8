"""Neuron promotion (Geva et al., EMNLP 2022): switch on FFN neurons whose value vectors write safe words.

An MLP's output is a sum of value vectors (columns of its output matrix), each scaled by
its neuron's activation. Projected through the output head, a value vector is a
distribution over the vocabulary: the words it *promotes*. Geva et al. picked value
vectors of GPT-2 whose top words were non-toxic and set their activations to a constant
at every position, which roughly halved toxicity with little effect on perplexity.

Here the words come from the requests instead of hand inspection. Each request carries
a safe response (``target_new``) and an unsafe one (``target_true``); a token's weight is
its log-odds of appearing in the safe rather than the unsafe texts (add-one smoothed),
so words of refusal and care count for, words of the harmful answers against. Every
value vector of the searched layers is projected to vocabulary logits, standardised, and
scored by the weighted mean over those tokens; the ``n_neurons`` best are promoted: their
activation becomes ``level`` at every position.

The change is a :class:`PromotedNeurons` addition per layer (``"ffn.promote"``), hooked
on the MLP module: it adds ``Σ_i (level − a_i(x)) · v_i``, where ``a_i(x)`` is the
neuron's own activation, so the neuron outputs exactly ``level · v_i``. It cannot be
merged into a plain checkpoint (a gated MLP without biases has no constant neuron).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import ClassVar, Sequence

import torch

from lmpatch.errors import InvalidRequestError, PatchError
from lmpatch.methods.neurons import GATED, GATED_FUSED, FFNNeurons, MlpForm, mlp_form
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.model.spec import from_param_layout
from lmpatch.patch import ModuleAddition, Patch, register_addition
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@register_addition
class PromotedNeurons(FFNNeurons):
    """Existing neurons of one MLP held at a constant activation ``level``.

    Stores the neurons' own input rows (``keys``, and ``ups`` for gated MLPs) so that
    their current activation can be taken out, and their value vectors.
    """

    type_name = "ffn.promote"
    mergeable: ClassVar[bool] = False

    def __init__(self, form: MlpForm, keys: torch.Tensor, values: torch.Tensor, level: float, **kw):
        super().__init__(form, keys, values, **kw)
        self.level = float(level)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> "PromotedNeurons":
        return cls(MlpForm(**config["form"]), state["keys"], state["values"], config["level"],
                   key_bias=state.get("key_bias"), ups=state.get("ups"), up_bias=state.get("up_bias"))

    def config(self) -> dict:
        return {**super().config(), "level": self.level}

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        return (self.level - self.activations(x)) @ self.values.to(x.dtype)

    def merge_into(self, host) -> None:  # FFNNeurons would merge new units, which is wrong here
        raise PatchError("Promoted neurons hold a constant activation; a plain checkpoint cannot express that.")


@dataclass(frozen=True)
class PromoteHparams:
    """Geva et al. promote 10 value vectors of GPT-2's upper layers to a constant 3; the
    level here is in the host MLP's own activation units (SiLU(gate)·up for Llama)."""

    n_neurons: int = 10
    level: float = 3.0
    layers: tuple[int, ...] | None = None    # None: the upper half of the model
    min_count: int = 2                       # tokens seen fewer times in all texts are ignored

    def check(self) -> None:
        if self.n_neurons < 1:
            raise InvalidRequestError("promote n_neurons must be positive.")
        if not math.isfinite(self.level):
            raise InvalidRequestError("promote level must be a finite number.")
        if self.min_count < 1:
            raise InvalidRequestError("promote min_count must be at least 1.")


def token_weights(model: LoadedModel, requests: Sequence[EditRequest], min_count: int) -> dict[int, float]:
    """Log-odds (add-one) of each token appearing in the safe rather than the unsafe texts."""
    tok = model.tokenizer
    safe: Counter[int] = Counter()
    unsafe: Counter[int] = Counter()
    for r in requests:
        safe.update(tok(" " + r.target_new, add_special_tokens=False)["input_ids"])
        unsafe.update(tok(" " + r.target_true, add_special_tokens=False)["input_ids"])
    n_safe, n_unsafe = sum(safe.values()), sum(unsafe.values())
    vocab = set(safe) | set(unsafe)
    out = {}
    for t in vocab:
        if safe[t] + unsafe[t] < min_count:
            continue
        out[t] = math.log((safe[t] + 1) / (n_safe + len(vocab))) - math.log((unsafe[t] + 1) / (n_unsafe + len(vocab)))
    return out


def _rows(module) -> torch.Tensor:
    """A projection's weight with one row per MLP neuron (input side: out x in; output side: transposed)."""
    return from_param_layout(module, module.weight.detach()).float()


def _value_vectors(model: LoadedModel, layer: int) -> torch.Tensor:
    """The layer's value vectors, one row per neuron: (mlp width, d)."""
    return _rows(model.spec.mlp_out(model.model, layer)).T


def neuron_scores(model: LoadedModel, layers: Sequence[int], weights: dict[int, float]) -> torch.Tensor:
    """(len(layers), width): each value vector's weighted mean standardised logit over the tokens."""
    ids = torch.tensor(sorted(weights), dtype=torch.long)
    w = torch.tensor([weights[int(t)] for t in ids], dtype=torch.float32)
    w = w / w.abs().sum()
    rows = []
    net = model.network(None)
    with torch.no_grad():
        for layer in layers:
            values = _value_vectors(model, layer)
            scores = []
            for chunk in values.split(512):
                logits = model.spec.logits(net, chunk.to(model.input_device, next(net.parameters()).dtype)).float().cpu()
                z = (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, keepdim=True).clamp_min(1e-6)
                scores.append(z[:, ids] @ w)
            rows.append(torch.cat(scores))
    return torch.stack(rows)


def _neuron_rows(model: LoadedModel, form: MlpForm, neurons: list[int]) -> dict[str, torch.Tensor]:
    """The chosen neurons' input rows and value vectors, in FFNNeurons' math layout."""
    host = model.model.get_submodule(form.place)
    idx = torch.tensor(neurons, dtype=torch.long)

    def rows(name: str) -> torch.Tensor:
        return _rows(host.get_submodule(name))

    values = rows(form.out).T[idx]
    key_rows = rows(form.key)
    parts: dict[str, torch.Tensor] = {"values": values}
    if form.kind == GATED_FUSED:
        half = key_rows.shape[0] // 2
        gate, up = (key_rows[:half], key_rows[half:]) if form.gate_first else (key_rows[half:], key_rows[:half])
        parts["keys"], parts["ups"] = gate[idx], up[idx]
    else:
        parts["keys"] = key_rows[idx]
        if form.kind == GATED:
            parts["ups"] = rows(form.up)[idx]
            if form.up_bias:
                parts["up_bias"] = host.get_submodule(form.up).bias.detach().float()[idx]
    if form.key_bias:
        parts["key_bias"] = host.get_submodule(form.key).bias.detach().float()[idx]
    return parts


def apply_promote(model: LoadedModel, requests: Sequence[EditRequest], hp: PromoteHparams) -> Patch:
    """Promote the value vectors that best write the safe responses' words over the unsafe ones'."""
    hp.check()
    requests = list(requests)
    missing = [r.prompt for r in requests if not r.target_true]
    if not requests or missing:
        raise InvalidRequestError(
            "Neuron promotion weighs words of safe (target_new) against unsafe (target_true) responses; "
            + (f"{missing[0][:60]!r} has no unsafe response." if missing else "give at least one request.")
        )
    spec = model.spec
    layers = (sorted({spec.check_layer(x) for x in hp.layers}) if hp.layers is not None
              else list(range(spec.n_layers // 2, spec.n_layers)))
    weights = token_weights(model, requests, hp.min_count)
    if not weights:
        raise InvalidRequestError(f"No token occurs {hp.min_count} times in the responses; lower min_count.")
    scores = neuron_scores(model, layers, weights)
    top = torch.topk(scores.flatten(), min(hp.n_neurons, scores.numel())).indices
    chosen: dict[int, list[int]] = {}
    for flat in top.tolist():
        row, col = divmod(flat, scores.shape[1])
        chosen.setdefault(layers[row], []).append(col)
    parts = []
    for layer, neurons in sorted(chosen.items()):
        form = mlp_form(model.model, spec, layer)
        rows = _neuron_rows(model, form, neurons)
        module = PromotedNeurons(form, rows.pop("keys"), rows.pop("values"), hp.level, **rows)
        parts.append(ModuleAddition.of(form.place, module))
    tok = model.tokenizer
    best = sorted(weights, key=weights.get, reverse=True)[:10]
    info = {"neurons": {str(k): v for k, v in sorted(chosen.items())},
            "top_scores": [round(float(scores.flatten()[i]), 3) for i in top.tolist()],
            "safest_tokens": [tok.decode([t]) for t in best]}
    log.debug("promote: %s", info)
    return Patch(parts=parts, method="promote", model_fingerprint=model.fingerprint, model_name=model.name,
                 hparams=asdict(hp), requests=requests, metrics={"edit": info})


register(Method(
    name="promote", aliases=("neuron-promotion",),
    summary="Neuron promotion: FFN value vectors that write safe words over unsafe ones, held switched on",
    hparams=PromoteHparams, edit=apply_promote, produces=frozenset({"module_additions"}),
    paper="Geva et al., Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the Vocabulary Space, EMNLP 2022",
))
