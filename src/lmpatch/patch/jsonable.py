"""JSON as a patch stores it: what goes into the manifest reads back equal, and hashes stably."""
from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from lmpatch.errors import PatchError


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


def json_dict(value: Any, what: str) -> dict:
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


def canonical_json(value: Any) -> str:
    """One spelling per value (sorted keys, no spaces): the input of content hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
