"""Where things are inside a transformer LM, found from the module tree.

Decoder-only models are the main case. Encoder-decoder models (the T5 family) are mapped
the same way, stack by stack: ``layers`` lists the encoder's blocks and then the
decoder's, so a "layer" index addresses either stack (see :class:`ModelSpec`).

Research code keeps a table of module-path templates per model family
(``transformer.h.{}.mlp.c_proj``...), which breaks on every new architecture. We instead
look at structure and shapes:

* the decoder blocks are the ``ModuleList`` with one entry per layer (from the config)
  whose entries have an MLP;
* a block's linear maps fall into groups, one per direct child of the block (a
  projection registered directly on the block, as OPT's ``fc1``/``fc2``, belongs to the
  block's "loose" group);
* the MLP group holds exactly one map from a wider space back to the hidden size (the
  output projection) and its input projections map the hidden size to that width, or
  to twice it when gate and up are fused (Phi-3). Shapes alone can be ambiguous: when
  the attention is wider than the hidden size (Gemma-7B, Qwen3) ``q_proj``/``o_proj``
  look like ``up``/``down``, and a fused ``qkv`` can be as wide as a fused ``gate_up``.
  So the MLP is preferred where an activation function lives, then where the width
  matches the config's intermediate size;
* the attention is the other sub-module that maps back to the hidden size;
* the final norm is the (hidden,)-shaped norm of the base model outside the blocks;
* the MLP's post-norm (Gemma 2/3, OLMo 2 normalise the MLP output before adding it to the
  residual stream) is a matter of dataflow, not of shapes or registration order (Llama's
  ``post_attention_layernorm`` is the norm *before* its MLP), so it is found by one short
  forward pass: the (hidden,)-shaped module in the block whose input is the output
  projection's output.

Type names are looked at only where shapes cannot decide: a parameter-free module
counts as an activation (the MLP's mark) and a parameter-free final norm (OLMo) is
recognised by the word "norm" in its class name.

GPT-2's ``Conv1D`` (weight stored as in x out) is recognised by type.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, replace

import torch
from torch import nn

from lmpatch.errors import LmpatchError

log = logging.getLogger(__name__)


def _conv1d_type() -> tuple[type, ...]:
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


def factors_to_param_layout(module: nn.Module, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a math-layout delta ``left @ right`` (out x in) as factors of the stored layout:
    Conv1D stores Wᵀ, and (left right)ᵀ = rightᵀ leftᵀ."""
    return (right.T, left.T) if is_conv1d(module) else (left, right)


def from_param_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Read a module's weight as math (out x in), whatever its storage layout."""
    return weight.T if is_conv1d(module) else weight


