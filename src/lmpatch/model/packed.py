"""Linear layers whose weights are pre-packed for oneDNN, for the gradient passes of an edit.

Why: the value optimisation of ROME and MEMIT runs the frozen model forwards and backwards
over a few dozen tokens, a dozen times per edit. At that size a float32 product through
MKL costs nearly the same at 9 tokens as at 36: every call re-packs the weight panel it
reads, so the cost follows the weight's size, not the work. oneDNN can take the weight
packed once, in its own blocked layout. Measured on a 2-core AMD EPYC with torch's and
oneDNN's kernels held to AVX2 (25 SmolLM2 blocks, 18 tokens, weights out of cache): the
forward products took 30 ms instead of 61 ms, and the output head at five positions
6 ms instead of 17 ms.

The backward pass needs the input gradient ``g @ W``, a product with the transposed
weight, so each layer also keeps ``W.T`` packed; without it the backward's plain
products undo most of the gain. That doubles the weights' memory, so the copy is only
made when it fits a budget (:func:`packing_wanted`). The bfloat16 compute copy used on
CPUs with fast bfloat16 is packed the same way (25 blocks' forward products at 18
tokens, AVX-512 BF16: 15.4 ms instead of 25.7 ms).

Only the layer's *input* receives a gradient: the weights of a compute copy are frozen
(the edit's own parameter is a separate tensor added by a hook), which is what lets a
packed, read-only weight stand in. A weight changed in place (a patch applied or
reverted) is noticed by its version counter and re-packed at the next call.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmpatch.model.stamp import weight_stamp

log = logging.getLogger(__name__)

#: The packed copies may take at most this share of the machine's memory.
MEMORY_SHARE = 0.25


def packing_available() -> bool:
    """True when this torch build has oneDNN and its packed-linear operators."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


#: The dtypes whose products oneDNN computes from packed weights here.
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def dtype_packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of ``dtype`` on this CPU.

    float32 always; bfloat16 only where oneDNN has bfloat16 kernels (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT). On an AVX2-only CPU, and under lmpatch's AVX2 hold on a bigger one,
    packing a bfloat16 weight raises instead, so a bfloat16 copy there runs on plain
    products.
    """
    if dtype not in PACKED_DTYPES:
        return False
    if dtype == torch.bfloat16:
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe is not None and probe())
    return True


def packed_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What packed ``dtype`` copies of ``model``'s linear weights take (two per layer)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if _packable(m) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += 2 * m.weight.numel() * dtype.itemsize
    return total


def physical_memory() -> int | None:
    """The machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def packing_wanted(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the gradient passes of ``model`` in ``dtype`` should run on packed weights:
    float32 or bfloat16 on CPU, oneDNN present, and the packed copies within
    :data:`MEMORY_SHARE` of the machine's memory (SmolLM2-135M: 1.1 GB in float32)."""
    first = next(model.parameters())
    if not first.is_floating_point() or first.device.type != "cpu":
        return False
    if not packing_available() or not dtype_packable(dtype):
        return False
    ram = physical_memory()
    return ram is not None and packed_bytes(model, dtype) <= MEMORY_SHARE * ram


def _packable(m: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D`` (the exact classes, so nothing is packed twice)
    with a 2-D CPU weight in a dtype oneDNN packs."""
    if type(m) is not nn.Linear and type(m) is not Conv1D:
        return False
    w = m.weight
    return dtype_packable(w.dtype) and w.device.type == "cpu" and w.dim() == 2


class _PackedProduct(torch.autograd.Function):
    """``x @ Mᵀ`` from the packed math-layout weight ``M`` (out x in); the input gradient
    ``g @ M`` from the packed ``Mᵀ``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, packed_t: torch.Tensor) -> torch.Tensor:
        ctx.packed_t = packed_t
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = torch.ops.mkldnn._linear_pointwise(grad.contiguous(), ctx.packed_t, None, "none", [], "")
        return dx, None, None


class _Packing:
    """The packed copies of one stored weight, re-made when the weight changes.

    ``transposed``: the weight is stored in x out (GPT-2's ``Conv1D``) rather than out x in.
    """

    def __init__(self, transposed: bool):
        self.transposed = transposed
        self.stamp: tuple[int, int] | None = None
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def of(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stamp = weight_stamp(weight)
        if self.pair is None or stamp != self.stamp:
            with torch.no_grad():
                stored = weight.detach()
                flipped = stored.t().contiguous()
                math, math_t = (flipped, stored) if self.transposed else (stored, flipped)
                reorder = torch.ops.mkldnn._reorder_linear_weight
                self.pair = (reorder(math.contiguous()), reorder(math_t.contiguous()))
            self.stamp = stamp
        return self.pair


def _packed_forward(module: nn.Module, packing: _Packing, x: torch.Tensor, plain) -> torch.Tensor:
    w = module.weight
    if x.dtype != w.dtype or w.requires_grad:
        # only a frozen weight may be read from its packed copy, in its own dtype
        return plain(x)
    y = _PackedProduct.apply(x, *packing.of(w))
    return y if module.bias is None else y + module.bias


class PackedLinear(nn.Linear):
    """Stands in for an ``nn.Linear`` of a compute copy: reads the same (shared) weight and
    bias, computes with packed copies of the weight and its transpose. A subclass, so code
    that asks whether a module is a linear layer and how wide it is gets the same answers."""

    def __init__(self, source: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight of its own
        self.weight = source.weight  # shared with the model: patches change it in place
        self.bias = source.bias
        self.in_features, self.out_features = source.in_features, source.out_features
        self._packing = _Packing(transposed=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_forward(self, self._packing, x, super().forward)


class PackedConv1D(Conv1D):
    """:class:`PackedLinear` for GPT-2's ``Conv1D``, whose weight is stored in x out."""

    def __init__(self, source: Conv1D):
        nn.Module.__init__(self)
        self.weight, self.bias, self.nf = source.weight, source.bias, source.nf
        self.nx = getattr(source, "nx", source.weight.shape[0])
        self._packing = _Packing(transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_forward(self, self._packing, x, super().forward)


def pack_linears(module: nn.Module) -> int:
    """Replace every float32 or bfloat16 ``nn.Linear`` (and GPT-2 ``Conv1D``) inside
    ``module`` by a packed stand-in on the same weight (in place; ``module`` must be a
    compute copy, never the model the user holds).
    Returns how many were replaced."""
    targets = [(name, m) for name, m in module.named_modules() if name and _packable(m)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        replacement = PackedLinear(m) if type(m) is nn.Linear else PackedConv1D(m)
        for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            if hasattr(m, hooks):
                getattr(replacement, hooks).update(getattr(m, hooks))
        setattr(parent, child, replacement)
    log.debug("Packed %d linear layers for oneDNN", len(targets))
    return len(targets)
