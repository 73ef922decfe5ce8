"""Turning command-line strings into library arguments, with user-facing errors.

Everything here raises :class:`~lmpatch.errors.LmpatchError` for bad input, which the
app turns into one red line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from lmpatch.errors import LmpatchError


@dataclass(frozen=True)
class Settings:
    """Options given before the command name (``lmpatch -v --device cuda edit ...``)."""

    device: str = "cpu"
    verbosity: int = 0


def parse_sets(pairs: Sequence[str] | None, hparams_cls: type | None = None) -> dict[str, Any]:
    """``["v_steps=2", "layer=7"]`` -> ``{"v_steps": 2, "layer": 7}``.

    Values are read as JSON when they are JSON (numbers, true/false, null, lists) and kept
    as text otherwise; the method's dataclass then coerces them. For a tuple-typed field a
    single value or a comma-separated list becomes a tuple, so ``--set layers=20`` and
    ``--set layers=19,20`` both work where the field expects several layers.
    """
    fields = _tuple_fields(hparams_cls)
    values: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LmpatchError(f"--set expects key=value (e.g. --set v_steps=10), got {pair!r}.")
        value = _parse_value(raw.strip())
        if key in fields and value is not None and not isinstance(value, list):
            value = [_parse_value(v.strip()) for v in str(value).split(",")] if isinstance(value, str) else [value]
        values[key] = value
    return values


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _tuple_fields(cls: type | None) -> set[str]:
    if cls is None or not dataclasses.is_dataclass(cls):
        return set()
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        candidates = [hint, *typing.get_args(hint)]
        if any(c is tuple or typing.get_origin(c) is tuple for c in candidates):
            out.add(f.name)
    return out


def parse_layers(text: str | None) -> list[int] | None:
    """``"5,6"`` or ``"4-7"`` -> layer indices (negative indices count from the end)."""
    if text is None or not text.strip():
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)-(\d+)", part)
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if hi < lo:
                    raise ValueError(part)
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise LmpatchError(f"--layers expects comma-separated layer numbers or ranges like 5,6 or 4-7, got {text!r}.") from None
    return layers


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe, lower-case version of ``text`` (``"The Eiffel Tower"`` -> ``"the-eiffel-tower"``)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "edit"


def default_patch_path(subjects: Sequence[str], method: str, patch_id: str) -> Path:
    """Where ``lmpatch edit`` writes a patch when ``--out`` is not given.

    The short patch id makes the name unique per edit without ever overwriting a
    different patch, and stable when the same edit is recomputed.
    """
    head = slug(subjects[0]) if subjects else "edit"
    more = f"-and-{len(subjects) - 1}-more" if len(subjects) > 1 else ""
    return Path(f"{head}{more}-{slug(method)}-{patch_id[:8]}.lmpatch")


def default_run_dir(method: str, data: str, now: float | None = None) -> Path:
    """``runs/<method>-<data>-<timestamp>``; a data path contributes its file name without extensions."""
    name = Path(data).name
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    stamp = datetime.fromtimestamp(now if now is not None else time.time()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{slug(method)}-{slug(name)}-{stamp}"


def check_file(path: Path, what: str) -> Path:
    """``path`` if it is an existing file, else a user error naming ``what`` it should be."""
    path = path.expanduser()
    if not path.exists():
        raise LmpatchError(f"{what} '{path}' does not exist.")
    if not path.is_file():
        raise LmpatchError(f"{what} '{path}' is not a file.")
    return path
