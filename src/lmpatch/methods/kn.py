"""KN, knowledge neurons (Dai et al., ACL 2022): ROME's weakest baseline, kept honest.

Each MLP hidden unit ("neuron") at the prompt's last token gets an integrated-gradients
attribution for the target token: its activation w̄ times the gradient of P(target) with
respect to it, averaged over the path α·w̄, α ∈ (0, 1] (``steps`` Riemann points, run as
one batch per layer). Neurons above ``threshold`` × the largest attribution are the
fact's knowledge neurons. Then:

* ``mode="edit"``: each neuron's output vector (its column of the MLP output matrix) moves
  by ``lr_scale`` · (E[target] − E[original prediction]), E the input word embeddings;
* ``mode="erase"``: each neuron's output vector is set to zero.

The change is a few columns of a few matrices: stored as low-rank factors (column
vectors times one-hot rows), so it applies and reverts like any other patch. Several
requests are attributed on the unedited model and their changes summed.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.batch import weight_delta
from lmpatch.methods.neuron_attribution import neuron_attributions
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest
from lmpatch.tokens import encode, target_ids

log = logging.getLogger(__name__)

KN_MODES = ("edit", "erase")


@dataclass(frozen=True)
class KNHparams:
    """EasyEdit/ROME's KN settings for GPT-2 XL: 20 integration steps, threshold 0.2,
    ``lr_scale`` 1; refinement over paraphrases is off there too. ``layers`` None = all."""

    steps: int = 20
    threshold: float = 0.2
    lr_scale: float = 1.0
    mode: str = "edit"
    layers: tuple[int, ...] | None = None
    max_neurons: int = 64          # cap per request: a flat attribution must not rewrite a whole layer

    def check(self) -> None:
        if self.mode not in KN_MODES:
            raise LmpatchError(f"Unknown KN mode {self.mode!r}; choose one of {', '.join(KN_MODES)}.")
        if self.steps < 1:
            raise LmpatchError(f"steps must be >= 1, got {self.steps!r}.")
        if not 0.0 < self.threshold <= 1.0:
            raise LmpatchError(f"threshold must be in (0, 1], got {self.threshold!r}.")
        if self.max_neurons < 1:
            raise LmpatchError(f"max_neurons must be >= 1, got {self.max_neurons!r}.")


def attributions(model: LoadedModel, ids: list[int], target: int, layers: Sequence[int], steps: int) -> torch.Tensor:
    """Integrated-gradients attribution of every MLP neuron at the last position of ``ids``
    for predicting ``target``, (len(layers), d_ff) float32
    (:func:`lmpatch.methods.neuron_attribution.neuron_attributions` at one position)."""
    return neuron_attributions(model, ids, [len(ids) - 1], [target], layers, steps)


def apply_kn(model: LoadedModel, requests: Sequence[EditRequest], hp: KNHparams, method: str = "kn") -> Patch:
    hp.check()
    spec = model.spec
    layers = sorted({spec.check_layer(layer) for layer in hp.layers}) if hp.layers is not None else list(range(spec.n_layers))
    if not layers:
        raise LmpatchError("KN needs at least one layer; leave layers unset for all of them.")
    embed = model.model.get_input_embeddings().weight
    columns: dict[int, dict[int, torch.Tensor]] = {}
    infos = []
    for request in requests:
        text = model.format_prompt(request.prompt)
        ids = encode(model.tokenizer, text)
        tgt = target_ids(model.tokenizer, text, request.target_new, ids)
        attr = torch.zeros(len(layers), spec.mlp_size)
        for j, token in enumerate(tgt):  # multi-token targets: average over the target's tokens
            attr += attributions(model, ids + tgt[:j], token, layers, hp.steps) / len(tgt)
        chosen = _select(attr, hp.threshold, hp.max_neurons)
        with torch.no_grad():
            logits = model.forward(input_ids=torch.tensor([ids], device=model.input_device)).logits[0, -1]
        original = int(logits.argmax())
        shift = hp.lr_scale * (embed[tgt[0]] - embed[original]).detach().float().cpu()
        for row, neuron in chosen:
            layer = layers[row]
            w = _out_matrix(model, layer)
            current = columns.setdefault(layer, {}).get(neuron)
            if hp.mode == "erase":
                columns[layer][neuron] = -w[:, neuron].float().cpu()
            else:
                columns[layer][neuron] = shift.clone() if current is None else current + shift
        infos.append({"neurons": len(chosen), "layers": sorted({layers[r] for r, _ in chosen}),
                      "original_token": original, "max_attribution": float(attr.max())})
    return Patch(
        parts=column_deltas(model, columns), method=method, model_fingerprint=model.fingerprint, model_name=model.name,
        hparams=asdict(hp), requests=list(requests), metrics={"edit": {"requests": infos}},
    )


def column_deltas(model: LoadedModel, columns: dict[int, dict[int, torch.Tensor]]) -> list:
    """Weight deltas that add ``columns[layer][neuron]`` (a d-vector) to those neurons' output
    vectors: per layer one low-rank delta, the vectors times one-hot rows."""
    deltas = []
    for layer in sorted(columns):
        neurons = sorted(columns[layer])
        left = torch.stack([columns[layer][i] for i in neurons], dim=1)              # d × k
        right = torch.zeros(len(neurons), model.spec.mlp_size)
        right[torch.arange(len(neurons)), torch.tensor(neurons)] = 1.0              # k × d_ff
        deltas.append(weight_delta(model, layer, left, right))
    return deltas


def erase_columns(model: LoadedModel, neurons: Sequence[tuple[int, int]]) -> list:
    """Deltas that set the output vectors of the (layer, neuron) pairs to zero (the neurons
    then contribute nothing, whatever their activation)."""
    columns: dict[int, dict[int, torch.Tensor]] = {}
    for layer, neuron in neurons:
        columns.setdefault(layer, {})[neuron] = -_out_matrix(model, layer)[:, neuron].float().cpu()
    return column_deltas(model, columns)


def _select(attr: torch.Tensor, threshold: float, cap: int) -> list[tuple[int, int]]:
    """(layer row, neuron) pairs above ``threshold`` × the largest attribution, strongest first."""
    top = float(attr.max())
    if top <= 0:
        return []
    rows, neurons = torch.nonzero(attr > threshold * top, as_tuple=True)
    order = torch.argsort(attr[rows, neurons], descending=True)[:cap]
    return [(int(rows[i]), int(neurons[i])) for i in order]


def _out_matrix(model: LoadedModel, layer: int) -> torch.Tensor:
    """The MLP output matrix of ``layer`` in math layout (d × d_ff), whatever its storage."""
    from lmpatch.model.spec import from_param_layout

    module = model.spec.mlp_out(model.model, layer)
    return from_param_layout(module, module.weight.detach())


register(Method(
    name="kn", summary="KN: knowledge neurons by integrated gradients, edited or erased (Dai et al. 2022)",
    hparams=KNHparams, edit=apply_kn,
    paper="Dai et al., Knowledge Neurons in Pretrained Transformers, ACL 2022",
))
