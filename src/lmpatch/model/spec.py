"""Where things are inside a decoder-only transformer, found from the module tree.

Research code keeps a table of module-path templates per model family
(``transformer.h.{}.mlp.c_proj``...), which breaks on every new architecture. We instead
look at shapes: the decoder blocks are the ModuleList with one entry per layer; inside a
block, the MLP output projection is the one linear map from a wider space back to the
hidden size, the MLP input projections map the hidden size to that width, and the
attention output projection is the linear map back to the hidden size inside the other
sub-module. GPT-2's ``Conv1D`` (weight stored as in x out) is recognised by type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmpatch.errors import LmpatchError


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return ()
    return (Conv1D,)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style projection whose weight is stored transposed (in_features x out_features)."""
    return isinstance(module, _conv1d_type())


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None if it is not one."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        w = module.weight
        return w.shape[0], w.shape[1]
    return None


def to_param_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Turn a delta written as math (out x in) into the module's weight layout."""
    return delta.T if is_conv1d(module) else delta


def from_param_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Read a module's weight as math (out x in), whatever its storage layout."""
    return weight.T if is_conv1d(module) else weight


@dataclass(frozen=True)
class LayerSpec:
    """Module paths of one decoder block."""

    block: str
    attn: str
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str


@dataclass(frozen=True)
class ModelSpec:
    """The map of a causal LM that every editing method and metric works through."""

    model_type: str
    n_layers: int
    hidden_size: int
    mlp_size: int
    base: str
    layers_path: str
    layers: tuple[LayerSpec, ...]
    final_norm: str
    embed: str
    lm_head: str
    tied_embeddings: bool
    logit_softcap: float | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        names = {id(m): n for n, m in model.named_modules()}
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_layers = int(cfg.num_hidden_layers)
        hidden = int(cfg.hidden_size)

        layer_list = _find_layer_list(model, n_layers, hidden)
        if layer_list is None:
            raise LmpatchError(
                f"Could not find {n_layers} decoder blocks with an MLP in this "
                f"{type(model).__name__}; lmpatch edits decoder-only transformers."
            )
        layers = tuple(_layer_spec(block, names[id(block)], hidden, names) for block in layer_list)
        mlp_size = linear_dims(_get(model, layers[0].mlp_out))[0]

        base = getattr(model, "base_model", model)
        base_name = names[id(base)] if base is not model else ""
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if head is None:
            raise LmpatchError(f"{type(model).__name__} has no language-model head.")
        tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
        norm = _find_final_norm(base, layer_list, hidden)
        return cls(
            model_type=str(getattr(cfg, "model_type", type(model).__name__)),
            n_layers=n_layers,
            hidden_size=hidden,
            mlp_size=mlp_size,
            base=base_name,
            layers_path=names[id(layer_list)],
            layers=layers,
            final_norm=names[id(norm)] if norm is not None else "",
            embed=names[id(emb)],
            lm_head=names[id(head)],
            tied_embeddings=bool(tied),
            logit_softcap=getattr(cfg, "final_logit_softcapping", None) or None,
        )

    # -- addressing -------------------------------------------------------------------
    def module(self, model: nn.Module, path: str) -> nn.Module:
        return _get(model, path)

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(model, self.layers[self.check_layer(layer)].mlp_out)

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(model, self.layers[self.check_layer(layer)].block)

    def base_model(self, model: nn.Module) -> nn.Module:
        return _get(model, self.base) if self.base else model

    def check_layer(self, layer: int) -> int:
        if not -self.n_layers <= layer < self.n_layers:
            raise LmpatchError(f"Layer {layer} does not exist: this model has layers 0..{self.n_layers - 1}.")
        return layer % self.n_layers

    def depth_layer(self, fraction: float) -> int:
        """The layer at ``fraction`` of the depth; defaults of every method derive from it."""
        return min(self.n_layers - 1, max(0, round(fraction * self.n_layers)))

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final (already normed) hidden states, only where asked."""
        out = _get(model, self.lm_head)(hidden)
        if self.logit_softcap:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _linears(module: nn.Module) -> list[tuple[nn.Module, tuple[int, int]]]:
    out = []
    for m in module.modules():
        dims = linear_dims(m)
        if dims is not None:
            out.append((m, dims))
    return out


def _find_layer_list(model: nn.Module, n_layers: int, hidden: int) -> nn.ModuleList | None:
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and len(m) > 0:
            if _mlp_out_candidates(m[0], hidden):
                return m
    return None


def _mlp_out_candidates(block: nn.Module, hidden: int) -> list[nn.Module]:
    return [m for m, (i, o) in _linears(block) if o == hidden and i > hidden]


def _layer_spec(block: nn.Module, block_name: str, hidden: int, names: dict[int, str]) -> LayerSpec:
    outs = _mlp_out_candidates(block, hidden)
    if len(outs) != 1:
        raise LmpatchError(
            f"Block '{block_name}' has {len(outs)} projections from a wider space back to the "
            f"hidden size {hidden}; expected exactly one MLP output projection."
        )
    mlp_out = outs[0]
    d_ff = linear_dims(mlp_out)[0]
    mlp_in = [m for m, (i, o) in _linears(block) if i == hidden and o in (d_ff, 2 * d_ff)]
    # The attention is the direct child of the block that holds linear maps but not the MLP.
    attn = None
    for child in block.children():
        if linear_dims(child) is not None:
            continue
        lin = _linears(child)
        if lin and all(m is not mlp_out for m, _ in lin) and not any(m in mlp_in for m, _ in lin):
            attn = child
            break
    if attn is None:
        raise LmpatchError(f"Could not find the attention module in block '{block_name}'.")
    attn_outs = [m for m, (i, o) in _linears(attn) if o == hidden]
    return LayerSpec(
        block=block_name,
        attn=names[id(attn)],
        attn_out=names[id(attn_outs[-1])],
        mlp_in=tuple(names[id(m)] for m in mlp_in),
        mlp_out=names[id(mlp_out)],
    )


def _find_final_norm(base: nn.Module, layer_list: nn.ModuleList, hidden: int) -> nn.Module | None:
    """The last parameterised (hidden,)-shaped leaf registered after the decoder blocks."""
    seen_layers = False
    found = None
    for m in base.modules():
        if m is layer_list:
            seen_layers = True
            continue
        if not seen_layers or any(m is x for x in layer_list.modules()):
            continue
        params = list(m.parameters(recurse=False))
        if params and not list(m.children()) and tuple(params[0].shape) == (hidden,):
            found = m
    return found
