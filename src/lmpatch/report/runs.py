"""Reading the run directories ``lmpatch eval`` writes, including unfinished ones.

A run directory holds ``records.jsonl`` (one line per finished request, appended as the
run goes) and, once the run ends, ``summary.json``. A run that was interrupted, or is
still going, has only the records; it is summarised from them so that a report can be
made while an experiment runs. The summary is authoritative when present: the records
file may also hold requests of an earlier, longer run in the same directory.

Reading JSON must not need torch or transformers, so the evaluation modules (which
import both) are imported only when records have to be summarised.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lmpatch.errors import LmpatchError
from lmpatch.report.catalog import is_number

log = logging.getLogger(__name__)

# The names lmpatch.eval.runner writes (kept in sync by a test, not by an import: see above).
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"

# Per-request record fields that are bookkeeping or raw text, not metrics.
_NOT_METRICS = frozenset({"generations", "wild_generations", "efficacy"})


class RunDirError(LmpatchError):
    """A path given as a run directory that is not one, or whose files cannot be read."""


@dataclass(frozen=True)
class CurvePoint:
    """Scores of all edits made so far, measured after ``edits`` edits (batch/sequential runs)."""

    edits: int
    metrics: dict[str, Any]
    metrics_pre: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One run's summary, whether read from ``summary.json`` or rebuilt from its records."""

    path: Path
    method: str | None
    model: str | None
    data: str | None
    regime: str | None
    n: int
    metrics: dict[str, Any]
    metrics_pre: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    protocols: dict[str, str] = field(default_factory=dict)
    edit_seconds: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    fingerprint: str | None = None
    curve: tuple[CurvePoint, ...] = ()
    complete: bool = True

    @property
    def name(self) -> str:
        return self.method or self.path.name

    @property
    def cost(self) -> dict[str, Any]:
        """Edit time and memory under the metric keys the report catalogue uses for them."""
        t = self.edit_seconds
        return {
            "edit_seconds_median": t.get("median"),
            "edit_seconds_p90": t.get("p90"),
            "edit_seconds_total": t.get("total") if self.n else None,
            "peak_rss_mb": self.peak_rss_mb,
        }

    def post_metrics(self) -> dict[str, Any]:
        """Edited-model values, with the cost figures alongside as ordinary keys."""
        return {**self.metrics, **{k: v for k, v in self.cost.items() if v is not None}}

    def keys(self) -> set[str]:
        """Every metric key this run has a value for, in its tables or along its curve."""
        keys = {k for k, v in self.post_metrics().items() if v is not None}
        keys |= {k for k, v in self.metrics_pre.items() if v is not None}
        for point in self.curve:
            keys |= {k for k, v in point.metrics.items() if v is not None}
        return keys


def load_run(path: Path | str) -> Run:
    """Read one run directory (a path to its ``summary.json`` or ``records.jsonl`` also works)."""
    path = Path(path)
    if path.is_file() and path.name in (SUMMARY_FILE, RECORDS_FILE):
        path = path.parent
    if not path.exists():
        raise RunDirError(f"No run directory at {path}; pass a directory written by `lmpatch eval --out`.")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory; pass the directory `lmpatch eval --out` wrote.")
    summary_path, records_path = path / SUMMARY_FILE, path / RECORDS_FILE
    if summary_path.is_file():
        return _from_summary(path, _read_summary(summary_path))
    if records_path.is_file():
        return _from_records(path, records_path)
    raise RunDirError(
        f"{path} is not a run directory: it has neither {SUMMARY_FILE} nor {RECORDS_FILE} "
        "(pass a directory written by `lmpatch eval --out`)."
    )


def load_runs(paths: Sequence[Path | str]) -> list[Run]:
    """Read several run directories, in the order given."""
    if not paths:
        raise RunDirError("No run directories given; pass at least one directory written by `lmpatch eval`.")
    return [load_run(p) for p in paths]


# --------------------------------------------------------------------------- summary.json


def _read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"Cannot read {path}: {exc}.") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); rerun `lmpatch eval` to rewrite it.") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a run summary (expected a JSON object, got {type(data).__name__}).")
    return data


def _table(data: Mapping, key: str, where: Path) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise RunDirError(f"{where}: {key!r} should be an object of metric values, got {type(value).__name__}.")
    return dict(value)


