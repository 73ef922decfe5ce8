"""The ``.lmpatch`` file: one safetensors file, the parts' tensors plus a JSON manifest.

Layout: every part kind has a manifest section (``deltas``, ``modules``) listing one
entry per part; each entry names its tensors, stored under ``<section>.<i>.<role>``. The
manifest's ``requires`` lists the part kinds used, so a reader that lacks one refuses the
file with one "upgrade lmpatch" message instead of applying half of it. A file with only
weight deltas is byte-for-byte the first format, and keeps its id.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmpatch.errors import PatchError
from lmpatch.patch.jsonable import json_dict
from lmpatch.patch.parts import PART_KINDS
from lmpatch.patch.patch import FORMAT_VERSION, Patch, _now

FORMAT = "lmpatch.patch"
MANIFEST_KEY = "lmpatch"
PATCH_SUFFIX = ".lmpatch"
#: Part kinds this lmpatch can apply; a file whose ``requires`` names anything else is refused.
SUPPORTED_FEATURES = frozenset(PART_KINDS)


def manifest(patch: Patch) -> dict:
    """The JSON stored in the file (everything but the tensors)."""
    out = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "requires": patch.requires or ["weight_deltas"],
        "method": patch.method,
        "model_fingerprint": patch.model_fingerprint,
        "model_name": patch.model_name,
        "hparams": json_dict(patch.hparams, "hparams"),
        "requests": [r.to_dict() for r in patch.requests],
        "metrics": json_dict(patch.metrics, "metrics"),
        "created_at": patch.created_at,
        "lmpatch_version": patch.lmpatch_version,
    }
    for section, parts in patch.sections().items():
        entries = []
        for i, part in enumerate(parts):
            entry = part.describe()
            entry["tensors"] = {role: f"{section}.{i}.{role}" for role in part.tensors()}
            entries.append(entry)
        out[section] = entries
    out["patch_id"] = patch.patch_id
    return out


def tensors(patch: Patch) -> dict[str, torch.Tensor]:
    return {
        f"{section}.{i}.{role}": t.contiguous()
        for section, parts in patch.sections().items()
        for i, part in enumerate(parts)
        for role, t in part.tensors().items()
    }


def write(patch: Patch, path: str | os.PathLike) -> Path:
    """Save ``patch`` at ``path`` atomically (a crash never leaves a half-written file there)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from lmpatch.fileio import atomic_path, writable_file_problem, write_failure

    path = Path(path).expanduser()
    problem = writable_file_problem(path)
    if problem:
        raise PatchError(f"Could not write patch to '{path}': {problem}.")
    try:
        with atomic_path(path) as tmp:
            save_file(tensors(patch), str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest(patch))})
    except (OSError, SafetensorError) as exc:  # safetensors reports its own I/O errors (a full disk) as the latter
        raise PatchError(f"Could not write patch to '{path}': {write_failure(exc)}.") from exc
    return path


def read(path: str | os.PathLike) -> Patch:
    """Load a patch written by :func:`write`, checking it is complete and unaltered."""
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
            parsed = _parse_manifest(raw, path)
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except PatchError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PatchError(
            f"'{path}' is not a readable patch file (not safetensors, truncated or corrupt: {reason})."
        ) from exc
    return _patch_from_manifest(parsed, stored, path)


def _parse_manifest(raw: str, path: Path) -> dict:
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise PatchError(f"'{path}' has a corrupt manifest (not valid JSON).") from None
    if not isinstance(parsed, dict) or parsed.get("format") != FORMAT:
        raise PatchError(f"'{path}' has no valid lmpatch manifest.")
    version = parsed.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PatchError(f"'{path}' has no valid format version in its manifest.")
    if version > FORMAT_VERSION:
        raise PatchError(
            f"'{path}' uses patch format version {version}, newer than this lmpatch reads "
            f"({FORMAT_VERSION}); upgrade lmpatch."
        )
    if version != FORMAT_VERSION:
        raise PatchError(f"'{path}' uses unknown patch format version {version}; this lmpatch reads {FORMAT_VERSION}.")
    requires = parsed.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise PatchError(f"'{path}' has an invalid 'requires' list in its manifest.")
    unknown = sorted(set(requires) - SUPPORTED_FEATURES)
    if unknown:
        raise PatchError(f"'{path}' needs patch features {unknown} that this lmpatch lacks; upgrade lmpatch.")
    return parsed


def _patch_from_manifest(parsed: dict, stored: dict[str, torch.Tensor], path: Path) -> Patch:
    try:
        parts = []
        for cls, section in PART_KINDS.values():
            for entry in parsed.get(section, []):
                parts.append(cls.from_file(entry, {role: stored[key] for role, key in entry["tensors"].items()}))
        patch = Patch(
            parts=parts,
            method=parsed["method"],
            model_fingerprint=parsed["model_fingerprint"],
            model_name=parsed["model_name"],
            hparams=parsed.get("hparams", {}),
            requests=parsed.get("requests", []),
            metrics=parsed.get("metrics", {}),
            created_at=parsed.get("created_at") or _now(),
            lmpatch_version=parsed.get("lmpatch_version") or "unknown",
        )
    except PatchError as exc:
        raise PatchError(f"'{path}' holds an invalid patch: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PatchError(f"'{path}' has an inconsistent manifest ({type(exc).__name__}: {exc}).") from exc
    stored_id = parsed.get("patch_id")
    if stored_id is not None and stored_id != patch.patch_id:
        raise PatchError(f"'{path}' is corrupt: its content does not match its recorded id {stored_id}.")
    return patch
