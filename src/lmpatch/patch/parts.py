"""The kinds of change a patch is made of.

A :class:`~lmpatch.patch.Patch` is a list of *parts*. Every part kind answers the same
few questions, so the patch, its file format and the patch stack never branch on
what a method produced:

* ``part_kind`` - the feature name a file lists in ``requires`` when it holds such parts;
* ``describe()`` - the JSON entry for the manifest; with the tensors it is the part's
  identity (what feeds the patch id) and all that loading needs (never pickled code);
* ``tensors()`` - the arrays, saved under the part's own key prefix in the one
  safetensors file;
* ``from_file(entry, tensors)`` - the inverse of the two above;
* ``compose(parts)`` - how several parts of this kind become one list (sum, concatenate);
* ``mergeable`` - whether ``Patch.merge`` can bake the part into a plain checkpoint.

Installing a part into a model (and undoing it exactly) is the patch stack's job
(:mod:`lmpatch.patch.stack`), because it is the stack that knows what else is applied.

Kinds, each with the feature name a file lists in its ``requires``:

* :class:`WeightDelta` (``weight_deltas``) - an additive change to one parameter;
* :class:`ModuleAddition` (``module_additions``) - a small module run as a forward hook
  at a named place (a GRACE codebook, extra FFN neurons, a WISE side memory);
* :class:`RetrievalMemory` (``retrieval_memories``) - edited facts as text, their
  embeddings and the method's settings (SERAC, IKE, MemPrompt, MeLLo). It changes no
  weight and hooks no layer: applied, it rewrites the *prompt* the model is given
  (:meth:`lmpatch.model.loading.LoadedModel.format_prompts`), e.g. by putting the
  retrieved fact in front of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lmpatch.errors import PatchError

__all__ = [
    "AddedModule",
    "MemoryRuntime",
    "ModuleAddition",
    "PART_KINDS",
    "RetrievalMemory",
    "WeightDelta",
    "addition_type",
    "dense_is_smaller",
    "memory_type",
    "register_addition",
    "register_memory",
]

DENSE = "dense"
LOW_RANK = "low_rank"


def _own_float32(value: Any, what: str) -> torch.Tensor:
    """A private float32 CPU copy, so later in-place changes by the caller cannot alter the patch."""
    if not isinstance(value, torch.Tensor):
        raise PatchError(f"{what} must be a torch.Tensor, got {type(value).__name__}.")
    if value.is_complex() or value.dtype == torch.bool:
        raise PatchError(f"{what} must hold real numbers, got dtype {value.dtype}.")
    out = value.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise PatchError(f"{what} contains NaN or infinite values; the editing method diverged.")
    return out


# --------------------------------------------------------------------------- weight deltas


@dataclass(eq=False)
class WeightDelta:
    """An additive change to one parameter, in that parameter's storage layout.

    Stored low-rank (``delta = left @ right``) when the method produces it that way (ROME
    is rank one, MEMIT rank <= batch size): a rank-1 change to a 576x1536 matrix is then
    2 112 numbers on disk instead of 884 736. Always float32 on CPU, whatever the model's
    dtype and device, so a patch is portable and the sum is done at full precision.
    """

    part_kind: ClassVar[str] = "weight_deltas"
    mergeable: ClassVar[bool] = True

    param: str
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise PatchError(f"A weight delta needs a parameter name, got {self.param!r}.")
        has_dense = self.dense is not None
        has_factors = self.left is not None or self.right is not None
        if has_dense == has_factors:
            raise PatchError(
                f"Weight delta for '{self.param}' must set either `dense` or both `left` and `right`, "
                "not both and not neither."
            )
        if has_dense:
            self.dense = _own_float32(self.dense, f"Dense delta for '{self.param}'")
            return
        if self.left is None or self.right is None:
            raise PatchError(f"Low-rank delta for '{self.param}' needs both `left` and `right` factors.")
        left = _own_float32(self.left, f"Left factor for '{self.param}'")
        right = _own_float32(self.right, f"Right factor for '{self.param}'")
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise PatchError(
                f"Low-rank delta for '{self.param}' has factors of shapes {tuple(left.shape)} and "
                f"{tuple(right.shape)}; expected (rows, r) and (r, cols)."
            )
        self.left, self.right = left, right

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    @property
    def kind(self) -> str:
        """``dense`` or ``low_rank``: how the change is stored."""
        return LOW_RANK if self.is_low_rank else DENSE

    @property
    def shape(self) -> tuple[int, ...]:
        if self.is_low_rank:
            return (self.left.shape[0], self.right.shape[1])
        return tuple(self.dense.shape)

    @property
    def rank(self) -> int | None:
        """Number of factor columns for a low-rank delta; None for a dense one (not computed: costly)."""
        return int(self.left.shape[1]) if self.is_low_rank else None

    @property
    def stored_numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def materialize(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The full delta as a fresh tensor (safe to modify); products are taken in float32 or better."""
        if not self.is_low_rank:
            out = self.dense.to(device=device, dtype=dtype)
            return out.clone() if out is self.dense else out
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.left.to(device=device, dtype=acc) @ self.right.to(device=device, dtype=acc)).to(dtype)

    def norm(self) -> float:
        """Frobenius norm, computed from the factors for low-rank deltas (no full matrix built)."""
        if not self.is_low_rank:
            return float(torch.linalg.vector_norm(self.dense.double()))
        gram = (self.left.double().T @ self.left.double()) * (self.right.double() @ self.right.double().T)
        return float(gram.sum().clamp_min(0).sqrt())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role (``dense`` or ``left``/``right``)."""
        if self.is_low_rank:
            return {"left": self.left, "right": self.right}
        return {"dense": self.dense}

    def describe(self) -> dict:
        return {"param": self.param, "kind": self.kind, "shape": list(self.shape), "rank": self.rank}

    @classmethod
    def from_file(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> "WeightDelta":
        expected = {"dense"} if entry["kind"] == DENSE else {"left", "right"}
        if entry["kind"] not in (DENSE, LOW_RANK) or set(tensors) != expected:
            raise ValueError(f"bad delta entry for {entry.get('param')!r}")
        delta = cls(entry["param"], **tensors)
        if list(delta.shape) != list(entry["shape"]):
            raise ValueError(f"delta for {entry['param']!r} has shape {delta.shape}, manifest says {entry['shape']}")
        return delta

    @staticmethod
    def compose(parts: list["WeightDelta"]) -> list["WeightDelta"]:
        """One delta per parameter: deltas on the same parameter are summed."""
        by_param: dict[str, list[WeightDelta]] = {}
        for d in parts:
            by_param.setdefault(d.param, []).append(d)
        return [_sum_deltas(name, group) for name, group in by_param.items()]

    def __repr__(self) -> str:
        extra = f", rank={self.rank}" if self.is_low_rank else ""
        return f"WeightDelta({self.param!r}, {self.kind}, shape={self.shape}{extra})"


def dense_is_smaller(rows: int, rank: int, cols: int) -> bool:
    """Whether a rows × cols change of this rank takes no more room (and work) dense than as
    two factors. One break-even decides how deltas are built, summed and measured."""
    return rank * (rows + cols) >= rows * cols


def _sum_deltas(param: str, parts: list[WeightDelta]) -> WeightDelta:
    """One delta equal to the sum of ``parts``.

    Low-rank parts stay low-rank by stacking their factors (the sum of rank-r1 and rank-r2
    changes has rank <= r1 + r2), unless the stacked factors would take more room than the
    dense matrix, where dense is both smaller and faster to apply.
    """
    if len(parts) == 1:
        return WeightDelta(param, **parts[0].tensors())
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        raise PatchError(f"Cannot compose deltas of different shapes {sorted(shapes)} for '{param}'.")
    rows, cols = parts[0].shape if len(parts[0].shape) == 2 else (0, 0)
    if all(p.is_low_rank for p in parts):
        rank = sum(p.rank for p in parts)
        if not dense_is_smaller(rows, rank, cols):
            return WeightDelta(
                param,
                left=torch.cat([p.left for p in parts], dim=1),
                right=torch.cat([p.right for p in parts], dim=0),
            )
    total = parts[0].materialize()
    for p in parts[1:]:
        total += p.materialize()
    return WeightDelta(param, dense=total)


# --------------------------------------------------------------------------- added modules


class AddedModule(nn.Module):
    """The running side of a :class:`ModuleAddition`: a module called as a forward hook.

    Subclasses are registered by name (:func:`register_addition`) next to the method that
    makes them, and are rebuilt from a JSON config plus tensors, so a patch file never
    carries code. ``hook`` receives the host module's inputs and output and returns the
    output to use instead; hooks at the same place run in the order their patches were
    applied.
    """

    type_name: ClassVar[str] = ""
    #: Whether ``merge_into`` can write this addition into plain weights exactly.
    mergeable: ClassVar[bool] = False
    #: Grouped types run as *one* module per place for all applied patches of the type
    #: (a WISE side memory accumulates every edit); they implement ``combine`` and ``extend``.
    grouped: ClassVar[bool] = False

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> "AddedModule":
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able settings that, with :meth:`state`, rebuild this module."""
        raise NotImplementedError

    @classmethod
    def combine(cls, members: list["ModuleAddition"]) -> "AddedModule":
        """Grouped types: one running module for ``members`` (in order of application).

        Must equal building from the first member and ``extend``-ing with the others, so
        a group rebuilt after a removal is bit-identical to one grown from scratch.
        """
        raise NotImplementedError

    def extend(self, member: "ModuleAddition") -> None:
        """Grouped types: take one more member in, in place."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors that, with :meth:`config`, rebuild this module."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def hook(self, host: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        raise NotImplementedError

    def placed(self, device: torch.device, dtype: torch.dtype) -> "AddedModule":
        """This module on the host's ``device``, computing in ``dtype`` (the patch stack and the
        low-precision compute copies call it). Override to keep some state in float32, e.g.
        keys compared by distance, where rounding would change which inputs match."""
        return self.to(device=device, dtype=dtype)

    def merge_into(self, host: nn.Module) -> None:
        """Write the addition into ``host``'s own weights (only where exact; see ``mergeable``)."""
        raise PatchError(f"A {self.type_name} addition cannot be merged into plain weights.")

    @classmethod
    def after_merge(cls, net: nn.Module, spec: Any) -> None:
        """Called once per addition type after every addition of that type was merged into
        ``net`` (a copy of the model about to be saved; ``spec`` its
        :class:`~lmpatch.model.spec.ModelSpec`). For changes a checkpoint needs as a
        whole: added FFN neurons widen every layer to one width and update the config."""


