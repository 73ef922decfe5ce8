"""Edits as data: a :class:`Patch` holds what an editing method computed, apart from the model.

Research editors overwrite the caller's weights in place and keep the originals in a
variable that is lost on the first exception, so "undo" is approximate or impossible and
an edit cannot be shipped to someone else. Here a method only *computes* a patch; the
caller decides when to apply it, can revert it bit-exactly, stack several, compose them,
save them as one safetensors file, or bake them into a plain Hugging Face checkpoint.

A patch is a list of parts (:mod:`lmpatch.patch.parts`: weight deltas, added modules,
retrieval memories)
plus a manifest saying where it came from. Applied state lives in the model's
:class:`~lmpatch.patch.stack.PatchStack`, never in module globals, so two models in one
process cannot interfere. The file format is in :mod:`lmpatch.patch.file`; the design is
described in ``docs/architecture.md``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lmpatch.errors import LmpatchError, PatchError
from lmpatch.fileio import atomic_dir, atomic_write_json, write_failure
from lmpatch.model.stamp import weight_stamp
from lmpatch.patch.jsonable import canonical_json, json_dict
from lmpatch.patch.parts import PART_KINDS, ModuleAddition, RetrievalMemory, WeightDelta
from lmpatch.request import EditRequest

__all__ = ["Patch", "compose", "write_merged"]

log = logging.getLogger(__name__)

#: Version of the identity and file layout; a patch with only weight deltas hashes as in version 1.
FORMAT_VERSION = 1
MERGE_MANIFEST = "lmpatch-merge.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lmpatch_version() -> str:
    from lmpatch import __version__  # lazily: lmpatch/__init__ imports this module

    return __version__


def _stack_of(model: Any):
    stack = getattr(model, "stack", None)
    if stack is None or not hasattr(model, "fingerprint"):
        raise PatchError(
            "Patches apply to an lmpatch model; wrap a transformers model with "
            "`lmpatch.wrap_model(model, tokenizer)` first."
        )
    return stack


def _kind_rank(part: Any) -> int:
    return list(PART_KINDS).index(part.part_kind)


@dataclass(eq=False)
class Patch:
    """An edit computed for one base model: its parts plus a manifest saying where it came from.

    ``parts`` are applied in kind order (weight deltas, added modules, memories), each kind in
    the order given. ``model_fingerprint`` is the fingerprint of the *base* model; patches
    stacked on each other all carry it, and :meth:`apply` refuses any other model.
    Compare patches by :attr:`patch_id`, not ``==`` (tensors have no single truth value).

    Fields may be changed after construction (methods set ``metrics`` once they have
    scored the edit), but not while the patch is applied: the applied record is found
    by :attr:`patch_id`, which changes with the parts, method, hparams or requests.
    ``hparams`` and ``metrics`` are normalised to what JSON reads back (tuples become
    lists, dtypes strings), so a saved and re-loaded patch compares equal.
    """

    parts: list
    method: str
    model_fingerprint: str
    model_name: str
    hparams: dict = field(default_factory=dict)
    requests: list[EditRequest] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    lmpatch_version: str = field(default_factory=_lmpatch_version)
    # the last patch_id and what it was computed from (see patch_id); not a field of the patch
    _id_memo: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = tuple(cls for cls, _ in PART_KINDS.values())
        for part in self.parts:
            if not isinstance(part, kinds):
                names = ", ".join(cls.__name__ for cls in kinds)
                raise PatchError(f"Patch parts must be one of {names}; got {type(part).__name__}.")
        self.parts = sorted(self.parts, key=_kind_rank)  # stable: each kind keeps its order
        seen: set[str] = set()
        for d in self.deltas:
            if d.param in seen:
                raise PatchError(
                    f"Patch has two deltas for '{d.param}'; give one delta per parameter (sum them, "
                    "or build separate patches and use lmpatch.patch.compose)."
                )
            seen.add(d.param)
        for attr in ("method", "model_fingerprint", "model_name"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise PatchError(f"Patch {attr} must be a non-empty string, got {getattr(self, attr)!r}.")
        self.hparams = json_dict(self.hparams, "hparams")
        self.metrics = json_dict(self.metrics, "metrics")
        try:
            self.requests = [
                r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in self.requests or ()
            ]
        except LmpatchError as exc:
            raise PatchError(f"Patch has an invalid edit request: {exc}") from exc

    # ----------------------------------------------------------------- parts by kind

    @property
    def deltas(self) -> list[WeightDelta]:
        return [p for p in self.parts if isinstance(p, WeightDelta)]

    @property
    def modules(self) -> list[ModuleAddition]:
        return [p for p in self.parts if isinstance(p, ModuleAddition)]

    @property
    def memories(self) -> list[RetrievalMemory]:
        return [p for p in self.parts if isinstance(p, RetrievalMemory)]

    def sections(self) -> dict[str, list]:
        """Manifest section name -> the parts stored there, for every kind this patch has.

        ``deltas`` is always present (an empty list included), as in the first file format.
        """
        out: dict[str, list] = {}
        for kind, (_, section) in PART_KINDS.items():
            parts = [p for p in self.parts if p.part_kind == kind]
            if parts or section == "deltas":
                out[section] = parts
        return out

    @property
    def requires(self) -> list[str]:
        """The part kinds a reader must know to apply this patch (listed in the file)."""
        return [kind for kind in PART_KINDS if any(p.part_kind == kind for p in self.parts)]

    @property
    def mergeable(self) -> bool:
        return all(p.mergeable for p in self.parts)

    # ----------------------------------------------------------------- identity

    def _identity(self) -> dict:
        """What the edit *is*; excludes when/where it was made and how it scored.

        ``created_at``, ``metrics``, ``lmpatch_version`` and ``model_name`` (a display
        label: the same base weights can be loaded from a hub id or a local dir) are left
        out so the same edit recomputed, re-evaluated or reloaded keeps its id.
        """
        identity = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "hparams": json_dict(self.hparams, "hparams"),
            "requests": [r.to_dict() for r in self.requests],
        }
        for section, parts in self.sections().items():
            identity[section] = [p.describe() for p in parts]
        return identity

    @property
    def patch_id(self) -> str:
        """Short content hash of the parts and the identifying manifest fields.

        Hashing the tensors is most of the cost (about 20 ms for a 32 MB patch) and an
        edit asks for the id of the same patch many times (apply, revert, is it applied,
        its preserved keys), so the id is remembered with the exact tensors it hashed: the
        memo holds them, so none can be freed and another take its place, and it is used
        only while the manifest is the same and no tensor was written since
        (:func:`~lmpatch.model.stamp.weight_stamp`)."""
        identity = canonical_json(self._identity())
        labelled = [(part.param if section == "deltas" else f"{section}.{i}", role, t)  # deltas: as in format 1
                    for section, parts in self.sections().items()
                    for i, part in enumerate(parts) for role, t in part.tensors().items()]
        tensors = [t for _, _, t in labelled]
        stamps = [weight_stamp(t) for t in tensors]
        memo = self._id_memo
        if (memo is not None and memo[0] == identity and len(memo[1]) == len(tensors)
                and all(a is b for a, b in zip(memo[1], tensors)) and memo[2] == stamps):
            return memo[3]
        h = hashlib.sha256(identity.encode())
        for label, role, t in labelled:
            h.update(f"{label}:{role}:{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy())
        self._id_memo = (identity, tensors, stamps, h.hexdigest()[:16])
        return self._id_memo[3]

    def __repr__(self) -> str:
        counts = ", ".join(f"{section}={len(parts)}" for section, parts in self.sections().items())
        return (
            f"Patch(id={self.patch_id}, method={self.method!r}, {counts}, "
            f"requests={len(self.requests)}, model={self.model_name!r})"
        )

    # ----------------------------------------------------------------- apply / revert

    def _check_model(self, model: Any):
        stack = _stack_of(model)
        if model.fingerprint != self.model_fingerprint:
            raise PatchError(
                f"Patch {self.patch_id} was computed for model '{self.model_name}' (fingerprint "
                f"{self.model_fingerprint}) but this is model '{model.name}' (fingerprint "
                f"{model.fingerprint}); load the model the patch was made for."
            )
        return stack

    def apply(self, model: Any) -> None:
        """Apply every part to ``model`` on top of the patches already there (see PatchStack.push).

        Weight sums are taken in float32 (float64 for float64 weights) on the parameter's
        own device and cast back to its dtype; each parameter is written in place, so
        references held elsewhere (optimisers, hooks, tied heads) stay valid and
        low-precision compute copies see the change.
        """
        self._check_model(model).push(self)

    def revert(self, model: Any) -> None:
        """Take this patch out of ``model``, wherever it sits in the stack; the rest stays, bit-exactly."""
        _stack_of(model).remove(self.patch_id)

    def is_applied(self, model: Any) -> bool:
        return self.patch_id in _stack_of(model)

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator["Patch"]:
        """Apply for the duration of a ``with`` block; reverted on exit, also when the body raises."""
        self.apply(model)
        try:
            yield self
        finally:
            self.revert(model)

    # ----------------------------------------------------------------- compose

    def compose(self, *others: "Patch") -> "Patch":
        """This patch followed by ``others`` as one patch (see :func:`compose`)."""
        return compose([self, *others])

    # ----------------------------------------------------------------- manifest / save / load

    def _manifest(self) -> dict:
        from lmpatch.patch.file import manifest

        return manifest(self)

    def summary(self) -> dict:
        """JSON-able description for ``lmpatch inspect``: the manifest plus per-part norms."""
        out = self._manifest()
        for section, parts in self.sections().items():
            for entry, part in zip(out[section], parts):
                entry["norm"] = part.norm()
                entry["stored_values"] = part.stored_numel
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file: the part tensors, with the manifest as JSON metadata."""
        from lmpatch.patch.file import write

        return write(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Patch":
        """Read a patch written by :meth:`save`, checking it is complete and unaltered."""
        from lmpatch.patch.file import read

        return read(path)

    # ----------------------------------------------------------------- merge

    def merge(self, model: Any, out_dir: str | os.PathLike) -> Path:
        """Write ``model`` with this patch applied as a plain Hugging Face checkpoint.

        The result loads with ``lmpatch.load_model(out_dir)`` or ``from_pretrained`` and
        needs no lmpatch. If the patch was not applied it is applied only for the save and
        reverted afterwards; other patches applied at the time are baked in as well and
        listed in ``lmpatch-merge.json``. Added modules are written into the host's
        weights where that is exact (their type says so); a patch holding any other
        addition is refused, since a plain checkpoint cannot run it. Refuses a non-empty
        directory that is not an earlier merge, so a base checkpoint cannot be
        overwritten by accident.
        """
        self._check_model(model)
        if not self.mergeable:
            raise _unmergeable(self)
        we_applied = not self.is_applied(model)
        if we_applied:
            self.apply(model)
        try:
            return write_merged(model, out_dir, {"patch": self.summary()})
        finally:
            if we_applied:
                self.revert(model)


def write_merged(model: Any, out_dir: str | os.PathLike, record: dict | None = None) -> Path:
    """Write ``model`` as it is now (base + every applied patch) as a plain Hugging Face
    checkpoint, with ``lmpatch-merge.json`` listing the patches (plus ``record``).

    The one writer behind :meth:`Patch.merge` and the service's snapshots. Refuses an
    applied patch a plain checkpoint cannot express, and a non-empty directory that is
    not an earlier merge.
    """
    stack = _stack_of(model)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MERGE_MANIFEST).is_file())):
        raise PatchError(f"'{out}' already exists and is not an empty directory; merge into a new directory.")
    for entry in stack:
        if not entry.patch.mergeable:
            raise _unmergeable(entry.patch, note=" (it is applied to the model too)")
    from safetensors import SafetensorError

    # Written next to ``out`` and renamed into place when complete: a failure (a full disk)
    # leaves no half checkpoint behind that would block the retry or be loaded as whole.
    try:
        with atomic_dir(out, complete=lambda _: False) as tmp:
            net = _with_additions_merged(model)
            net.save_pretrained(tmp)
            model.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MERGE_MANIFEST, {
                **(record or {}),
                "applied_patch_ids": stack.ids(),
                "base_model": model.name,
                "base_fingerprint": model.fingerprint,
                "merged_at": _now(),
            })
    except (OSError, SafetensorError) as exc:
        raise PatchError(f"Could not write the merged checkpoint to '{out}': {write_failure(exc)}.") from exc
    return out


