"""Extra FFN neurons, computed in the host MLP's own form, so a plain checkpoint can hold them.

T-Patcher and CaliNET both edit by *adding* neurons to a layer's feed-forward network
while every original weight stays frozen. This module is the one mechanism they share:

* :func:`mlp_form` reads how a layer's MLP computes (which child projections, gated or
  not, which activation), checking the reading against the MLP's own output on a probe;
* :class:`FFNNeurons` (``"ffn.neurons"``) is the added module: hooked on the MLP module,
  it adds ``Σ_i value_i · act(key_i·x + b_i) [· (up_i·x + c_i)]`` to the MLP output, i.e.
  exactly what ``k`` more hidden units of that MLP would add;
* :meth:`FFNNeurons.merge_into` widens the host's projections by those units, and
  :meth:`FFNNeurons.after_merge` pads every other layer with zero units so the merged
  checkpoint has one MLP width (what a Hugging Face config can describe).

The forms:

* ``plain`` (GPT-2, GPT-J, GPT-NeoX): ``out(act(in x))``; a neuron is a row of ``in`` (and
  its bias, when ``in`` has one) and a column of ``out``;
* ``gated`` (Llama, Mistral, Qwen2, Gemma): ``down(act(gate x) * up x)``; a neuron is a row
  of ``gate``, a row of ``up`` and a column of ``down``;
* ``gated_fused`` (Phi-3): as ``gated`` with gate and up stacked in one ``gate_up`` matrix.

OPT registers ``fc1``/``fc2`` directly on the decoder block, so there is no module whose
input is the MLP input *and* whose output is the MLP output; one forward hook cannot add
neurons there, and :func:`mlp_form` refuses it with one message.

A neuron's *score* is its pre-activation ``key·x + b`` (the gate's, for gated MLPs): the
editors train it to be high on the edit input and low elsewhere.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lmpatch.errors import LmpatchError
from lmpatch.model.spec import ModelSpec, is_conv1d, linear_dims
from lmpatch.patch import AddedModule, register_addition

__all__ = ["FFNNeurons", "MlpForm", "mlp_form", "activation"]

log = logging.getLogger(__name__)

PLAIN, GATED, GATED_FUSED = "plain", "gated", "gated_fused"
FORMS = (PLAIN, GATED, GATED_FUSED)
# Config keys that name the MLP activation, by family; tried before the full list.
_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function")
# Config keys that hold the MLP width (the same list the spec uses as a tie-breaker).
_WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")


def activation(name: str) -> nn.Module:
    """The ``transformers`` activation called ``name`` (what the host's config names)."""
    from transformers.activations import ACT2FN

    try:
        return ACT2FN[name]
    except KeyError:
        raise LmpatchError(f"Unknown activation {name!r} in an ffn.neurons addition; upgrade transformers.") from None


@dataclass(frozen=True)
class MlpForm:
    """How one layer's MLP computes, as paths relative to the MLP module (``place``)."""

    kind: str                 # plain | gated | gated_fused
    place: str                # the MLP module the neurons are hooked on
    key: str                  # plain: the input projection; gated: gate; fused: gate_up
    out: str                  # the output projection
    activation: str           # an ACT2FN name
    up: str = ""              # gated only
    key_bias: bool = False    # whether the projection feeding the activation has a bias
    up_bias: bool = False
    gate_first: bool = True   # gated_fused: gate rows come before up rows

    def config(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- reading a layer's MLP


def mlp_form(net: nn.Module, spec: ModelSpec, layer: int) -> MlpForm:
    """The form of ``layer``'s MLP in ``net``, checked against the MLP's output on a probe."""
    lspec = spec.layers[spec.check_layer(layer)]
    place, _, out_name = lspec.mlp_out.rpartition(".")
    if not place or place == lspec.block:
        raise LmpatchError(
            f"Layer {layer}'s MLP projections sit directly on the decoder block '{lspec.block}' (OPT-style), "
            "so no single module sees the MLP input and produces the MLP output; added FFN neurons "
            "(t-patcher, calinet) need such a module and do not support this architecture."
        )
    ins = []
    for path in lspec.mlp_in:
        parent, _, name = path.rpartition(".")
        if parent != place:
            raise LmpatchError(f"The MLP input projection '{path}' is not a child of the MLP module '{place}'.")
        ins.append(name)
    host = net.get_submodule(place)
    names = _activation_names(host, _config(net))
    candidates = []
    for act in names:
        if len(ins) == 1 and _out_width(host, ins[0]) == 2 * _in_width(host, out_name):
            candidates += [MlpForm(GATED_FUSED, place, ins[0], out_name, act, gate_first=g) for g in (True, False)]
        elif len(ins) == 1:
            candidates.append(MlpForm(PLAIN, place, ins[0], out_name, act))
        elif len(ins) == 2:
            candidates += [MlpForm(GATED, place, a, out_name, act, up=b) for a, b in (ins, ins[::-1])]
    matches = [f for f in candidates if _matches(host, f)]
    if not matches:
        raise LmpatchError(
            f"Could not read the MLP at '{place}' as out(act(in x)) or down(act(gate x) * up x) with any "
            f"activation in {names[:6]}; added FFN neurons do not support this architecture."
        )
    form = matches[0]
    key_mod = host.get_submodule(form.key)
    bias = getattr(key_mod, "bias", None) is not None
    up_bias = bool(form.up) and getattr(host.get_submodule(form.up), "bias", None) is not None
    if form.kind == GATED_FUSED and bias:
        raise LmpatchError(f"The fused gate/up projection at '{place}.{form.key}' has a bias; added FFN "
                           "neurons support fused projections without one (as in Phi-3).")
    return MlpForm(**{**form.config(), "key_bias": bias, "up_bias": up_bias})


def _config(net: nn.Module):
    cfg = getattr(net, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _activation_names(host: nn.Module, cfg: Any) -> list[str]:
    """Activation names to try: the config's first, then every name matching the host's
    activation module on a probe (the module itself is not stored in a patch, its name is)."""
    from transformers.activations import ACT2FN

    named = [getattr(cfg, k) for k in _ACT_KEYS if isinstance(getattr(cfg, k, None), str)]
    act_mods = [m for m in host.children() if not list(m.parameters()) and linear_dims(m) is None
                and not isinstance(m, nn.Dropout)]
    probe = torch.linspace(-6, 6, 97)
    found = []
    for mod in act_mods[:1]:
        with torch.no_grad():
            try:
                want = mod(probe)
            except Exception:  # noqa: BLE001 - not an activation after all
                continue
        for name in [*named, *ACT2FN.keys()]:
            try:
                got = ACT2FN[name](probe)
            except Exception:  # noqa: BLE001 - activations with parameters or odd signatures
                continue
            if got.shape == want.shape and torch.equal(got, want) and name not in found:
                found.append(name)
    return found + [n for n in named if n not in found]


def _out_width(host: nn.Module, name: str) -> int:
    return linear_dims(host.get_submodule(name))[1]


def _in_width(host: nn.Module, name: str) -> int:
    return linear_dims(host.get_submodule(name))[0]


def _compute(host: nn.Module, form: MlpForm, x: torch.Tensor) -> torch.Tensor:
    """The MLP output as ``form`` says it is computed, from the host's own projections."""
    act = activation(form.activation)
    key = host.get_submodule(form.key)(x)
    if form.kind == PLAIN:
        hidden = act(key)
    elif form.kind == GATED:
        hidden = act(key) * host.get_submodule(form.up)(x)
    else:
        gate, up = key.chunk(2, dim=-1)
        if not form.gate_first:
            gate, up = up, gate
        hidden = act(gate) * up
    return host.get_submodule(form.out)(hidden)


def _matches(host: nn.Module, form: MlpForm) -> bool:
    p = next(host.parameters())
    d = _in_width(host, form.key)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(0)).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        want = host.forward(x)  # not host(x): added modules hooked on the MLP must not count
        want = want[0] if isinstance(want, tuple) else want
        got = _compute(host, form, x)
    scale = float(want.float().abs().max()) + 1e-6
    return got.shape == want.shape and float((got.float() - want.float()).abs().max()) <= 1e-3 * scale


# --------------------------------------------------------------------------- the added module


@register_addition
class FFNNeurons(AddedModule):
    """``k`` extra hidden units of one MLP, hooked on the MLP module.

    Tensors (math layout, one row per neuron): ``keys`` (k × d) feed the activation
    (plain: input rows; gated: gate rows), ``ups`` (k × d) the gated MLP's up rows,
    ``key_bias``/``up_bias`` (k) only where the host's projection has a bias (so merging
    stays exact), and ``values`` (k × d) are the neurons' output vectors (columns of the
    output projection). Parameters, so an editor can train this very module.
    """

    type_name = "ffn.neurons"
    mergeable: ClassVar[bool] = True

    def __init__(self, form: MlpForm, keys: torch.Tensor, values: torch.Tensor, *,
                 key_bias: torch.Tensor | None = None, ups: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None):
        super().__init__()
        if form.kind not in FORMS:
            raise ValueError(f"unknown MLP form {form.kind!r}")
        k, d = keys.shape
        if values.shape != (k, d):
            raise ValueError(f"values must be {k} x {d}, got {tuple(values.shape)}")
        if (ups is not None) != (form.kind != PLAIN):
            raise ValueError("ups are needed for gated MLPs and only for them")
        if (key_bias is not None) != form.key_bias or (up_bias is not None) != form.up_bias:
            raise ValueError("biases must be given exactly where the host's projections have them")
        self.form = form
        self.act = activation(form.activation)
        self.keys = nn.Parameter(keys.detach().float().clone())
        self.values = nn.Parameter(values.detach().float().clone())
        self.key_bias = None if key_bias is None else nn.Parameter(key_bias.detach().float().clone())
        self.ups = None if ups is None else nn.Parameter(ups.detach().float().clone())
        self.up_bias = None if up_bias is None else nn.Parameter(up_bias.detach().float().clone())

    # -- storage ------------------------------------------------------------------------
    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> "FFNNeurons":
        form = MlpForm(**config["form"])
        return cls(form, state["keys"], state["values"], key_bias=state.get("key_bias"),
                   ups=state.get("ups"), up_bias=state.get("up_bias"))

    def config(self) -> dict:
        return {"form": self.form.config()}

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    # -- computing ----------------------------------------------------------------------
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``key·x + b`` (the gate's for gated MLPs), (..., k)."""
        s = x @ self.keys.to(x.dtype).T
        return s + self.key_bias.to(x.dtype) if self.key_bias is not None else s

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """What multiplies each neuron's value vector, (..., k)."""
        a = self.act(self.scores(x))
        if self.ups is not None:
            u = x @ self.ups.to(x.dtype).T
            a = a * (u + self.up_bias.to(x.dtype) if self.up_bias is not None else u)
        return a

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        return self.activations(x) @ self.values.to(x.dtype)

    def hook(self, host: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        new = y + self.contribution(x).to(y.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    # -- merging ------------------------------------------------------------------------
    def merge_into(self, host: nn.Module) -> None:
        """Append the neurons as hidden units of ``host`` (the MLP module): rows of the
        projections feeding the activation, columns of the output projection."""
        f = self.form
        with torch.no_grad():
            if f.kind == GATED_FUSED:
                _grow_fused(host.get_submodule(f.key), self.keys, self.ups, f.gate_first)
            else:
                _grow_rows(host.get_submodule(f.key), self.keys, self.key_bias)
                if f.kind == GATED:
                    _grow_rows(host.get_submodule(f.up), self.ups, self.up_bias)
            _grow_cols(host.get_submodule(f.out), self.values.T)
        if isinstance(getattr(host, "intermediate_size", None), int):
            host.intermediate_size = _in_width(host, f.out)

    @classmethod
    def after_merge(cls, net: nn.Module, spec: ModelSpec) -> None:
        """Give every layer the widest layer's MLP width (zero neurons add exactly zero) and
        write that width into the config, so ``from_pretrained`` builds the same shapes."""
        widths = [linear_dims(net.get_submodule(layer.mlp_out))[0] for layer in spec.layers]
        width = max(widths)
        for i, have in enumerate(widths):
            if have < width:
                form = mlp_form(net, spec, i)
                d = spec.hidden_size
                zeros = torch.zeros(width - have, d)
                bias = torch.zeros(width - have)
                cls(form, zeros, zeros, key_bias=bias if form.key_bias else None,
                    ups=None if form.kind == PLAIN else zeros,
                    up_bias=bias if form.up_bias else None).merge_into(net.get_submodule(form.place))
        cfg = _config(net)
        keys = [k for k in _WIDTH_KEYS if k in cfg.to_dict()]
        if not keys:
            raise LmpatchError(
                f"The {type(cfg).__name__} config has none of {', '.join(_WIDTH_KEYS)}; cannot record the "
                "widened MLP, so the added neurons cannot be merged into a plain checkpoint."
            )
        for key in keys:
            setattr(cfg, key, width)
        log.debug("Merged checkpoint MLP width %d (config %s)", width, ", ".join(keys))


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad))


def _grow_rows(module: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None) -> None:
    """More output units for a projection: ``rows`` (k × in) in math layout, and their bias."""
    w = module.weight
    rows = rows.detach().to(device=w.device, dtype=w.dtype)
    _replace(module, "weight", torch.cat([w, rows.T], dim=1) if is_conv1d(module) else torch.cat([w, rows], dim=0))
    if getattr(module, "bias", None) is not None:
        extra = torch.zeros(rows.shape[0]) if bias is None else bias.detach()
        _replace(module, "bias", torch.cat([module.bias, extra.to(module.bias)]))
    elif bias is not None and bool(bias.ne(0).any()):
        raise LmpatchError("A neuron bias cannot be merged into a projection without a bias.")
    _set_dims(module)


def _grow_cols(module: nn.Module, cols: torch.Tensor) -> None:
    """More input units for a projection: ``cols`` (out × k) in math layout."""
    w = module.weight
    cols = cols.detach().to(device=w.device, dtype=w.dtype)
    _replace(module, "weight", torch.cat([w, cols.T], dim=0) if is_conv1d(module) else torch.cat([w, cols], dim=1))
    _set_dims(module)


def _grow_fused(module: nn.Module, gate: torch.Tensor, up: torch.Tensor, gate_first: bool) -> None:
    """Phi-3's stacked gate/up: new gate rows after the gate half, new up rows after the up half."""
    w = module.weight
    old_gate, old_up = w.chunk(2, dim=0)
    if not gate_first:
        old_gate, old_up = old_up, old_gate
    gate, up = (t.detach().to(device=w.device, dtype=w.dtype) for t in (gate, up))
    halves = [torch.cat([old_gate, gate]), torch.cat([old_up, up])]
    _replace(module, "weight", torch.cat(halves if gate_first else halves[::-1], dim=0))
    if getattr(module, "bias", None) is not None:
        raise LmpatchError("A fused gate/up projection with a bias is not supported by ffn.neurons merging.")
    _set_dims(module)


def _set_dims(module: nn.Module) -> None:
    w = module.weight
    if is_conv1d(module):
        module.nf = w.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
