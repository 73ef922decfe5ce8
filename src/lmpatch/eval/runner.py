"""Experiment loops over many edit requests, resumable from a JSONL file.

The ``single`` and ``batch`` regimes: every update is computed from
the *original* model (one request per update in ``single``, ``batch_size`` requests in
``batch``), evaluated pre/post, and reverted before the next one. Each finished update's
requests are appended to ``records.jsonl`` and flushed at once, so a crash or Ctrl-C
loses at most the update in flight and a rerun picks up where the last one stopped.
The ``sequential`` regime, where updates accumulate, is :mod:`lmpatch.eval.sequential`.

The loop is a plain function of its arguments (no module-level state, no singletons),
so shards of a sweep can later run as independent Ray tasks with their own ``out_dir``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from lmpatch.errors import LmpatchError, PatchError
from lmpatch.eval.metrics import (
    DEFAULT_METRICS,
    evaluate_records,
    resolve_metrics,
    summarize,
)
from lmpatch.eval.records import (
    RECORDS_FILE,
    SUMMARY_FILE,
    TASKS_FILE,
    append_record,
    edit_parts,
    key_of,
    open_for_append,
    parts_total,
    read_records,
    record_key,
    scored_indices,
    timing,
)
from lmpatch.eval.tasks import Tasks, measure_tasks, task_metrics, task_protocols
from lmpatch.fileio import atomic_write_json
from lmpatch.model.loading import LoadedModel
from lmpatch.progress import run_progress
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

_SAMPLES_PER_PARAM = 256

EditFn = Callable[[LoadedModel, Any], Any]  # (model, request or list of requests) -> patch


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


# --------------------------------------------------------------------------- the loop


def unique_keys(requests: Sequence[EditRequest]) -> list:
    keys = [record_key(r, i) for i, r in enumerate(requests)]
    if len(set(keys)) != len(keys):
        raise LmpatchError("Two edit requests share a case_id; case ids must be unique to resume a run.")
    return keys


def run_single(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    edit_fn: EditFn,
    out_dir: Path | str,
    **kwargs: Any,
) -> dict:
    """Edit and evaluate each request independently, from the original model
    (:func:`run_independent` with one request per update)."""
    return run_independent(model, requests, edit_fn, out_dir, batch_size=1, **kwargs)


def run_independent(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    edit_fn: EditFn,
    out_dir: Path | str,
    *,
    batch_size: int = 1,
    resume: bool = True,
    progress: bool = True,
    metrics: Iterable[str] = DEFAULT_METRICS,
    eval_batch_size: int = 16,
    method: str | None = None,
    tasks: Tasks | None = None,
    task_updates: int = 3,
    score_n: int | None = None,
) -> dict:
    """Edit ``batch_size`` requests at a time, each update from the original model.

    ``edit_fn(model, request)`` (``batch_size`` 1) or ``edit_fn(model, [requests])``
    must return a patch (``apply``/``revert``/``applied``) without leaving the model
    changed. Only ``edit_fn`` is timed. Model-level ``tasks`` (PIQA, perplexity, ...) are
    measured once on the unedited model and, with each of the first ``task_updates``
    updates applied, averaged into ``<task>_after``: measuring them after every update
    would cost more than the edits. With ``resume`` the updates whose requests are all
    in ``out_dir/records.jsonl`` are skipped; without it the file is started afresh.
    ``score_n`` scores only that many evenly spaced requests (:func:`scored_indices`);
    the others are still edited and get a record without scores.
    Returns the summary also written to ``out_dir/summary.json``.
    """
    if batch_size < 1:
        raise LmpatchError(f"batch_size must be at least 1, got {batch_size}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = resolve_metrics(metrics)
    regime = "single" if batch_size == 1 else "batch"
    records_path = out / RECORDS_FILE
    if not resume and records_path.exists():
        records_path.unlink()
    keys = unique_keys(requests)
    scored = set(scored_indices(len(requests), score_n))
    done = {key_of(r) for r in read_records(records_path)}
    units = [list(range(i, min(i + batch_size, len(requests)))) for i in range(0, len(requests), batch_size)]
    pending = [u for u in units if not all(keys[i] in done for i in u)]
    if len(pending) < len(units):
        log.info("Resuming: %d of %d updates already done in %s", len(units) - len(pending), len(units), out)

    baseline = ModelState.of(model.model)
    applied = len(getattr(model, "applied", None) or ())
    task_state = _load_task_state(out, tasks, resume)
    label = "single edits" if regime == "single" else f"batches of {batch_size}"
    with run_progress(progress) as bar, open_for_append(records_path) as fh:
        if tasks and "before" not in task_state:
            task_state["before"] = measure_tasks(model, tasks)
            atomic_write_json(out / TASKS_FILE, task_state)
        task = bar.add_task(label, total=len(units), completed=len(units) - len(pending))
        for unit in pending:
            reqs = [requests[i] for i in unit]
            t0 = time.perf_counter()
            patch = edit_fn(model, reqs[0] if batch_size == 1 else reqs)
            seconds = time.perf_counter() - t0
            if not hasattr(patch, "applied"):
                raise LmpatchError(f"edit_fn returned {type(patch).__name__}, not a patch with apply/revert.")
            where = keys[unit[0]] if len(unit) == 1 else f"{keys[unit[0]]!r}..{keys[unit[-1]]!r}"
            check_restored(model, baseline, f"computing edit {where!r}", applied)
            to_score = [i for i in unit if i in scored]
            scores = dict(zip(to_score, evaluate_records(model, [requests[i] for i in to_score], patch,
                                                         metrics=groups, batch_size=eval_batch_size))) if to_score else {}
            after = task_state.setdefault("after", [])
            if tasks and len(after) < task_updates:
                with patch.applied(model):
                    after.append(measure_tasks(model, tasks))
                atomic_write_json(out / TASKS_FILE, task_state)
            check_restored(model, baseline, f"evaluating edit {where!r}", applied)
            for i in unit:
                v = scores.get(i, {})
                append_record(fh, {
                    "case_id": requests[i].case_id,
                    "index": i,
                    "update": unit[0] // batch_size,
                    "method": getattr(patch, "method", None),
                    "edit_seconds": seconds,
                    "edit_parts": edit_parts(patch),
                    "update_size": len(unit),
                    **{k: x for k, x in v.items() if k != "case_id"},
                })
            bar.advance(task)

    wanted = set(keys)
    latest: dict[Any, dict] = {}
    for r in read_records(records_path):
        if key_of(r) in wanted:
            latest[key_of(r)] = r  # a rerun after a torn write may repeat a key: last one wins
    records = [latest[k] for k in keys if k in latest]
    stats = summarize(records)
    methods = sorted({r["method"] for r in records if r.get("method")})
    if len(methods) > 1:
        log.warning("%s holds records of several methods (%s); the summary mixes them.", out, ", ".join(methods))
    per_update: dict[Any, float] = {}
    parts: dict[Any, dict] = {}
    for r in records:
        per_update.setdefault(r.get("update", key_of(r)), r["edit_seconds"])
        parts.setdefault(r.get("update", key_of(r)), r.get("edit_parts") or {})
    summary = {
        "method": method or (methods[0] if methods else None),
        "model": model.name,
        "fingerprint": model.fingerprint,
        "regime": regime,
        "batch_size": batch_size,
        "n": len(records),
        "scored": sum(1 for r in records if "pre" in r),
        "metrics": {**stats["metrics"], **task_metrics(task_state)},
        "metrics_pre": stats["metrics_pre"],
        "counts": stats["counts"],
        "protocols": {**stats["protocols"], **task_protocols(tasks)},
        "edit_seconds": timing(list(per_update.values())),
        "edit_parts": parts_total(list(parts.values())),
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary



def _load_task_state(out: Path, tasks: Tasks | None, resume: bool) -> dict:
    """Task scores already measured in this run directory (kept across resumes)."""
    path = out / TASKS_FILE
    if not tasks or not resume or not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if set(state.get("before", {})) == set(tasks) else {}
