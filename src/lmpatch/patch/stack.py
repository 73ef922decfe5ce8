"""The patches applied to one model, in order, with exact and cheap undo.

Why a stack object rather than per-patch records: keeping, for every applied patch, a
copy of each matrix it touched makes memory grow with the number of patches (1,000
sequential ROME edits of a 135M model reached 5.6 GB), although they all touch the same
few matrices. Here each touched parameter's *base* value is stored once, plus at most
one more copy: its value just before the last patch that changed it. So memory grows
with what is edited, not with how often.

Removing a patch ("revert") may take any patch out, not only the top one. The result is
bit-identical to applying the remaining patches, in order, to the base model, because
every weight is recomputed the same way it was first computed:

* a parameter whose last change came from the removed patch gets its saved previous
  value back (one copy: the cost of ``apply``/``revert`` around a scoring pass);
* any other parameter the removed patch changed is reset to its base value and the
  remaining patches' deltas on it are added again, in order (one delta per patch that
  touches it: cheap for low-rank deltas, and only for the parameters the removed patch
  touched);
* parameters the removed patch did not touch are left alone;
* added modules are hooks; removing one leaves the others in their order of application;
* retrieval memories touch nothing in the network: removing one rebuilds its group from
  the remaining members, and with no memory left prompts are formatted exactly as before.

The stack also owns the caches that derive from the current weights: the low-precision
compute copies (:mod:`lmpatch.model.shadow`), the solved covariances of locate-and-edit
methods, and AlphaEdit's memory of the keys each applied patch wrote.

One writer at a time: ``push`` and ``remove`` hold :attr:`lock`, so a server can apply
edits while another thread holds the same lock around generation.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lmpatch.errors import PatchError
from lmpatch.patch.parts import (
    AddedModule,
    MemoryRuntime,
    ModuleAddition,
    RetrievalMemory,
    WeightDelta,
    addition_type,
    memory_type,
)

if TYPE_CHECKING:
    from lmpatch.patch.patch import Patch

log = logging.getLogger(__name__)


@dataclass(eq=False)
class InstalledAddition:
    """A running added module hooked onto its host, with the handle that removes it.

    ``parts`` are the patch parts it runs: one, or for a grouped type (one running module
    per place for all patches of that type, e.g. WISE's side memory) every member, in
    order of application.
    """

    place: str
    module: AddedModule
    handle: RemovableHandle
    parts: list[ModuleAddition]


@dataclass(eq=False)
class InstalledMemory:
    """The running memory of every applied :class:`RetrievalMemory` with one ``group_key``."""

    key: str
    runtime: MemoryRuntime
    parts: list[RetrievalMemory]


@dataclass(eq=False)
class StackEntry:
    """One applied patch and the weights it changed (by canonical name)."""

    patch: "Patch"
    patch_id: str
    deltas: dict[str, WeightDelta]

    @property
    def method(self) -> str:
        return self.patch.method

    @property
    def requests(self) -> list:
        """The edits this patch put into the model (AlphaEdit protects their keys)."""
        return self.patch.requests


def canonical_names(module: nn.Module) -> dict[int, str]:
    """Parameter id -> its first name (a tied weight answers to several names)."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _summed(p: torch.Tensor, d: WeightDelta, patch_id: str) -> torch.Tensor:
    """``p + d`` computed in float32 (float64 for float64 weights) and cast back to ``p``'s dtype."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    new = (p.detach().to(acc) + d.materialize(acc, p.device)).to(p.dtype)
    if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(p).all()):
        raise PatchError(
            f"Applying patch {patch_id} would overflow {p.dtype} in '{d.param}'; "
            "load the model in a wider dtype (e.g. dtype='float32')."
        )
    return new


class PatchStack:
    """The applied patches of one model and what is needed to take any of them out exactly."""

    def __init__(self, net: nn.Module, name: str = "model") -> None:
        self._net = net
        self.name = name  # for messages
        self._entries: list[StackEntry] = []
        self._originals: dict[str, torch.Tensor] = {}
        self._before_top: dict[str, tuple[str, torch.Tensor]] = {}
        self._installed: list[InstalledAddition] = []  # in the order their hooks were registered
        self._memories: list[InstalledMemory] = []  # in the order prompts go through them
        self.lock = threading.RLock()
        #: Bumped whenever added modules come or go, so compute copies know to mirror them.
        self.structure = 0
        #: dtype -> the :class:`lmpatch.model.shadow.Shadow` that computes in it, or None
        #: where the model itself does (decided once: lmpatch.model.shadow.compute_model)
        self.shadows: dict[torch.dtype, Any] = {}
        #: see :func:`lmpatch.methods.locate.solve.layer_covariances`
        self.solves: dict[Any, Any] = {}
        #: patch id -> the keys that patch wrote (AlphaEdit keeps later edits off them)
        self.edit_keys: dict[str, Any] = {}

    # ----------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[StackEntry]:
        return iter(list(self._entries))

    def __contains__(self, patch_id: object) -> bool:
        return any(e.patch_id == patch_id for e in self._entries)

    @property
    def entries(self) -> list[StackEntry]:
        return list(self._entries)

    def ids(self) -> list[str]:
        return [e.patch_id for e in self._entries]

    def additions(self) -> list[InstalledAddition]:
        """Every running added module, in the order its hook runs."""
        return list(self._installed)

    def memories(self) -> list[InstalledMemory]:
        """Every running retrieval memory, in the order it rewrites prompts."""
        return list(self._memories)

    def saved_bytes(self) -> int:
        """Bytes held to make undo exact (base values plus previous-value copies)."""
        seen: dict[int, int] = {}
        for t in [*self._originals.values(), *(t for _, t in self._before_top.values())]:
            seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    # ----------------------------------------------------------------- push

    def _resolve(self, patch: "Patch") -> list[tuple[str, nn.Parameter, WeightDelta]]:
        """Find and check every weight ``patch`` changes before touching any (apply is all-or-nothing)."""
        canonical = canonical_names(self._net)
        targets: list[tuple[str, nn.Parameter, WeightDelta]] = []
        seen: dict[str, str] = {}
        pid = patch.patch_id
        for d in patch.deltas:
            try:
                p = self._net.get_parameter(d.param)
            except AttributeError:
                raise PatchError(f"Patch {pid} changes parameter '{d.param}', which model '{self.name}' does not have.") from None
            if tuple(p.shape) != d.shape:
                raise PatchError(
                    f"Patch {pid} has a delta of shape {d.shape} for '{d.param}', but that parameter has "
                    f"shape {tuple(p.shape)} in model '{self.name}'."
                )
            if p.device.type == "meta":
                raise PatchError(
                    f"Parameter '{d.param}' is offloaded (on the meta device); load the model without "
                    "disk offload to apply patches."
                )
            if not p.is_floating_point():
                raise PatchError(
                    f"Parameter '{d.param}' is stored as {p.dtype} (quantized); patches apply only to "
                    "floating-point weights."
                )
            name = canonical.get(id(p), d.param)
            if name in seen:
                raise PatchError(
                    f"Patch {pid} has deltas for '{seen[name]}' and '{d.param}', which are the same (tied) "
                    "weight; put the whole change on one of them."
                )
            seen[name] = d.param
            targets.append((name, p, d))
        return targets

    def _host(self, patch: "Patch", addition: ModuleAddition) -> nn.Module:
        try:
            return self._net.get_submodule(addition.place)
        except AttributeError:
            raise PatchError(
                f"Patch {patch.patch_id} adds a module at '{addition.place}', which model '{self.name}' does not have."
            ) from None

    def _install(self, place: str, module: AddedModule, parts: list[ModuleAddition]) -> InstalledAddition:
        host = self._net.get_submodule(place)
        like = next(host.parameters(), None)
        if like is None:
            like = next(self._net.parameters())
        dtype = like.dtype if like.is_floating_point() else torch.float32
        module = module.placed(like.device, dtype).eval().requires_grad_(False)
        installed = InstalledAddition(place, module, host.register_forward_hook(module.hook, with_kwargs=True), parts)
        self._installed.append(installed)
        return installed

    def _uninstall(self, installed: InstalledAddition) -> None:
        installed.handle.remove()
        self._installed.remove(installed)

    def _group(self, place: str, type_name: str) -> InstalledAddition | None:
        return next((g for g in self._installed if g.place == place and g.module.type_name == type_name), None)

    def _add_modules(self, patch: "Patch") -> list:
        """Install ``patch``'s added modules; returns what to undo if a later step fails."""
        done: list = []  # ("new", installed) or ("grown", group, previous parts)
        try:
            for part in patch.modules:
                self._host(patch, part)
                cls = addition_type(part.type)
                group = self._group(part.place, part.type) if cls.grouped else None
                if group is not None:
                    done.append(("grown", group, list(group.parts)))
                    group.module.extend(part)
                    group.parts.append(part)
                else:
                    module = cls.combine([part]) if cls.grouped else part.build()
                    done.append(("new", self._install(part.place, module, [part])))
        except BaseException:
            self._undo_modules(done)
            raise
        return done

    def _undo_modules(self, done: list) -> None:
        for step in reversed(done):
            if step[0] == "new":
                self._uninstall(step[1])
            else:
                _, group, parts = step
                self._uninstall(group)
                self._install(group.place, type(group.module).combine(parts), parts)

    def _add_memories(self, patch: "Patch") -> list:
        """Install ``patch``'s memories (building their runtimes may fail: all or nothing)."""
        done: list = []  # ("new", installed) or ("grown", group, previous parts)
        try:
            for part in patch.memories:
                cls = memory_type(part.type)
                group = next((g for g in self._memories if g.key == part.group_key), None)
                if group is None:
                    installed = InstalledMemory(part.group_key, cls.combine([part]), [part])
                    self._memories.append(installed)
                    done.append(("new", installed))
                else:
                    done.append(("grown", group, list(group.parts)))
                    group.runtime.extend(part)
                    group.parts.append(part)
        except BaseException:
            self._undo_memories(done)
            raise
        return done

    def _undo_memories(self, done: list) -> None:
        for step in reversed(done):
            if step[0] == "new":
                self._memories.remove(step[1])
            else:
                _, group, parts = step
                group.runtime = type(group.runtime).combine(parts)
                group.parts = parts

    def _drop_memories(self, gone: set[int]) -> None:
        """Rebuild each memory group without the removed parts (a group left empty goes)."""
        kept: list[InstalledMemory] = []
        for group in self._memories:
            rest = [p for p in group.parts if id(p) not in gone]
            if len(rest) == len(group.parts):
                kept.append(group)
            elif rest:
                kept.append(InstalledMemory(group.key, type(group.runtime).combine(rest), rest))
        self._memories = kept

    def push(self, patch: "Patch") -> StackEntry:
        """Apply ``patch`` on top of the others; on any error the model is left as it was."""
        with self.lock:
            pid = patch.patch_id
            if pid in self:
                raise PatchError(
                    f"Patch {pid} is already applied to model '{self.name}'; revert it before applying it again."
                )
            targets = self._resolve(patch)
            for part in patch.modules:
                self._host(patch, part)
            entry = StackEntry(patch=patch, patch_id=pid, deltas={name: d for name, _, d in targets})
            undo: list[tuple[str, torch.Tensor, bool]] = []  # (name, previous value, was new to the stack)
            try:
                with torch.no_grad():
                    for name, p, d in targets:
                        new = _summed(p, d, pid)
                        previous = p.detach().clone()
                        first = name not in self._originals
                        undo.append((name, previous, first))
                        if first:
                            self._originals[name] = previous
                        p.copy_(new)  # in place: references held elsewhere (tied heads, optimisers) stay valid
                    modules_done = self._add_modules(patch)
                    try:
                        self._add_memories(patch)
                    except BaseException:
                        self._undo_modules(modules_done)
                        raise
            except BaseException:
                with torch.no_grad():
                    for name, previous, first in reversed(undo):
                        self._net.get_parameter(name).copy_(previous)
                        if first:
                            del self._originals[name]
                raise
            for name, previous, _ in undo:
                self._before_top[name] = (pid, previous)
            self._entries.append(entry)
            if patch.modules:
                self.structure += 1
            log.debug("Applied patch %s (%s): %d weights, %d modules, %d memories", pid, patch.method,
                      len(targets), len(patch.modules), len(patch.memories))
            return entry

    # ----------------------------------------------------------------- remove

    def remove(self, patch_id: str) -> StackEntry:
        """Take patch ``patch_id`` out, wherever it is; the others stay applied, bit-exactly."""
        return self.remove_many([patch_id])[0]

    def remove_many(self, patch_ids: list[str]) -> list[StackEntry]:
        """Take several patches out at once (each touched weight is recomputed once).

        Reverting a long stack one patch at a time from the top would replay the deltas
        below each one; removing them together costs one copy of each base value.
        """
        with self.lock:
            ids = set(patch_ids)
            present = {e.patch_id for e in self._entries}
            for patch_id in patch_ids:
                if patch_id not in present:
                    raise PatchError(f"Patch {patch_id} is not applied to model '{self.name}'; there is nothing to revert.")
            removed = [e for e in self._entries if e.patch_id in ids]
            self._entries = [e for e in self._entries if e.patch_id not in ids]
            gone = {id(part) for e in removed for part in e.patch.modules}
            if gone:
                self._drop_modules(gone)
                self.structure += 1
            gone_memories = {id(part) for e in removed for part in e.patch.memories}
            if gone_memories:
                self._drop_memories(gone_memories)
            touched = list(dict.fromkeys(name for e in removed for name in e.deltas))
            with torch.no_grad():
                for name in touched:
                    self._restore(name, [e.patch_id for e in removed if name in e.deltas])
            log.debug("Reverted patches %s", ", ".join(e.patch_id for e in removed))
            return removed

    def _drop_modules(self, gone: set[int]) -> None:
        """Unhook the running modules of removed parts; a group is rebuilt from its other members
        (and so runs after the modules installed before the rebuild)."""
        for installed in [i for i in self._installed if any(id(p) in gone for p in i.parts)]:
            self._uninstall(installed)
            rest = [p for p in installed.parts if id(p) not in gone]
            if rest:
                self._install(installed.place, type(installed.module).combine(rest), rest)

    def _restore(self, name: str, removed_ids: list[str]) -> None:
        """Recompute parameter ``name`` as base + the remaining patches' deltas, in order."""
        p = self._net.get_parameter(name)
        touching = [e for e in self._entries if name in e.deltas]
        top = self._before_top.get(name)
        if top is not None and removed_ids == [top[0]]:
            # The only removed patch on it was the last to change it: its previous value is exact.
            p.copy_(top[1])
            del self._before_top[name]
        else:
            p.copy_(self._originals[name])
            for k, e in enumerate(touching):
                if k == len(touching) - 1:
                    before = self._originals[name] if k == 0 else p.detach().clone()
                    self._before_top[name] = (e.patch_id, before)
                p.copy_(_summed(p, e.deltas[name], e.patch_id))
        if not touching:
            del self._originals[name]
            self._before_top.pop(name, None)
