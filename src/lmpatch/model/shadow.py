"""A low-precision copy of a model for the heavy, gradient-carrying passes of an edit.

Why: the value optimisation of ROME/MEMIT is a dozen forward+backward passes of the
frozen model over a few dozen tokens. On CPUs with AMX tiles or AVX-512 BF16, bfloat16
products run there, ~2x faster per step than float32. (Both copies, and the model's own
float32 passes, multiply by weights packed once: :mod:`lmpatch.model.packed`.) The edit
itself must still be computed and applied in float32 (rank-one updates of relative size
1e-3 are partly lost to bfloat16 rounding), so the caller's model keeps its weights and
this module keeps a *second*, bfloat16 copy that is only ever read.

The copy lives on the :class:`~lmpatch.model.loading.LoadedModel` it shadows (no global
cache) and is re-synchronised lazily: each parameter's version counter and storage pointer
are remembered, and only parameters that changed since (a patch applied or reverted, a
fine-tune step) are cast again.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lmpatch.model.stamp import weight_stamp

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "model")


@dataclass
class Shadow:
    """One low-precision copy and the parameter state it was made from."""

    module: nn.Module
    dtype: torch.dtype
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    stamps: list[tuple[int, int]] = field(default_factory=list)
    structure: int = -1  # the patch stack's structure the added modules below mirror
    hooks: list = field(default_factory=list)  # handles of the mirrored added modules

    def mirror(self, additions: list) -> None:
        """Hook cast copies of the master's added modules onto the same places in this copy."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for installed in additions:
            host = self.module.get_submodule(installed.place)
            device = next(host.parameters(), next(self.module.parameters())).device
            clone = copy.deepcopy(installed.module).placed(device, self.dtype)
            self.hooks.append(host.register_forward_hook(clone.hook, with_kwargs=True))

    def sync(self) -> int:
        """Re-cast the parameters whose master changed; returns how many were refreshed."""
        refreshed = 0
        with torch.no_grad():
            for i, (master, copy_) in enumerate(self.pairs):
                stamp = weight_stamp(master)
                if stamp != self.stamps[i]:
                    copy_.copy_(master)
                    self.stamps[i] = stamp
                    refreshed += 1
        return refreshed


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16);
    elsewhere bfloat16 is emulated and slower than float32.

    The hardware probes read the CPU's flags, so they would still answer yes when torch's
    kernels are held below AVX-512 (``ATEN_CPU_CAPABILITY=avx2``, how an AVX-512 machine
    times an AVX2-only one): that hold must mean float32, as on the machine it stands for.
    """
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")()
    if capability in ("DEFAULT", "AVX2"):
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def resolve_compute_dtype(name: str, model: nn.Module) -> torch.dtype:
    """The dtype the edit's forward/backward passes run in.

    ``auto`` picks bfloat16 for a float32 model when the hardware has fast bfloat16
    (CUDA with bf16 support, or a CPU with AMX/AVX512-BF16) and the model's own dtype
    otherwise; ``model`` always means the model's own dtype.
    """
    if name not in COMPUTE_DTYPES:
        from lmpatch.errors import InvalidRequestError

        raise InvalidRequestError(f"Unknown compute_dtype {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}.")
    own = next(model.parameters()).dtype
    if name == "model":
        return own
    if name != "auto":
        return getattr(torch, name)
    if own != torch.float32:
        return own
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else own
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return own


def compute_model(owner, dtype: torch.dtype) -> nn.Module:
    """The module that runs ``owner``'s gradient passes in ``dtype``.

    ``owner`` is a :class:`~lmpatch.model.loading.LoadedModel`. In a dtype other than the
    model's own this is a synced low-precision copy; in the model's own dtype it is
    ``owner.model`` itself. On a CPU, within a memory budget, either kind computes its
    linear layers from weights packed for oneDNN (:mod:`lmpatch.model.packed`); a packed
    copy in the model's own dtype shares every parameter with it.

    Which of these serves a dtype is decided at its first call and kept in the patch stack
    (``None``: the model itself), with the copy: this runs at every pass of an edit, so
    the memory budget is not weighed again each time. Added modules (GRACE codebooks,
    extra neurons) are part of what the model computes, so a copy carries copies of them
    too, re-made whenever the stack's set of added modules changes.
    """
    master: nn.Module = owner.model
    stack = owner.stack
    if dtype not in stack.shadows:
        from lmpatch.model.packed import packing_wanted

        packed = packing_wanted(master, dtype)
        if next(master.parameters()).dtype == dtype and not packed:
            stack.shadows[dtype] = None
        else:
            stack.shadows[dtype] = _build(master, dtype, stack.additions(), packed=packed)
            log.debug("Built a %s%s compute copy of %s", "packed " if packed else "", dtype, owner.name)
    shadow = stack.shadows[dtype]
    if shadow is None:
        return master
    n = shadow.sync()
    if n:
        log.debug("Refreshed %d parameters of the %s compute copy", n, dtype)
    if shadow.structure != stack.structure:
        shadow.mirror(stack.additions())
        shadow.structure = stack.structure
    return shadow.module


def computes_exactly(owner, net: nn.Module) -> bool:
    """Whether ``net`` computes what ``owner.model`` computes, in its precision (the model
    itself or its packed copy, which differs only by float rounding)."""
    return next(net.parameters()).dtype == next(owner.model.parameters()).dtype


def _build(master: nn.Module, dtype: torch.dtype, additions: list, packed: bool = False) -> Shadow:
    """Deep-copy the module tree, casting floating parameters to ``dtype`` as they are met
    (never holding a second full-precision copy) and sharing buffers such as rotary
    frequencies, which must stay in full precision. The master's added-module hooks are
    dropped from the copy (they would run in the master's dtype); ``Shadow.mirror``
    installs cast copies instead.

    ``packed``: the copy's linear layers compute from packed weights, re-packed when a
    weight changes (by a patch, or by :meth:`Shadow.sync` in a cast copy). A packed copy
    in the master's own dtype shares every parameter with it: nothing to cast or sync."""
    memo: dict[int, object] = {}
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
    with torch.no_grad():
        share = next(master.parameters()).dtype == dtype
        for p in _unique_params(master):
            if share:
                c = p
            elif p.is_floating_point():
                c = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                pairs.append((p, c))
            else:
                c = nn.Parameter(p.detach(), requires_grad=False)
            memo[id(p)] = c
        for b in master.buffers():
            memo[id(b)] = b
    for installed in additions:  # their hooks are not copied: ``mirror`` re-makes them in ``dtype``
        host = master.get_submodule(installed.place)
        memo[id(host._forward_hooks[installed.handle.id])] = None
    module = copy.deepcopy(master, memo)
    for installed in additions:
        host = module.get_submodule(installed.place)
        host._forward_hooks.pop(installed.handle.id, None)
        host._forward_hooks_with_kwargs.pop(installed.handle.id, None)
    module.eval()
    if packed:
        from lmpatch.model.packed import pack_linears

        pack_linears(module)
    on_cpu = next(master.parameters()).device.type == "cpu"
    if not share and on_cpu and hasattr(module, "set_attn_implementation"):
        # PyTorch's fused CPU attention has a very slow bfloat16 backward; the plain
        # implementation is ~5x faster for the short sequences an edit runs.
        try:
            module.set_attn_implementation("eager")
        except (ValueError, AttributeError, NotImplementedError) as err:
            log.debug("Keeping the model's attention implementation: %s", err)
    return Shadow(module=module, dtype=dtype, pairs=pairs, stamps=[weight_stamp(p) for p, _ in pairs])


def _unique_params(module: nn.Module):
    seen: set[int] = set()
    for p in module.parameters(recurse=True):
        if id(p) not in seen:
            seen.add(id(p))
            yield p
