"""The files a run directory holds, written so that nothing finished is ever lost.

Each finished unit of work is appended to a JSONL file and fsynced at once; summaries are
replaced atomically. A crash or Ctrl-C therefore loses at most the unit in flight, and a
torn last line (a crash mid-write) is skipped with a warning when the file is read back.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
TASKS_FILE = "tasks.json"


def record_key(request: EditRequest, index: int) -> str | int:
    """Identity of a request across reruns: its case_id, or its position without one."""
    return request.case_id if request.case_id is not None else index


def key_of(record: dict) -> str | int | None:
    return record["case_id"] if record.get("case_id") is not None else record.get("index")


def read_records(path: Path) -> list[dict]:
    """Records of a (possibly interrupted) run; a torn last line is ignored with a warning."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("Ignoring unreadable line %d of %s (interrupted write?)", lineno, path)
    return records


def open_for_append(path: Path):
    fh = path.open("a+b")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":  # a torn line from a crash: start ours on a fresh line
            fh.write(b"\n")
    return fh


def append_record(fh, record: dict) -> None:
    fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    fh.flush()
    os.fsync(fh.fileno())


def timing(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"median": None, "p90": None, "total": 0.0}
    arr = np.asarray(seconds, dtype=float)
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "total": float(arr.sum())}


# Parts of an update's time that a method reports in ``patch.metrics["edit"]`` (MEMIT's loop:
# target optimisation and the layer solves). Kept per update so a summary can tell a run
# that optimised its targets from one that found them in the target cache.
EDIT_PARTS = ("z_seconds", "spread_seconds")


def edit_parts(patch) -> dict:
    """The timed parts of one update, and whether its targets came from the cache."""
    info = (getattr(patch, "metrics", None) or {}).get("edit") or {}
    parts = {k: float(info[k]) for k in EDIT_PARTS if isinstance(info.get(k), (int, float))}
    if "z_cached" in info:
        parts["z_cached"] = int(info["z_cached"])
    return parts


def parts_total(per_update: Sequence[dict]) -> dict:
    """Sum of :func:`edit_parts` over updates (empty when the method reports none)."""
    total: dict[str, float] = {}
    for parts in per_update:
        for k, v in parts.items():
            total[k] = total.get(k, 0) + v
    return total


def scored_indices(n: int, score_n: int | None) -> list[int]:
    """Which of ``n`` edited requests a run scores: all of them, or ``score_n`` evenly
    spaced ones (always the first; spread over the run, so a sequential run's sample has
    early and late edits alike). Scoring thousands of edits pre and post, and again at
    every checkpoint, can cost more than editing them; a fixed sample keeps the averages
    honest estimates while every request is still edited."""
    if score_n is None or score_n >= n:
        return list(range(n))
    if score_n < 1:
        raise ValueError(f"score_n must be at least 1, got {score_n}")
    return sorted({(j * n) // score_n for j in range(score_n)})
