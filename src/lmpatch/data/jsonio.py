"""Reading and writing record files: JSON or JSON Lines, optionally gzip-compressed.

Compression is recognised by the gzip magic bytes rather than the file name, and JSON vs
JSON Lines by content, so a user never has to rename a file to make it load.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterable

from lmpatch.errors import LmpatchError
from lmpatch.fileio import atomic_write_bytes

_GZIP_MAGIC = b"\x1f\x8b"


def read_text(path: Path) -> str:
    """The decoded text of ``path``, gunzipped when it is a gzip file."""
    if not path.exists():
        raise LmpatchError(f"Dataset file {path} does not exist; check the path or use a named dataset.")
    if not path.is_file():
        raise LmpatchError(f"{path} is not a file; give a JSON or JSON Lines file of edit records.")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise LmpatchError(f"{path} looks gzip-compressed but cannot be decompressed ({exc}).") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LmpatchError(f"{path} is not UTF-8 text; give a JSON or JSON Lines file of edit records.") from exc


def _is_jsonl_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def _parse_lines(text: str, path: Path) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LmpatchError(f"{path} line {number} is not valid JSON ({exc.msg}); each line must be one record.") from exc
    return items


def read_records(path: Path) -> list[Any]:
    """The top-level items of a record file: a JSON array, one JSON object, or JSON Lines.

    Items are returned unchecked; deciding whether they are edit records is the schema's job.
    """
    text = read_text(path)
    if not text.strip():
        raise LmpatchError(f"{path} is empty; it must hold edit records as a JSON array or JSON Lines.")
    if _is_jsonl_name(path):
        data: Any = _parse_lines(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as whole_error:
            if len(text.strip().splitlines()) < 2:
                raise LmpatchError(f"{path} is not valid JSON ({whole_error}).") from whole_error
            data = _parse_lines(text, path)
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise LmpatchError(f"{path} holds a JSON {type(data).__name__}; expected a list of edit records.")
    return data


def write_jsonl(path: Path, items: Iterable[dict]) -> Path:
    """Write one JSON object per line; gzip-compressed when the name ends in ``.gz``."""
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    data = text.encode("utf-8")
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    return atomic_write_bytes(path, data)