def _unmergeable(patch: Patch, note: str = "") -> PatchError:
    kinds = sorted({m.type for m in patch.modules if not m.mergeable})
    what = [f"{', '.join(kinds)} module(s)"] if kinds else []
    if patch.memories:
        what.append(f"{', '.join(sorted({m.type for m in patch.memories}))} memory(ies) that rewrite prompts")
    return PatchError(
        f"Patch {patch.patch_id} ({patch.method}){note} adds {' and '.join(what)}, which a plain "
        "checkpoint cannot express; keep it as a patch file and apply it with lmpatch instead of merging."
    )


def _with_additions_merged(model: Any) -> torch.nn.Module:
    """The module to save: the model itself, or a copy with every added module written into its host.

    The copy's config is copied with it, so an addition that changes the checkpoint's shape
    (extra FFN neurons widen the MLPs) updates the copy's config, never the live model's."""
    additions = model.stack.additions()
    if not additions:
        return model.model
    net = copy.deepcopy(model.model)
    for installed in additions:
        host = net.get_submodule(installed.place)
        host._forward_hooks.pop(installed.handle.id, None)
        host._forward_hooks_with_kwargs.pop(installed.handle.id, None)
        installed.module.merge_into(host)
    for kind in dict.fromkeys(type(installed.module) for installed in additions):
        kind.after_merge(net, model.spec)
    return net


