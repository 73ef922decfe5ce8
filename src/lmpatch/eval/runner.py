"""Experiment loops over many edit requests, resumable from a JSONL file.

The ``single`` and ``batch`` regimes: every update is computed from
the *original* model (one request per update in ``single``, ``batch_size`` requests in
``batch``), evaluated pre/post, and reverted before the next one. Each finished update's
requests are appended to ``records.jsonl`` and flushed at once, so a crash or Ctrl-C
loses at most the update in flight and a rerun picks up where the last one stopped.
The ``sequential`` regime, where updates accumulate, is :mod:`lmpatch.eval.sequential`.

One update is :class:`UpdateRunner`'s job, and :func:`run_updates` is the loop around it
that owns the run directory; the two meet through a backend
(:mod:`lmpatch.eval.parallel`), so the same updates run in this process, in local worker
processes or on Ray actors and leave the same files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

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
from lmpatch.eval.run_identity import claim_run, run_identity
from lmpatch.eval.tasks import Tasks, measure_tasks, task_metrics, task_protocols
from lmpatch.fileio import atomic_write_json
from lmpatch.model.loading import LoadedModel
from lmpatch.progress import run_progress
from lmpatch.request import EditRequest

if TYPE_CHECKING:
    from lmpatch.eval.parallel import Backend

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
    settings: dict | None = None,
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
    the others are still edited and get a record without scores. ``settings`` (the
    method's hyperparameters, the data, ...) join the run's identity: a resume with other
    settings is refused (:mod:`lmpatch.eval.run_identity`).
    Returns the summary also written to ``out_dir/summary.json``.

    This is :func:`run_updates` on this process's ``model``; the same run sharded over
    worker processes is :mod:`lmpatch.eval.parallel`.
    """
    from lmpatch.eval.parallel import SerialBackend

    worker = UpdateRunner(model, requests, edit_fn, metrics=metrics, eval_batch_size=eval_batch_size, tasks=tasks)
    return run_updates(SerialBackend(worker), requests, out_dir, identity=ModelIdentity.of(model),
                       batch_size=batch_size, resume=resume, progress=progress, method=method, tasks=tasks,
                       task_updates=task_updates, score_n=score_n, settings=settings)


# --------------------------------------------------------------------------- one update


@dataclass(frozen=True)
class ModelIdentity:
    """What a summary says about the model: its name and the fingerprint of its base weights.

    Kept apart from the model so the process that writes a sharded run's files need not
    hold a model at all."""

    name: str
    fingerprint: str

    @classmethod
    def of(cls, model: LoadedModel) -> "ModelIdentity":
        return cls(name=model.name, fingerprint=model.fingerprint)


@dataclass(frozen=True)
class UpdateJob:
    """One unit of work of an independent run, small enough to send to another process.

    ``indices`` are positions in the run's request list, edited together as update
    ``update`` (one request each in the single regime); ``scored`` are those of them to
    score pre and post. ``measure_tasks`` also measures the whole-model tasks with the
    update applied. A job with ``kind == "tasks_before"`` (and no indices) measures the
    tasks on the unedited model instead.
    """

    update: int
    indices: tuple[int, ...] = ()
    scored: tuple[int, ...] = ()
    batched: bool = False
    measure_tasks: bool = False
    kind: Literal["update", "tasks_before"] = "update"


@dataclass(frozen=True)
class UpdateResult:
    """What a job produced: the records of its requests (in request order) and task scores, if measured."""

    job: UpdateJob
    records: list[dict] = field(default_factory=list)
    tasks: dict[str, float] | None = None


class UpdateRunner:
    """Runs the jobs of an independent run on one model: edit, prove the model unchanged,
    score pre/post, measure tasks, prove it unchanged again.

    The one implementation of an update, whichever backend runs it: the serial loop calls
    it in this process, and every worker process or Ray actor holds one of its own (see
    :mod:`lmpatch.eval.parallel`). Each job starts from the model as it was when the
    runner was made, which is what lets independent updates run anywhere, in any order.
    """

    def __init__(
        self,
        model: LoadedModel,
        requests: Sequence[EditRequest],
        edit_fn: EditFn,
        *,
        metrics: Iterable[str] = DEFAULT_METRICS,
        eval_batch_size: int = 16,
        tasks: Tasks | None = None,
    ) -> None:
        self.model = model
        self.requests = list(requests)
        self.edit_fn = edit_fn
        self.groups = resolve_metrics(metrics)
        self.eval_batch_size = eval_batch_size
        self.tasks = tasks
        self.keys = unique_keys(self.requests)
        self.baseline = ModelState.of(model.model)
        self.applied = len(getattr(model, "applied", None) or ())

    def run(self, job: UpdateJob) -> UpdateResult:
        model = self.model
        if job.kind == "tasks_before":
            return UpdateResult(job, tasks=measure_tasks(model, self.tasks) if self.tasks else {})
        reqs = [self.requests[i] for i in job.indices]
        t0 = time.perf_counter()
        patch = self.edit_fn(model, reqs if job.batched else reqs[0])
        seconds = time.perf_counter() - t0
        if not hasattr(patch, "applied"):
            raise LmpatchError(f"edit_fn returned {type(patch).__name__}, not a patch with apply/revert.")
        first, last = self.keys[job.indices[0]], self.keys[job.indices[-1]]
        where = first if len(job.indices) == 1 else f"{first!r}..{last!r}"
        check_restored(model, self.baseline, f"computing edit {where!r}", self.applied)
        to_score = [i for i in job.indices if i in job.scored]
        scores = dict(zip(to_score, evaluate_records(model, [self.requests[i] for i in to_score], patch,
                                                     metrics=self.groups, batch_size=self.eval_batch_size))) if to_score else {}
        task_scores = None
        if self.tasks and job.measure_tasks:
            with patch.applied(model):
                task_scores = measure_tasks(model, self.tasks)
        check_restored(model, self.baseline, f"evaluating edit {where!r}", self.applied)
        records = []
        for i in job.indices:
            v = scores.get(i, {})
            records.append({
                "case_id": self.requests[i].case_id,
                "index": i,
                "update": job.update,
                "method": getattr(patch, "method", None),
                "edit_seconds": seconds,
                "edit_parts": edit_parts(patch),
                "update_size": len(job.indices),
                **{k: x for k, x in v.items() if k != "case_id"},
            })
        return UpdateResult(job, records, task_scores)