def _register(table: dict[str, type], cls: type, kind: str) -> type:
    """Add ``cls`` to ``table`` under its ``type_name`` (the one registry rule of both runtimes)."""
    if not cls.type_name:
        raise TypeError(f"{cls.__name__} needs a type_name to be registered.")
    known = table.get(cls.type_name)
    if known is not None and known is not cls:
        raise TypeError(f"{kind} type {cls.type_name!r} is registered twice ({known.__name__}, {cls.__name__}).")
    table[cls.type_name] = cls
    return cls


def _lookup(table: dict[str, type], name: str, kind: str) -> type:
    """The class registered as ``name``; importing the methods registers every built-in one."""
    if name not in table:
        import lmpatch.methods  # noqa: F401 - each method module registers its types

    if name not in table:
        raise PatchError(
            f"This patch holds a {kind} of type {name!r}, which this lmpatch does not know; upgrade lmpatch."
        )
    return table[name]


_ADDITIONS: dict[str, type[AddedModule]] = {}


def register_addition(cls: type[AddedModule]) -> type[AddedModule]:
    """Class decorator: make ``cls`` loadable from patch files under ``cls.type_name``."""
    return _register(_ADDITIONS, cls, "Addition")


def addition_type(name: str) -> type[AddedModule]:
    """The registered added-module class for ``name``."""
    return _lookup(_ADDITIONS, name, "module")