@dataclass(frozen=True)
class LayerSpec:
    """Module paths of one decoder block.

    ``mlp_post_norm`` is the norm the MLP's output passes through before it joins the
    residual stream, or empty when the output projection's output is added as it is. A
    change of the projection's output then does not add linearly to the residual stream:
    the norm rescales (and, with per-channel gains, rotates) it.
    """

    block: str
    attn: str
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp_post_norm: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """The map of a causal LM that every editing method and metric works through.

    ``final_norm`` is empty when the model has none (OPT-350m); ``logit_scale`` and
    ``logit_softcap`` reproduce the post-processing some heads apply to their output
    (Cohere/Granite scale, Gemma 2/3 soft-cap, T5's d_model^-0.5) so :meth:`logits` equals
    the model's own.

    Encoder-decoder models: ``layers`` holds the ``encoder_layers`` encoder blocks first
    and then the decoder blocks, so layer 0 is the encoder's first block and layer
    ``n_layers - 1`` the decoder's last; ``encoder`` and ``decoder`` are the two stacks and
    ``final_norm`` is the decoder's (the one before the head). One index space rather than
    two keeps every method's "which layers" setting a list of integers: MEND's "last two
    blocks of each stack" is ``[E-2, E-1, n-2, n-1]``. Prompts are read by the encoder, so a
    method that reads keys at prompt tokens must edit an encoder layer
    (:meth:`prompt_layer` says which).
    """

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
    logit_scale: float | None = None
    encoder_layers: int = 0
    encoder: str = ""
    decoder: str = ""
    decoder_start_id: int | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        names = {id(m): n for n, m in model.named_modules()}
        cfg = _text_config(model)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if emb is None or head is None:
            raise LmpatchError(
                f"{type(model).__name__} has no input embedding or language-model head; "
                "load the model with AutoModelForCausalLM (or AutoModelForSeq2SeqLM for T5)."
            )
        hidden = _config_int(cfg, "hidden_size") or int(emb.weight.shape[-1])
        if getattr(cfg, "is_encoder_decoder", False):
            return _encoder_decoder_spec(cls, model, cfg, hidden, names, emb, head)
        n_layers = _config_int(cfg, "num_hidden_layers")
        d_ff_hint = _intermediate_size(cfg)

        layer_list, layers = _find_layers(model, n_layers, hidden, d_ff_hint, names)
        layers = _with_mlp_post_norms(model, layer_list, layers, hidden, names)
        mlp_size = linear_dims(_get(model, layers[0].mlp_out))[0]

        base = getattr(model, "base_model", model)
        base_name = names[id(base)] if base is not model else ""
        norm = _find_final_norm(base, layer_list, hidden)
        return cls(
            model_type=str(getattr(cfg, "model_type", "") or type(model).__name__),
            n_layers=len(layers),
            hidden_size=hidden,
            mlp_size=mlp_size,
            base=base_name,
            layers_path=names[id(layer_list)],
            layers=layers,
            final_norm=names[id(norm)] if norm is not None else "",
            embed=names[id(emb)],
            lm_head=names[id(head)],
            tied_embeddings=_shares_weight(head, emb),
            logit_softcap=_positive_float(getattr(cfg, "final_logit_softcapping", None)),
            logit_scale=_logit_scale(cfg),
        )

    # -- addressing -------------------------------------------------------------------
    @property
    def encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    def side(self, layer: int) -> str:
        """"encoder" or "decoder" (always "decoder" for a decoder-only model)."""
        return "encoder" if self.check_layer(layer) < self.encoder_layers else "decoder"

    def prompt_layer(self, layer: int) -> int:
        """``layer`` if it reads the prompt's tokens (any layer of a decoder-only model, an
        encoder layer of an encoder-decoder), else one clear error."""
        index = self.check_layer(layer)
        if self.encoder_decoder and index >= self.encoder_layers:
            raise LmpatchError(
                f"Layer {index} is a decoder layer of this encoder-decoder model; this method reads the "
                f"prompt at the subject, which only the encoder (layers 0..{self.encoder_layers - 1}) sees."
            )
        return index

    def run_body(self, net: nn.Module, **inputs) -> object:
        """The transformer body of ``net`` (this spec's module tree) on ``inputs``, up to the
        final norm: ``last_hidden_state`` is what :meth:`logits` projects.

        Encoder-decoder: ``input_ids``/``attention_mask`` go to the encoder and
        ``decoder_input_ids``/``decoder_attention_mask`` to the decoder; without decoder
        inputs the decoder reads just its start token (enough for hooks that read the
        encoder, and the first answer token's distribution). ``position_ids`` are dropped:
        T5's relative positions need none, whatever the padding.
        """
        if not self.encoder_decoder:
            return self.base_model(net)(**inputs)
        inputs = dict(inputs)
        inputs.pop("position_ids", None)
        inputs.pop("use_cache", None)
        dec_ids = inputs.pop("decoder_input_ids", None)
        dec_mask = inputs.pop("decoder_attention_mask", None)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask", None)
        if dec_ids is None:
            dec_ids = torch.full((ids.shape[0], 1), self.decoder_start_id or 0, dtype=torch.long, device=ids.device)
        enc = _get(net, self.encoder)(input_ids=ids, attention_mask=mask, **inputs)
        return _get(net, self.decoder)(
            input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=enc.last_hidden_state,
            encoder_attention_mask=mask, use_cache=False,
        )

    def module(self, model: nn.Module, path: str) -> nn.Module:
        return _get(model, path)

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(model, self.layers[self.check_layer(layer)].mlp_out)

    def mlp_post_norm(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The norm between layer ``layer``'s MLP output projection and the residual stream, if any."""
        path = self.layers[self.check_layer(layer)].mlp_post_norm
        return _get(model, path) if path else None

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(model, self.layers[self.check_layer(layer)].block)

    def base_model(self, model: nn.Module) -> nn.Module:
        return _get(model, self.base) if self.base else model

    def check_layer(self, layer: int) -> int:
        """The non-negative index of ``layer`` (negative counts from the top), or a clear error."""
        try:
            if isinstance(layer, bool):
                raise TypeError
            index = operator.index(layer)
        except TypeError:
            raise LmpatchError(f"Layer must be an integer, got {layer!r}.") from None
        if not -self.n_layers <= index < self.n_layers:
            raise LmpatchError(
                f"Layer {index} does not exist: this model has layers 0..{self.n_layers - 1}."
            )
        return index % self.n_layers

    def depth_layer(self, fraction: float, prompt: bool = False) -> int:
        """The layer at ``fraction`` of the depth; defaults of every method derive from it.

        With ``prompt`` the depth is that of the layers that read the prompt: all of a
        decoder-only model's, an encoder-decoder's encoder (where ROME edits T5).
        """
        if not 0.0 <= float(fraction) <= 1.0:
            raise LmpatchError(f"Depth fraction must be between 0 and 1, got {fraction}.")
        depth = self.encoder_layers if prompt and self.encoder_decoder else self.n_layers
        return min(depth - 1, max(0, round(fraction * depth)))

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final (already normed) hidden states, only where asked."""
        out = _get(model, self.lm_head)(hidden)
        if self.logit_scale is not None:
            out = out * self.logit_scale
        if self.logit_softcap:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out


def _encoder_decoder_spec(cls, model: nn.Module, cfg, hidden: int, names: dict[int, str], emb, head) -> ModelSpec:
    """The spec of a T5-style model: each stack's blocks mapped as a decoder-only model's are
    (a T5 block's sub-layers are its self-attention, its cross-attention and its MLP, and
    the MLP is the group with the activation), encoder blocks first."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    d_ff_hint = _intermediate_size(cfg)
    n_enc = _config_int(cfg, "num_layers") or _config_int(cfg, "encoder_layers")
    n_dec = _config_int(cfg, "num_decoder_layers") or _config_int(cfg, "decoder_layers")
    enc_list, enc_layers = _find_layers(encoder, n_enc, hidden, d_ff_hint, names)
    dec_list, dec_layers = _find_layers(decoder, n_dec, hidden, d_ff_hint, names)
    norm = _find_final_norm(decoder, dec_list, hidden)
    start = getattr(model.config, "decoder_start_token_id", None)
    layers = enc_layers + dec_layers
    return cls(
        model_type=str(getattr(cfg, "model_type", "") or type(model).__name__),
        n_layers=len(layers),
        hidden_size=hidden,
        mlp_size=linear_dims(_get(model, layers[0].mlp_out))[0],
        base="",
        layers_path=names[id(dec_list)],
        layers=layers,
        final_norm=names[id(norm)] if norm is not None else "",
        embed=names[id(emb)],
        lm_head=names[id(head)],
        tied_embeddings=_shares_weight(head, emb),
        logit_scale=_decoder_logit_scale(model, encoder, decoder, head, hidden, start),
        encoder_layers=len(enc_layers),
        encoder=names[id(encoder)],
        decoder=names[id(decoder)],
        decoder_start_id=int(start) if start is not None else None,
    )


def _decoder_logit_scale(model: nn.Module, encoder: nn.Module, decoder: nn.Module, head: nn.Module, hidden: int,
                         start: int | None) -> float | None:
    """What the model does between its decoder and its head, found by one short pass.

    T5 multiplies the decoder's output by d_model^-0.5 before its tied head, T5 v1.1 and
    mT5 do not, and the config says so differently in each (``scale_decoder_outputs``,
    ``tie_word_embeddings`` or nothing). So the model's own logits are compared with the
    head applied to the decoder's output: equal (no scale), equal after d_model^-0.5
    (T5), or anything else (BART's ``final_logits_bias``) is one clear error.
    """
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":
        cfg = model.config
        return hidden ** -0.5 if getattr(cfg, "scale_decoder_outputs", False) else None
    device = model.get_input_embeddings().weight.device
    ids = (torch.arange(3, 6, device=device) % model.get_input_embeddings().weight.shape[0])[None]
    dec = torch.tensor([[start or 0, int(ids[0, 0])]], device=device)
    with torch.no_grad():
        enc = encoder(input_ids=ids).last_hidden_state
        body = decoder(input_ids=dec, encoder_hidden_states=enc).last_hidden_state
        full = model(input_ids=ids, decoder_input_ids=dec).logits.float()
        plain = head(body).float()
    tol = 1e-4 * max(1.0, float(full.abs().max()))
    for scale in (None, hidden ** -0.5):
        if torch.allclose(plain * (scale or 1.0), full, atol=tol, rtol=1e-4):
            return scale
    raise LmpatchError(
        f"{type(model).__name__} changes its decoder's output on the way to the vocabulary in a way lmpatch "
        "does not model (e.g. BART's final_logits_bias); T5-style encoder-decoders are supported."
    )


# -- config -------------------------------------------------------------------------------
def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _config_int(cfg, key: str) -> int | None:
    value = getattr(cfg, key, None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# Config keys different families use for the MLP width. Only a tie-breaker: the width is
# always read from the weights.
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")


def _intermediate_size(cfg) -> int | None:
    for key in _INTERMEDIATE_KEYS:
        value = _config_int(cfg, key)
        if value is not None:
            return value
    return None


def _positive_float(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _logit_scale(cfg) -> float | None:
    """Heads that scale their logits: ``logit_scale`` multiplies, ``logits_scaling`` divides."""
    scale = _positive_float(getattr(cfg, "logit_scale", None))
    divisor = _positive_float(getattr(cfg, "logits_scaling", None))
    if divisor is not None:
        scale = (scale or 1.0) / divisor
    return None if scale is None or scale == 1.0 else scale


# -- module tree ------------------------------------------------------------------------------
def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _shares_weight(head: nn.Module, emb: nn.Module) -> bool:
    a, b = getattr(head, "weight", None), getattr(emb, "weight", None)
    if a is None or b is None:
        return False
    if a is b:
        return True
    return a.device.type != "meta" and a.shape == b.shape and a.data_ptr() == b.data_ptr()


def _linears(module: nn.Module) -> list[tuple[nn.Module, tuple[int, int]]]:
    out = []
    for m in module.modules():
        dims = linear_dims(m)
        if dims is not None:
            out.append((m, dims))
    return out


_NOT_ACTIVATIONS = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention")


def _is_activation(module: nn.Module) -> bool:
    """A parameter-free nonlinearity module (what an MLP has and an attention has not)."""
    cls = type(module)
    if cls.__name__ in _NOT_ACTIVATIONS or list(module.parameters(recurse=False)):
        return False
    if cls.__module__ in ("torch.nn.modules.activation", "transformers.activations"):
        return True
    return cls.__name__.lower().endswith(("activation", "gelu", "silu", "relu", "swish"))


@dataclass
class _Group:
    """The linear maps under one direct child of a block (or the block's own loose ones)."""

    owner: nn.Module
    linears: list[tuple[nn.Module, tuple[int, int]]]
    has_activation: bool
    loose: bool


def _groups(block: nn.Module) -> list[_Group]:
    loose: list[tuple[nn.Module, tuple[int, int]]] = []
    loose_act = False
    groups: list[_Group] = []
    children = list(block.children())
    while children:
        child = children.pop(0)
        dims = linear_dims(child)
        if dims is not None:
            loose.append((child, dims))
        elif _is_activation(child):
            loose_act = True
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            children[:0] = list(child.children())  # containers are not sub-layers
        else:
            lin = _linears(child)
            if lin:
                acts = any(_is_activation(m) for m in child.modules())
                groups.append(_Group(child, lin, acts, loose=False))
    if loose:
        groups.append(_Group(block, loose, loose_act, loose=True))
    return groups


def _mlp_parts(group: _Group, hidden: int):
    """(output projection, input projections, shapes-alone verdict) of an MLP-like group, else None."""
    downs = [(m, d) for m, d in group.linears if d[1] == hidden and d[0] != hidden]
    if len(downs) != 1:
        return None
    down, (width, _) = downs[0]
    ups = [m for m, (i, o) in group.linears if i == hidden and m is not down]
    feeding = [m for m, (i, o) in group.linears if i == hidden and o in (width, 2 * width)]
    # Separate q/k/v (three inputs) or inputs of other widths make it look like attention.
    shaped = 1 <= len(feeding) == len(ups) <= 2
    if not (shaped or group.has_activation):
        return None
    return down, feeding, shaped


def _layer_spec(
    block: nn.Module, block_name: str, hidden: int, d_ff_hint: int | None, names: dict[int, str]
) -> LayerSpec:
    groups = _groups(block)
    ranked = []
    for g in groups:
        parts = _mlp_parts(g, hidden)
        if parts is not None:
            down, ins, shaped = parts
            width = linear_dims(down)[0]
            ranked.append(((g.has_activation, width == d_ff_hint, shaped), g, down, ins))
    if not ranked:
        raise LmpatchError(
            f"Block '{block_name}' has no MLP with one projection back to the hidden size "
            f"{hidden} (mixture-of-experts and split encoder-style blocks are not supported)."
        )
    ranked.sort(key=lambda r: r[0], reverse=True)
    if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
        raise LmpatchError(
            f"Block '{block_name}' has several sub-modules that look like its MLP; build a "
            "ModelSpec by hand for this architecture and assign it to LoadedModel.spec."
        )
    _, mlp_group, mlp_out, mlp_in = ranked[0]

    attn_candidates = [
        g for g in groups
        if g is not mlp_group and not g.loose and any(o == hidden for _, (_, o) in g.linears)
    ]
    attn_candidates.sort(key=lambda g: g.has_activation)  # stable: first non-MLP-like wins
    if not attn_candidates:
        raise LmpatchError(f"Could not find the attention module in block '{block_name}'.")
    attn = attn_candidates[0]
    attn_out = _attn_out(attn, hidden)
    return LayerSpec(
        block=block_name,
        attn=names[id(attn.owner)],
        attn_out=names[id(attn_out)],
        mlp_in=tuple(names[id(m)] for m in mlp_in),
        mlp_out=names[id(mlp_out)],
    )


def _attn_out(attn: _Group, hidden: int) -> nn.Module:
    """The attention's map back to the hidden size.

    When heads x head_dim differs from the hidden size it is the only map from that width;
    otherwise q/k/v and out are all hidden -> hidden and the output projection is the one
    registered last, as in every architecture the tests cover (Phi-3 registers o_proj
    first, but its fused qkv is not hidden -> hidden so o_proj is still the only one).
    """
    backs = [m for m, (i, o) in attn.linears if o == hidden]
    narrowing = [m for m in backs if linear_dims(m)[0] != hidden]
    return narrowing[-1] if len(narrowing) == 1 else backs[-1]


def _find_layers(
    model: nn.Module, n_layers: int | None, hidden: int, d_ff_hint: int | None, names: dict[int, str]
) -> tuple[nn.ModuleList, tuple[LayerSpec, ...]]:
    """The ModuleList of decoder blocks and each block's spec."""
    first_error: LmpatchError | None = None
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if n_layers is not None and len(m) != n_layers:
            continue
        try:
            layers = tuple(_layer_spec(b, names[id(b)], hidden, d_ff_hint, names) for b in m)
        except LmpatchError as exc:
            first_error = first_error or exc
            continue
        return m, layers
    if first_error is not None:
        raise LmpatchError(f"Cannot map the decoder blocks of this {type(model).__name__}: {first_error}")
    count = f"{n_layers} " if n_layers else ""
    raise LmpatchError(
        f"Could not find {count}decoder blocks in this {type(model).__name__}; "
        "lmpatch edits decoder-only transformers."
    )


def _with_mlp_post_norms(
    model: nn.Module, layer_list: nn.ModuleList, layers: tuple[LayerSpec, ...], hidden: int, names: dict[int, str]
) -> tuple[LayerSpec, ...]:
    """``layers`` with ``mlp_post_norm`` set where the MLP output passes through a norm.

    One forward pass over four tokens, with the blocks' output projections and every
    (hidden,)-shaped module of the blocks hooked: a module whose input *is* (by value) the
    output projection's output in the same pass is that MLP's post-norm. Models that cannot
    run here (weights on the meta device) keep the plain description, with a warning.
    """
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":
        return layers
    blocks = list(layer_list)
    outs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    seen: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {i: [] for i in range(len(blocks))}
    handles = []
    try:
        for i, (block, layer) in enumerate(zip(blocks, layers)):
            down = _get(model, layer.mlp_out)
            handles.append(down.register_forward_hook(lambda _m, _a, out, i=i: outs[i].append(_first_tensor(out))))
            for m in block.modules():
                params = list(m.parameters(recurse=False))
                if list(m.children()) or linear_dims(m) is not None or not params:
                    continue
                if all(tuple(p.shape) == (hidden,) for p in params):
                    handles.append(m.register_forward_pre_hook(
                        lambda mod, args, i=i: seen[i].append((mod, args[0])) if args else None))
        emb = model.get_input_embeddings()
        ids = (torch.arange(1, 5, device=emb.weight.device) % emb.weight.shape[0])[None]
        with torch.no_grad():
            getattr(model, "base_model", model)(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - an exotic forward must not stop loading
        log.warning("Could not run the probe that finds MLP post-norms (%s); assuming none.", exc)
        return layers
    finally:
        for h in handles:
            h.remove()
    found = []
    for i, layer in enumerate(layers):
        post = ""
        if outs[i]:
            y = outs[i][0]
            for mod, x in seen[i]:
                if isinstance(x, torch.Tensor) and x.shape == y.shape and torch.equal(x, y):
                    post = names[id(mod)]
                    break
        found.append(replace(layer, mlp_post_norm=post))
    return tuple(found)


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _find_final_norm(base: nn.Module, layer_list: nn.ModuleList, hidden: int) -> nn.Module | None:
    """The base model's final norm: a (hidden,)-shaped leaf outside the decoder blocks.

    Some models also normalise the embeddings (Bloom), and OPT registers its final norm
    before its layers, so: the last such module registered after the blocks, else the
    only one before them. OLMo's norm has no parameters at all; for that case only, a
    parameter-free leaf after the blocks whose type calls itself a norm is taken.
    """
    inside = {id(x) for x in layer_list.modules()}
    before: list[nn.Module] = []
    after: list[nn.Module] = []
    unparameterised: list[nn.Module] = []
    seen_layers = False
    for m in base.modules():
        if m is layer_list:
            seen_layers = True
            continue
        if id(m) in inside or list(m.children()) or linear_dims(m) is not None:
            continue
        if isinstance(m, nn.Embedding):
            continue
        params = list(m.parameters(recurse=False))
        if params and all(tuple(p.shape) == (hidden,) for p in params):
            (after if seen_layers else before).append(m)
        elif not params and seen_layers and "norm" in type(m).__name__.lower():
            unparameterised.append(m)
    if after:
        return after[-1]
    if len(before) == 1:
        return before[0]
    return unparameterised[-1] if unparameterised else None