# --------------------------------------------------------------------------- the driver


def plan_updates(
    requests: Sequence[EditRequest],
    done: set,
    *,
    batch_size: int,
    score_n: int | None,
    measure_first: int,
) -> tuple[list[UpdateJob], int]:
    """The updates still to run (those with a request missing from ``done``), in order, and
    how many updates the run has in all. The first ``measure_first`` of them also measure tasks."""
    keys = unique_keys(requests)
    scored = set(scored_indices(len(requests), score_n))
    units = [tuple(range(i, min(i + batch_size, len(requests)))) for i in range(0, len(requests), batch_size)]
    jobs = []
    for unit in units:
        if all(keys[i] in done for i in unit):
            continue
        jobs.append(UpdateJob(update=unit[0] // batch_size, indices=unit,
                              scored=tuple(i for i in unit if i in scored), batched=batch_size > 1,
                              measure_tasks=len(jobs) < measure_first))
    return jobs, len(units)


def run_updates(
    backend: "Backend",
    requests: Sequence[EditRequest],
    out_dir: Path | str,
    *,
    identity: ModelIdentity,
    batch_size: int = 1,
    resume: bool = True,
    progress: bool = True,
    method: str | None = None,
    tasks: Tasks | None = None,
    task_updates: int = 3,
    score_n: int | None = None,
    settings: dict | None = None,
) -> dict:
    """Run an independent (single or batch) regime on ``backend`` and write its run directory.

    This process is the only writer, whichever backend computes: it decides what is left
    to do from ``records.jsonl`` (resume), hands the jobs out, appends each result as it
    comes back (fsynced; results that arrive early wait for the ones before them, so the
    file stays in request order) and writes ``tasks.json`` and ``summary.json``
    atomically. A serial run and a sharded one therefore leave the same directory, and
    either can resume the other. ``tasks`` (built on the workers' side too) only give
    their names and protocols here. Arguments are those of :func:`run_independent`.
    """
    if batch_size < 1:
        raise LmpatchError(f"batch_size must be at least 1, got {batch_size}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    regime = "single" if batch_size == 1 else "batch"
    claim_run(out, run_identity(**{"method": method, "model": identity.fingerprint, "regime": regime,
                                   "batch_size": batch_size, "metrics": backend.metric_groups,
                                   **(settings or {})}), resume)
    records_path = out / RECORDS_FILE
    if not resume and records_path.exists():
        records_path.unlink()
    keys = unique_keys(requests)
    done = {key_of(r) for r in read_records(records_path)}
    task_state = _load_task_state(out, tasks, resume)
    measured = len(task_state.get("after", [])) if tasks else 0
    jobs, total = plan_updates(requests, done, batch_size=batch_size, score_n=score_n,
                               measure_first=max(0, task_updates - measured) if tasks else 0)
    if len(jobs) < total:
        log.info("Resuming: %d of %d updates already done in %s", total - len(jobs), total, out)
    before = [UpdateJob(update=-1, kind="tasks_before")] if tasks and "before" not in task_state else []

    label = "single edits" if regime == "single" else f"batches of {batch_size}"
    if backend.workers > 1:
        label += f" ({backend.workers} {backend.name} workers)"
    position = {job.update: k for k, job in enumerate(jobs)}
    waiting: dict[int, UpdateResult] = {}
    written = 0
    with run_progress(progress) as bar, open_for_append(records_path) as fh:
        task = bar.add_task(label, total=total, completed=total - len(jobs))

        def write_ready(flush_all: bool = False) -> None:
            nonlocal written
            for k in sorted(waiting):
                if k != written and not flush_all:
                    break
                for record in waiting.pop(k).records:
                    append_record(fh, record)
                written = k + 1

        try:
            with contextlib.closing(backend.run(before + jobs)) as results:
                for result in results:
                    if result.tasks is not None and tasks:
                        if result.job.kind == "tasks_before":
                            task_state["before"] = result.tasks
                        else:
                            task_state.setdefault("after", []).append(result.tasks)
                        atomic_write_json(out / TASKS_FILE, task_state)
                    if result.job.kind == "update":
                        waiting[position[result.job.update]] = result
                        write_ready()
                        bar.advance(task)
        finally:
            write_ready(flush_all=True)  # finished work is never lost, even out of order

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
        "model": identity.name,
        "fingerprint": identity.fingerprint,
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
        "backend": backend.name,
        "workers": backend.workers,
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