def _curve(data: Mapping, where: Path) -> tuple[CurvePoint, ...]:
    raw = data.get("curve") or []
    if not isinstance(raw, list):
        raise RunDirError(f"{where}: 'curve' should be a list of checkpoints, got {type(raw).__name__}.")
    points = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not is_number(item.get("edits")) or isinstance(item.get("edits"), bool):
            raise RunDirError(f"{where}: curve checkpoint {i} needs an integer 'edits' and a 'metrics' object.")
        points.append(CurvePoint(
            edits=int(item["edits"]),
            metrics=_table(item, "metrics", where),
            metrics_pre=_table(item, "metrics_pre", where),
        ))
    return tuple(sorted(points, key=lambda p: p.edits))


def _from_summary(path: Path, data: dict) -> Run:
    where = path / SUMMARY_FILE
    n = data.get("n")
    timing = data.get("edit_seconds") or {}
    peak = data.get("peak_rss_mb")
    return Run(
        path=path,
        method=_text(data.get("method")),
        model=_text(data.get("model")),
        data=_text(data.get("data")),
        regime=_text(data.get("regime")),
        n=int(n) if is_number(n) else 0,
        metrics=_table(data, "metrics", where),
        metrics_pre=_table(data, "metrics_pre", where),
        counts={k: v for k, v in _table(data, "counts", where).items() if is_number(v)},
        protocols={k: str(v) for k, v in _table(data, "protocols", where).items() if v},
        edit_seconds=dict(timing) if isinstance(timing, dict) else {},
        peak_rss_mb=float(peak) if is_number(peak) else None,
        fingerprint=_text(data.get("fingerprint")),
        curve=_curve(data, where),
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------- records only


def _key_of(record: dict) -> Any:
    return record["case_id"] if record.get("case_id") is not None else record.get("index")


def _from_records(path: Path, records_path: Path) -> Run:
    from lmpatch.eval.metrics import summarize
    from lmpatch.eval.records import read_records

    latest: dict[Any, dict] = {}
    for record in read_records(records_path):
        if isinstance(record, dict) and all(isinstance(record.get(s, {}), dict) for s in ("pre", "post")):
            latest[_key_of(record)] = record  # a resumed run may repeat a request: the last one wins
    records = list(latest.values())
    if not records:
        raise RunDirError(f"{path} has no finished requests yet ({RECORDS_FILE} is empty); wait for the run or rerun it.")
    stats = summarize(records)
    metrics, metrics_pre = dict(stats["metrics"]), dict(stats["metrics_pre"])
    counts = dict(stats["counts"])
    covered = set(metrics_pre) | set(metrics)
    for side, table in (("post", metrics), ("pre", metrics_pre)):
        for key, (mean, count) in _extra_means(records, side, covered).items():
            table[key] = mean
            if side == "post":
                counts[key] = count
    methods = sorted({str(r["method"]) for r in records if r.get("method")})
    seconds = [float(r["edit_seconds"]) for r in records if is_number(r.get("edit_seconds"))]
    log.info("%s has no %s; summarised %d records", path, SUMMARY_FILE, len(records))
    return Run(
        path=path,
        method="+".join(methods) or None,
        model=None,
        data=None,
        regime=None,
        n=len(records),
        metrics=metrics,
        metrics_pre=metrics_pre,
        counts=counts,
        protocols=dict(stats["protocols"]),
        edit_seconds=_timing(seconds),
        complete=False,
    )


def _extra_means(records: Sequence[dict], side: str, covered: set[str]) -> dict[str, tuple[float, int]]:
    """Means of numeric per-request values that :func:`summarize` does not know about yet.

    Metrics added after this code was written must still reach the report of an
    unfinished run, so every numeric key is averaged the way ``summarize`` averages its
    own (unweighted over the requests that have it).
    """
    values: dict[str, list[float]] = {}
    for record in records:
        table = record.get(side)
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            if key in covered or key in _NOT_METRICS or not is_number(value):
                continue
            values.setdefault(key, []).append(float(value))
    return {k: (sum(v) / len(v), len(v)) for k, v in values.items()}


def _timing(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"median": None, "p90": None, "total": None}
    arr = np.asarray(seconds, dtype=float)
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "total": float(arr.sum())}
