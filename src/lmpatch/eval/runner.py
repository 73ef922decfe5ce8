"""Experiment loops over many edit requests, resumable from a JSONL file.

The ``single`` regime (DESIGN principle 3): every edit is computed from the *original*
model, evaluated pre/post, and reverted before the next one. Each finished request is
appended to ``records.jsonl`` and flushed at once, so a crash or Ctrl-C loses at most
the request in flight and a rerun picks up where the last one stopped.

The loop is a plain function of its arguments (no module-level state, no singletons),
so shards of a sweep can later run as independent Ray tasks with their own ``out_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lmpatch.errors import LmpatchError, PatchError
from lmpatch.eval.metrics import DEFAULT_METRICS, evaluate_request, resolve_metrics, summarize
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
_SAMPLES_PER_PARAM = 256

EditFn = Callable[[LoadedModel, EditRequest], Any]


# --------------------------------------------------------------------------- restore check


@dataclass(frozen=True)
class ModelState:
    """A cheap signature of a model's weights and hooks, to prove a patch was reverted.

    Hashing every weight per request would cost as much as a forward pass; instead a
    fixed, evenly spaced sample of each parameter is kept. Weight-delta patches (ROME's
    rank-one update, MEMIT, fine-tuning) change every entry of the tensors they touch,
    so any sampled entry reveals an inexact revert; added modules or leftover hooks
    show up in the parameter names and hook counts.
    """

    samples: dict[str, torch.Tensor]
    hooks: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelState":
        samples = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                flat = p.detach().reshape(-1)
                k = min(_SAMPLES_PER_PARAM, flat.numel())
                idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
                samples[name] = flat[idx].to("cpu", copy=True)
        hooks = sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()  # noqa: SLF001
        )
        return cls(samples=samples, hooks=hooks)

    def differences(self, other: "ModelState") -> list[str]:
        """Human-readable list of what differs between two signatures (empty if equal)."""
        diffs = []
        added = sorted(set(other.samples) - set(self.samples))
        removed = sorted(set(self.samples) - set(other.samples))
        if added:
            diffs.append(f"parameters added: {', '.join(added[:5])}")
        if removed:
            diffs.append(f"parameters removed: {', '.join(removed[:5])}")
        changed = [n for n in self.samples if n in other.samples and not torch.equal(self.samples[n], other.samples[n])]
        if changed:
            diffs.append(f"weights changed: {', '.join(changed[:5])}" + (" ..." if len(changed) > 5 else ""))
        if self.hooks != other.hooks:
            diffs.append(f"forward hooks {self.hooks} -> {other.hooks}")
        return diffs


def check_restored(model: LoadedModel, baseline: ModelState, context: str, applied: int = 0) -> None:
    """Raise if ``model`` differs from ``baseline`` or holds more applied patches than before."""
    diffs = baseline.differences(ModelState.of(model.model))
    now_applied = len(getattr(model, "applied", None) or ())
    if now_applied != applied:
        diffs.append(f"{now_applied - applied} patch(es) still applied")
    if diffs:
        raise PatchError(
            f"The model was not restored to its original weights after {context} ({'; '.join(diffs)}); "
            "the patch's revert is not exact, so later edits would start from a modified model."
        )


# --------------------------------------------------------------------------- records file


def record_key(request: EditRequest, index: int) -> str | int:
    """Identity of a request across reruns: its case_id, or its position without one."""
    return request.case_id if request.case_id is not None else index


def _key_of(record: dict) -> str | int | None:
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


def _open_for_append(path: Path):
    fh = path.open("a+b")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":  # a torn line from a crash: start ours on a fresh line
            fh.write(b"\n")
    return fh


def _append(fh, record: dict) -> None:
    fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    fh.flush()
    os.fsync(fh.fileno())


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _timing(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"median": None, "p90": None, "total": 0.0}
    arr = np.asarray(seconds, dtype=float)
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "total": float(arr.sum())}


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
        console=Console(stderr=True),  # stdout stays clean for --json output
    )


# --------------------------------------------------------------------------- the loop


def run_single(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    edit_fn: EditFn,
    out_dir: Path | str,
    *,
    resume: bool = True,
    progress: bool = True,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 16,
    method: str | None = None,
) -> dict:
    """Edit and evaluate each request independently, from the original model.

    ``edit_fn(model, request)`` must return a patch (``apply``/``revert``/``applied``)
    without leaving the model changed. Only ``edit_fn`` is timed. With ``resume`` the
    requests already in ``out_dir/records.jsonl`` are skipped; without it the file is
    started afresh. Returns the summary also written to ``out_dir/summary.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = resolve_metrics(metrics)
    records_path = out / RECORDS_FILE
    if not resume and records_path.exists():
        records_path.unlink()
    done = {_key_of(r) for r in read_records(records_path)}
    keys = [record_key(r, i) for i, r in enumerate(requests)]
    if len(set(keys)) != len(keys):
        raise LmpatchError("Two edit requests share a case_id; case ids must be unique to resume a run.")
    pending = [i for i, k in enumerate(keys) if k not in done]
    if len(pending) < len(requests):
        log.info("Resuming: %d of %d requests already done in %s", len(requests) - len(pending), len(requests), out)

    baseline = ModelState.of(model.model)
    applied = len(getattr(model, "applied", None) or ())
    with _progress(progress) as bar, _open_for_append(records_path) as fh:
        task = bar.add_task("single edits", total=len(requests), completed=len(requests) - len(pending))
        for i in pending:
            request = requests[i]
            t0 = time.perf_counter()
            patch = edit_fn(model, request)
            seconds = time.perf_counter() - t0
            if not hasattr(patch, "applied"):
                raise LmpatchError(f"edit_fn returned {type(patch).__name__}, not a patch with apply/revert.")
            check_restored(model, baseline, f"computing edit {keys[i]!r}", applied)
            values = evaluate_request(model, request, patch, metrics=groups, batch_size=batch_size)
            check_restored(model, baseline, f"evaluating edit {keys[i]!r}", applied)
            record = {
                "case_id": request.case_id,
                "index": i,
                "method": getattr(patch, "method", None),
                "edit_seconds": seconds,
                **{k: v for k, v in values.items() if k != "case_id"},
            }
            _append(fh, record)
            bar.advance(task)

    wanted = set(keys)
    latest: dict[Any, dict] = {}
    for r in read_records(records_path):
        if _key_of(r) in wanted:
            latest[_key_of(r)] = r  # a rerun after a torn write may repeat a key: last one wins
    records = [latest[k] for k in keys if k in latest]
    stats = summarize(records)
    methods = sorted({r["method"] for r in records if r.get("method")})
    if len(methods) > 1:
        log.warning("%s holds records of several methods (%s); the summary mixes them.", out, ", ".join(methods))
    summary = {
        "method": method or (methods[0] if methods else None),
        "model": model.name,
        "fingerprint": model.fingerprint,
        "regime": "single",
        "n": len(records),
        "metrics": stats["metrics"],
        "metrics_pre": stats["metrics_pre"],
        "counts": stats["counts"],
        "protocols": stats["protocols"],
        "edit_seconds": _timing([r["edit_seconds"] for r in records]),
    }
    _write_json_atomic(out / SUMMARY_FILE, summary)
    return summary
