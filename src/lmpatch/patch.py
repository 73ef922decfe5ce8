"""Edits as data: a :class:`Patch` holds what an editing method computed, apart from the model.

Research editors overwrite the caller's weights in place and keep the originals in a
variable that is lost on the first exception, so "undo" is approximate or impossible and
an edit cannot be shipped to someone else. Here a method only *computes* a patch; the
caller decides when to apply it, can revert it bit-exactly, stack several, compose them,
save them as one safetensors file, or bake them into a plain Hugging Face checkpoint.

Applied state lives on the :class:`~lmpatch.model.loading.LoadedModel` (its ``applied``
list of :class:`AppliedPatch` records), never in module globals, so two models in one
process cannot interfere.

Extending with other patch kinds
--------------------------------
DESIGN.md names two more kinds besides weight deltas: *added modules* (GRACE codebooks,
T-Patcher neurons, WISE side memory) and *retrieval memories* (SERAC, IKE, MELLO). They
are not implemented yet; this module is shaped so that each becomes one more field of
:class:`Patch` next to ``deltas`` (e.g. ``modules: list[ModuleAddition]``,
``memories: list[RetrievalMemory]``) plus one branch in each of these places:

* ``Patch._apply_parts`` / ``AppliedPatch`` - install the part and keep what ``revert``
  needs to remove it exactly (for weight deltas: the original tensors; for an added
  module: the hook handle and the module it wraps);
* ``_restore`` - undo it; ``revert`` keeps the LIFO rule for parts touching the same
  module;
* ``Patch._manifest`` / ``Patch._tensors`` / ``_parse_manifest`` - serialise it into
  the same single safetensors file (tensors under their own key prefix, description in
  the JSON manifest), and add its feature name to the manifest's ``requires`` list so
  an older lmpatch refuses the file with a clear "upgrade" message instead of silently
  applying only the weight deltas;
* ``compose`` - concatenate parts of that kind;
* ``Patch.merge`` - modules that cannot be expressed as weights must say so
  (``PatchError``) or be saved as custom code, a choice for whoever adds them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lmpatch.errors import LmpatchError, PatchError
from lmpatch.request import EditRequest

__all__ = ["AppliedPatch", "Patch", "WeightDelta", "compose", "revert_patch_id"]

log = logging.getLogger(__name__)

FORMAT = "lmpatch.patch"
FORMAT_VERSION = 1
MANIFEST_KEY = "lmpatch"
PATCH_SUFFIX = ".lmpatch"
MERGE_MANIFEST = "lmpatch-merge.json"
#: Features this lmpatch can apply; a file whose ``requires`` names anything else is refused.
SUPPORTED_FEATURES = frozenset({"weight_deltas"})

DENSE = "dense"
LOW_RANK = "low_rank"


# --------------------------------------------------------------------------- weight deltas


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


@dataclass(eq=False)
class WeightDelta:
    """An additive change to one parameter, in that parameter's storage layout.

    Stored low-rank (``delta = left @ right``) when the method produces it that way (ROME
    is rank one, MEMIT rank <= batch size): a rank-1 change to a 576x1536 matrix is then
    2 112 numbers on disk instead of 884 736. Always float32 on CPU, whatever the model's
    dtype and device, so a patch is portable and the sum is done at full precision.
    """

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
        if self.is_low_rank:
            return self.left.numel() + self.right.numel()
        return self.dense.numel()

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


# --------------------------------------------------------------------------- applied state


@dataclass
class AppliedPatch:
    """What :meth:`Patch.revert` needs to undo one application, kept on ``LoadedModel.applied``.

    ``originals`` maps each touched parameter (by its canonical name, the first name
    ``named_parameters()`` gives a tied weight) to an exact copy of its value before the
    patch, on the parameter's own device.
    """

    patch_id: str
    method: str
    originals: dict[str, torch.Tensor]
    requests: list = field(default_factory=list)  # the edits now in the weights (AlphaEdit protects their keys)


def _applied_list(model: Any) -> list:
    applied = getattr(model, "applied", None)
    if not isinstance(applied, list) or not hasattr(model, "fingerprint"):
        raise PatchError(
            "Patches apply to an lmpatch model; wrap a transformers model with "
            "`lmpatch.wrap_model(model, tokenizer)` first."
        )
    return applied


def _canonical_names(module: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _restore(module: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, original in originals.items():
            module.get_parameter(name).copy_(original)


def revert_patch_id(model: Any, patch_id: str) -> None:
    """Revert the applied patch with this id, bit-exactly (used by :meth:`Patch.revert`).

    Patches that change the same parameter must be reverted in reverse order of
    application: undoing an earlier one would silently drop the later one's change.
    Patches on disjoint parameters may be reverted in any order.
    """
    applied = _applied_list(model)
    index = next((i for i in range(len(applied) - 1, -1, -1) if applied[i].patch_id == patch_id), None)
    if index is None:
        raise PatchError(f"Patch {patch_id} is not applied to model '{model.name}'; there is nothing to revert.")
    record = applied[index]
    for later in applied[index + 1 :]:
        shared = sorted(set(record.originals) & set(later.originals))
        if shared:
            more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
            raise PatchError(
                f"Patch {later.patch_id} ({later.method}) was applied after patch {patch_id} and also "
                f"changes '{shared[0]}'{more}; revert {later.patch_id} first."
            )
    _restore(model.model, record.originals)
    del applied[index]
    log.debug("Reverted patch %s on %s", patch_id, model.name)


# --------------------------------------------------------------------------- the patch


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lmpatch_version() -> str:
    from lmpatch import __version__  # lazily: lmpatch/__init__ imports this module

    return __version__


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() <= 64:
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _json_dict(value: Any, what: str) -> dict:
    """``value`` as it will read back from the file, so a loaded patch equals the saved one."""
    if value is None:
        return {}
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if not isinstance(value, dict):
        raise PatchError(f"Patch {what} must be a dict, got {type(value).__name__}.")
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise PatchError(f"Patch {what} cannot be stored as JSON: {exc}.") from exc


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


@dataclass(eq=False)
class Patch:
    """An edit computed for one base model: weight deltas plus a manifest saying where it came from.

    ``model_fingerprint`` is the fingerprint of the *base* model; patches stacked on
    each other all carry it, and :meth:`apply` refuses any other model. Compare patches
    by :attr:`patch_id`, not ``==`` (tensors have no single truth value).

    Fields may be changed after construction (methods set ``metrics`` once they have
    scored the edit), but not while the patch is applied: the applied record is found
    by :attr:`patch_id`, which changes with the deltas, method, hparams or requests.
    ``hparams`` and ``metrics`` are normalised to what JSON reads back (tuples become
    lists, dtypes strings), so a saved and re-loaded patch compares equal.
    """

    deltas: list[WeightDelta]
    method: str
    model_fingerprint: str
    model_name: str
    hparams: dict = field(default_factory=dict)
    requests: list[EditRequest] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    lmpatch_version: str = field(default_factory=_lmpatch_version)

    def __post_init__(self) -> None:
        self.deltas = list(self.deltas)
        seen: set[str] = set()
        for d in self.deltas:
            if not isinstance(d, WeightDelta):
                raise PatchError(f"Patch deltas must be WeightDelta objects, got {type(d).__name__}.")
            if d.param in seen:
                raise PatchError(
                    f"Patch has two deltas for '{d.param}'; give one delta per parameter (sum them, "
                    "or build separate patches and use lmpatch.patch.compose)."
                )
            seen.add(d.param)
        for attr in ("method", "model_fingerprint", "model_name"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise PatchError(f"Patch {attr} must be a non-empty string, got {getattr(self, attr)!r}.")
        self.hparams = _json_dict(self.hparams, "hparams")
        self.metrics = _json_dict(self.metrics, "metrics")
        try:
            self.requests = [
                r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in self.requests or ()
            ]
        except LmpatchError as exc:
            raise PatchError(f"Patch has an invalid edit request: {exc}") from exc

    # ----------------------------------------------------------------- identity

    def _identity(self) -> dict:
        """What the edit *is*; excludes when/where it was made and how it scored.

        ``created_at``, ``metrics``, ``lmpatch_version`` and ``model_name`` (a display
        label: the same base weights can be loaded from a hub id or a local dir) are left
        out so the same edit recomputed, re-evaluated or reloaded keeps its id.
        """
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "hparams": _json_dict(self.hparams, "hparams"),
            "requests": [r.to_dict() for r in self.requests],
            "deltas": [d.describe() for d in self.deltas],
        }

    @property
    def patch_id(self) -> str:
        """Short content hash of the deltas and the identifying manifest fields."""
        h = hashlib.sha256(_canonical_json(self._identity()).encode())
        for d in self.deltas:
            for role, t in d.tensors().items():
                h.update(f"{d.param}:{role}:{tuple(t.shape)}".encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Patch(id={self.patch_id}, method={self.method!r}, deltas={len(self.deltas)}, "
            f"requests={len(self.requests)}, model={self.model_name!r})"
        )

    # ----------------------------------------------------------------- apply / revert

    def _check_model(self, model: Any) -> list:
        applied = _applied_list(model)
        if model.fingerprint != self.model_fingerprint:
            raise PatchError(
                f"Patch {self.patch_id} was computed for model '{self.model_name}' (fingerprint "
                f"{self.model_fingerprint}) but this is model '{model.name}' (fingerprint "
                f"{model.fingerprint}); load the model the patch was made for."
            )
        return applied

    def _targets(self, model: Any) -> list[tuple[str, torch.nn.Parameter, WeightDelta]]:
        """Resolve and validate every delta before touching any weight (apply is all-or-nothing)."""
        module = model.model
        canonical = _canonical_names(module)
        targets: list[tuple[str, torch.nn.Parameter, WeightDelta]] = []
        seen: dict[str, str] = {}
        for d in self.deltas:
            try:
                p = module.get_parameter(d.param)
            except AttributeError:
                raise PatchError(
                    f"Patch {self.patch_id} changes parameter '{d.param}', which model '{model.name}' does not have."
                ) from None
            if tuple(p.shape) != d.shape:
                raise PatchError(
                    f"Patch {self.patch_id} has a delta of shape {d.shape} for '{d.param}', but that "
                    f"parameter has shape {tuple(p.shape)} in model '{model.name}'."
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
                    f"Patch {self.patch_id} has deltas for '{seen[name]}' and '{d.param}', which are the "
                    "same (tied) weight; put the whole change on one of them."
                )
            seen[name] = d.param
            targets.append((name, p, d))
        return targets

    def apply(self, model: Any) -> None:
        """Add the deltas to ``model``'s weights in place, remembering the originals on the model.

        Each sum is taken in float32 (float64 for float64 weights) on the parameter's own
        device, then cast back to its dtype. Each parameter is written in place, so
        references held elsewhere (optimisers, hooks, tied heads) stay valid, and through
        the tensor itself (not ``.data``), so its version counter moves and low-precision
        compute copies (:mod:`lmpatch.model.shadow`) see the change.
        """
        applied = self._check_model(model)
        patch_id = self.patch_id
        if any(r.patch_id == patch_id for r in applied):
            raise PatchError(
                f"Patch {patch_id} is already applied to model '{model.name}'; revert it before applying it again."
            )
        targets = self._targets(model)
        originals: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, p, d in targets:
                    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
                    original = p.detach().clone()
                    new = (original.to(acc) + d.materialize(acc, p.device)).to(p.dtype)
                    if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(original).all()):
                        raise PatchError(
                            f"Applying patch {patch_id} would overflow {p.dtype} in '{d.param}'; "
                            "load the model in a wider dtype (e.g. dtype='float32')."
                        )
                    originals[name] = original
                    p.copy_(new)
        except BaseException:
            _restore(model.model, originals)
            raise
        applied.append(AppliedPatch(patch_id=patch_id, method=self.method, originals=originals, requests=list(self.requests)))
        log.debug("Applied patch %s (%s, %d deltas) to %s", patch_id, self.method, len(targets), model.name)

    def revert(self, model: Any) -> None:
        """Restore the weights this patch changed to their exact pre-apply values."""
        revert_patch_id(model, self.patch_id)

    def is_applied(self, model: Any) -> bool:
        patch_id = self.patch_id
        return any(r.patch_id == patch_id for r in _applied_list(model))

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
        """The JSON stored in the file (everything but the tensors)."""
        deltas = []
        for i, d in enumerate(self.deltas):
            entry = d.describe()
            entry["tensors"] = {role: f"deltas.{i}.{role}" for role in d.tensors()}
            deltas.append(entry)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "requires": ["weight_deltas"],
            "method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "hparams": _json_dict(self.hparams, "hparams"),
            "requests": [r.to_dict() for r in self.requests],
            "metrics": _json_dict(self.metrics, "metrics"),
            "created_at": self.created_at,
            "lmpatch_version": self.lmpatch_version,
            "deltas": deltas,
            "patch_id": self.patch_id,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"deltas.{i}.{role}": t.contiguous()
            for i, d in enumerate(self.deltas)
            for role, t in d.tensors().items()
        }

    def summary(self) -> dict:
        """JSON-able description for ``lmpatch inspect``: the manifest plus per-delta norms."""
        manifest = self._manifest()
        for entry, d in zip(manifest["deltas"], self.deltas):
            entry["norm"] = d.norm()
            entry["stored_values"] = d.stored_numel
        return manifest

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file: the delta tensors, with the manifest as JSON metadata.

        Written to a temporary name and renamed, so a crash never leaves a half-written
        patch under the real name.
        """
        from safetensors.torch import save_file

        path = Path(path).expanduser()
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(self._tensors(), str(tmp), metadata={MANIFEST_KEY: json.dumps(self._manifest())})
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PatchError(f"Could not write patch to '{path}': {exc.strerror or exc}.") from exc
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Patch":
        """Read a patch written by :meth:`save`, checking it is complete and unaltered."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if path.is_dir():
            raise PatchError(f"'{path}' is a directory, not a patch file.")
        if not path.is_file():
            raise PatchError(f"No patch file at '{path}'.")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(MANIFEST_KEY)
                if raw is None:
                    raise PatchError(f"'{path}' is a safetensors file but not an lmpatch patch (no manifest).")
                manifest = _parse_manifest(raw, path)
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except PatchError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PatchError(
                f"'{path}' is not a readable patch file (not safetensors, truncated or corrupt: {reason})."
            ) from exc
        return _patch_from_manifest(manifest, tensors, path)

    # ----------------------------------------------------------------- merge

    def merge(self, model: Any, out_dir: str | os.PathLike) -> Path:
        """Write ``model`` with this patch applied as a plain Hugging Face checkpoint.

        The result loads with ``lmpatch.load_model(out_dir)`` or ``from_pretrained`` and
        needs no lmpatch. If the patch was not applied it is applied only for the save and
        reverted afterwards; other patches applied at the time are baked in as well and
        listed in ``lmpatch-merge.json``. Refuses a non-empty directory that is not an
        earlier merge, so a base checkpoint cannot be overwritten by accident.
        """
        self._check_model(model)
        out = Path(out_dir).expanduser()
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MERGE_MANIFEST).is_file())):
            raise PatchError(f"'{out}' already exists and is not an empty directory; merge into a new directory.")
        we_applied = not self.is_applied(model)
        if we_applied:
            self.apply(model)
        try:
            out.mkdir(parents=True, exist_ok=True)
            model.model.save_pretrained(out)
            model.tokenizer.save_pretrained(out)
            record = {
                "patch": self.summary(),
                "applied_patch_ids": [r.patch_id for r in _applied_list(model)],
                "base_model": model.name,
                "base_fingerprint": model.fingerprint,
                "merged_at": _now(),
            }
            (out / MERGE_MANIFEST).write_text(json.dumps(record, indent=2))
        except OSError as exc:
            raise PatchError(f"Could not write the merged checkpoint to '{out}': {exc.strerror or exc}.") from exc
        finally:
            if we_applied:
                self.revert(model)
        return out


# --------------------------------------------------------------------------- reading files


def _parse_manifest(raw: str, path: Path) -> dict:
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise PatchError(f"'{path}' has a corrupt manifest (not valid JSON).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PatchError(f"'{path}' has no valid lmpatch manifest.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PatchError(f"'{path}' has no valid format version in its manifest.")
    if version > FORMAT_VERSION:
        raise PatchError(
            f"'{path}' uses patch format version {version}, newer than this lmpatch reads "
            f"({FORMAT_VERSION}); upgrade lmpatch."
        )
    if version != FORMAT_VERSION:
        raise PatchError(f"'{path}' uses unknown patch format version {version}; this lmpatch reads {FORMAT_VERSION}.")
    requires = manifest.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise PatchError(f"'{path}' has an invalid 'requires' list in its manifest.")
    unknown = sorted(set(requires) - SUPPORTED_FEATURES)
    if unknown:
        raise PatchError(f"'{path}' needs patch features {unknown} that this lmpatch lacks; upgrade lmpatch.")
    return manifest


def _patch_from_manifest(manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> Patch:
    try:
        deltas = []
        for entry in manifest["deltas"]:
            parts = {role: tensors[key] for role, key in entry["tensors"].items()}
            if entry["kind"] not in (DENSE, LOW_RANK) or set(parts) != (
                {"dense"} if entry["kind"] == DENSE else {"left", "right"}
            ):
                raise ValueError(f"bad delta entry for {entry.get('param')!r}")
            delta = WeightDelta(entry["param"], **parts)
            if list(delta.shape) != list(entry["shape"]):
                raise ValueError(f"delta for {entry['param']!r} has shape {delta.shape}, manifest says {entry['shape']}")
            deltas.append(delta)
        patch = Patch(
            deltas=deltas,
            method=manifest["method"],
            model_fingerprint=manifest["model_fingerprint"],
            model_name=manifest["model_name"],
            hparams=manifest.get("hparams", {}),
            requests=manifest.get("requests", []),
            metrics=manifest.get("metrics", {}),
            created_at=manifest.get("created_at") or _now(),
            lmpatch_version=manifest.get("lmpatch_version") or "unknown",
        )
    except PatchError as exc:
        raise PatchError(f"'{path}' holds an invalid patch: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PatchError(f"'{path}' has an inconsistent manifest ({type(exc).__name__}: {exc}).") from exc
    stored_id = manifest.get("patch_id")
    if stored_id is not None and stored_id != patch.patch_id:
        raise PatchError(f"'{path}' is corrupt: its content does not match its recorded id {stored_id}.")
    return patch


# --------------------------------------------------------------------------- composition


def compose(patches: Sequence[Patch]) -> Patch:
    """One patch with the combined effect of applying ``patches`` (all for the same base model).

    Deltas on the same parameter are summed. Each part's method, id and hparams are kept
    under ``hparams["parts"]``; metrics are dropped because they described the parts.
    """
    patches = list(patches)
    if not patches:
        raise PatchError("compose needs at least one patch.")
    fingerprints = {p.model_fingerprint for p in patches}
    if len(fingerprints) > 1:
        names = ", ".join(f"{p.patch_id} -> {p.model_name} ({p.model_fingerprint})" for p in patches)
        raise PatchError(f"Cannot compose patches made for different base models: {names}.")
    by_param: dict[str, list[WeightDelta]] = {}
    for p in patches:
        for d in p.deltas:
            by_param.setdefault(d.param, []).append(d)
    return Patch(
        deltas=[_sum_deltas(name, parts) for name, parts in by_param.items()],
        method=f"compose({'+'.join(p.method for p in patches)})",
        model_fingerprint=patches[0].model_fingerprint,
        model_name=patches[0].model_name,
        hparams={"parts": [{"method": p.method, "patch_id": p.patch_id, "hparams": p.hparams} for p in patches]},
        requests=[r for p in patches for r in p.requests],
    )