# --------------------------------------------------------------------------- composition


def compose(patches: Sequence[Patch]) -> Patch:
    """One patch with the combined effect of applying ``patches`` (all for the same base model).

    Each part kind composes by its own rule: deltas on the same parameter are summed,
    added modules are kept side by side in order. Each part's method, id and hparams are
    kept under ``hparams["parts"]``; metrics are dropped because they described the parts.
    """
    patches = list(patches)
    if not patches:
        raise PatchError("compose needs at least one patch.")
    strangers = sorted({type(p).__name__ for p in patches if not isinstance(p, Patch)})
    if strangers:
        raise PatchError(f"compose takes Patch objects (Patch.load a saved one), got {', '.join(strangers)}.")
    fingerprints = {p.model_fingerprint for p in patches}
    if len(fingerprints) > 1:
        names = ", ".join(f"{p.patch_id} -> {p.model_name} ({p.model_fingerprint})" for p in patches)
        raise PatchError(f"Cannot compose patches made for different base models: {names}.")
    parts: list = []
    for kind, (cls, _) in PART_KINDS.items():
        parts += cls.compose([part for p in patches for part in p.parts if part.part_kind == kind])
    return Patch(
        parts=parts,
        method=f"compose({'+'.join(p.method for p in patches)})",
        model_fingerprint=patches[0].model_fingerprint,
        model_name=patches[0].model_name,
        hparams={"parts": [{"method": p.method, "patch_id": p.patch_id, "hparams": p.hparams} for p in patches]},
        requests=[r for p in patches for r in p.requests],
    )