def _state_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sorted(state.items())}


def _state_norm(state: dict[str, torch.Tensor]) -> float:
    return float(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in state.values()) ** 0.5)


def _check_shapes(entry: dict, tensors: dict[str, torch.Tensor], what: str) -> None:
    """A file's tensors must be exactly those its manifest entry lists."""
    if _state_shapes(tensors) != {k: list(v) for k, v in sorted(entry.get("shapes", {}).items())}:
        raise ValueError(f"tensors of {what} do not match the manifest")


@dataclass(eq=False)
class ModuleAddition:
    """A module inserted at ``place`` (a module path such as ``model.layers.20.mlp``).

    Stored as the type's name, a JSON config and tensors. :meth:`build` turns it into the
    registered :class:`AddedModule`, which the patch stack hooks onto the host module.
    """

    part_kind: ClassVar[str] = "module_additions"

    place: str
    type: str
    config: dict = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.place, str) or not self.place:
            raise PatchError(f"A module addition needs the path of its host module, got {self.place!r}.")
        if not isinstance(self.type, str) or not self.type:
            raise PatchError(f"A module addition needs a registered type name, got {self.type!r}.")
        from lmpatch.patch.jsonable import json_dict

        self.config = json_dict(self.config, f"config of the {self.type} addition")
        self.state = {
            str(k): _own_float32(v, f"Tensor '{k}' of the {self.type} addition") for k, v in self.state.items()
        }

    @classmethod
    def of(cls, place: str, module: AddedModule) -> "ModuleAddition":
        """The storable form of a running ``module`` hooked at ``place``."""
        return cls(place=place, type=module.type_name, config=module.config(), state=module.state())

    @property
    def mergeable(self) -> bool:
        return addition_type(self.type).mergeable

    def build(self) -> AddedModule:
        """A fresh running module (float32, CPU); the stack moves it to the host's device and dtype."""
        try:
            return addition_type(self.type).from_state(self.config, self.state)
        except PatchError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise PatchError(f"The {self.type} addition at '{self.place}' has unusable contents: {exc}.") from exc

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def describe(self) -> dict:
        return {
            "place": self.place,
            "type": self.type,
            "config": self.config,
            "shapes": _state_shapes(self.state),
        }

    @property
    def stored_numel(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def norm(self) -> float:
        return _state_norm(self.state)

    @classmethod
    def from_file(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> "ModuleAddition":
        addition_type(entry["type"])  # refuse a type this lmpatch does not know at load, not at apply
        _check_shapes(entry, tensors, f"the addition at {entry.get('place')!r}")
        return cls(place=entry["place"], type=entry["type"], config=entry.get("config", {}), state=tensors)

    @staticmethod
    def compose(parts: list["ModuleAddition"]) -> list["ModuleAddition"]:
        """Additions are kept side by side, in order: each runs as its own hook."""
        return list(parts)

    def __repr__(self) -> str:
        return f"ModuleAddition({self.type!r} at {self.place!r}, {self.stored_numel} values)"


# --------------------------------------------------------------------------- retrieval memories


class MemoryRuntime:
    """The running side of every applied :class:`RetrievalMemory` of one type and settings.

    Memories are always *grouped*: all applied SERAC edits are searched together (the
    best match over every stored fact decides), so a sequential run of a hundred edits
    is one runtime holding a hundred facts, not a hundred prompts wrapped in turn.
    Subclasses are registered by name (:func:`register_memory`) next to their method and
    rebuilt from JSON plus tensors, so a patch file never carries code.
    """

    type_name: ClassVar[str] = ""
    #: MeLLo answers multi-hop questions with its own retrieval loop instead of rewriting.
    answers_questions: ClassVar[bool] = False

    @classmethod
    def combine(cls, members: list["RetrievalMemory"]) -> "MemoryRuntime":
        """One runtime for ``members`` in order of application. Must equal building from the
        first member and ``extend``-ing with the rest, so a group rebuilt after a removal
        behaves exactly as one grown from scratch."""
        raise NotImplementedError

    def extend(self, member: "RetrievalMemory") -> None:
        """Take one more member in, in place."""
        raise NotImplementedError

    def rewrite(self, queries: list[str], current: list[str]) -> list[str]:
        """The prompts to run instead of ``current``.

        ``queries`` are the caller's prompts as given (what retrieval must look at);
        ``current`` are the same prompts after the memories applied before this one
        (what a template wraps). Return ``current[i]`` unchanged where no stored fact
        is in scope.
        """
        raise NotImplementedError


_MEMORIES: dict[str, type[MemoryRuntime]] = {}


def register_memory(cls: type[MemoryRuntime]) -> type[MemoryRuntime]:
    """Class decorator: make ``cls`` loadable from patch files under ``cls.type_name``."""
    return _register(_MEMORIES, cls, "Memory")


def memory_type(name: str) -> type[MemoryRuntime]:
    """The registered memory runtime for ``name``."""
    return _lookup(_MEMORIES, name, "memory")


@dataclass(eq=False)
class RetrievalMemory:
    """Edited facts kept as text, consulted when a prompt is formatted for the model.

    * ``type`` - the registered :class:`MemoryRuntime` that uses them;
    * ``settings`` - the method's settings (JSON); memories of one type are searched
      together only when their settings are equal;
    * ``entries`` - one JSON record per stored fact (its text, IKE's demonstrations, ...);
    * ``state`` - float32 tensors, e.g. ``keys`` with one embedding row per entry, so a
      loaded patch never has to re-embed its facts and behaves bit-for-bit as saved.
    """

    part_kind: ClassVar[str] = "retrieval_memories"
    mergeable: ClassVar[bool] = False

    type: str
    settings: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise PatchError(f"A retrieval memory needs a registered type name, got {self.type!r}.")
        from lmpatch.patch.jsonable import json_dict

        self.settings = json_dict(self.settings, f"settings of the {self.type} memory")
        if not isinstance(self.entries, list) or not self.entries:
            raise PatchError(f"A {self.type} memory needs a non-empty list of entries.")
        self.entries = json_dict({"entries": self.entries}, f"entries of the {self.type} memory")["entries"]
        self.state = {
            str(k): _own_float32(v, f"Tensor '{k}' of the {self.type} memory") for k, v in self.state.items()
        }

    @property
    def group_key(self) -> str:
        """Members with equal keys run as one :class:`MemoryRuntime`."""
        from lmpatch.patch.jsonable import canonical_json

        return f"{self.type}:{canonical_json(self.settings)}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def describe(self) -> dict:
        return {
            "type": self.type,
            "settings": self.settings,
            "entries": self.entries,
            "shapes": _state_shapes(self.state),
        }

    @property
    def stored_numel(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def norm(self) -> float:
        return _state_norm(self.state)

    @classmethod
    def from_file(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> "RetrievalMemory":
        memory_type(entry["type"])  # refuse a type this lmpatch does not know at load, not at apply
        _check_shapes(entry, tensors, f"the {entry.get('type')!r} memory")
        return cls(type=entry["type"], settings=entry.get("settings", {}), entries=entry["entries"], state=tensors)

    @staticmethod
    def compose(parts: list["RetrievalMemory"]) -> list["RetrievalMemory"]:
        """Memories are kept side by side, in order (the stack groups them when applied)."""
        return list(parts)

    def __repr__(self) -> str:
        return f"RetrievalMemory({self.type!r}, {len(self.entries)} entries)"


#: Part kinds in the order they are applied, by the feature name a file ``requires``.
#: The section of the manifest that lists each kind is given next to it.
PART_KINDS: dict[str, tuple[type, str]] = {
    WeightDelta.part_kind: (WeightDelta, "deltas"),
    ModuleAddition.part_kind: (ModuleAddition, "modules"),
    RetrievalMemory.part_kind: (RetrievalMemory, "memories"),
}

