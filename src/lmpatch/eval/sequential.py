"""The ``sequential`` (lifelong) regime: updates accumulate on one model.

Each update edits ``batch_size`` requests on the model *as it is after all earlier
updates* and stays applied. What users of lifelong editing need to see is whether old
edits survive new ones, so at checkpoints the scores of *every edit so far* are measured
again (the retention curve), together with how far the edited weights have moved and
the model-level tasks (PIQA, perplexity) that reveal a collapsing model.

Nothing finished is lost: every update's patch is saved under ``updates/`` as soon as it
is computed, and a rerun re-applies the saved patches (checking they are the same run)
instead of recomputing them. At the end all updates are reverted, newest first, and the
model is checked to be bit-identical to where it started.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.eval.metrics import (
    DEFAULT_METRICS,
    measure,
    request_values,
    resolve_metrics,
    summarize,
)
from lmpatch.eval.records import (
    RECORDS_FILE,
    SUMMARY_FILE,
    TASKS_FILE,
    append_record,
    edit_parts,
    open_for_append,
    parts_total,
    read_records,
    scored_indices,
    timing,
)
from lmpatch.eval.run_identity import claim_run, run_identity
from lmpatch.eval.runner import EditFn, ModelState, _load_task_state, check_restored, unique_keys
from lmpatch.eval.tasks import Tasks, measure_tasks, task_metrics, task_protocols
from lmpatch.fileio import atomic_write_json
from lmpatch.machine import peak_rss_mb
from lmpatch.model.loading import LoadedModel
from lmpatch.progress import run_progress
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

UPDATES_DIR = "updates"
UPDATES_FILE = "updates.jsonl"
CURVE_FILE = "curve.jsonl"


def default_checkpoints(n_updates: int, batch_size: int, n_requests: int, points: int = 10) -> list[int]:
    """Edit counts at which to re-measure all edits so far: about ``points`` evenly spaced
    updates, always including the last."""
    step = max(1, round(n_updates / points))
    marks = {min((u + 1) * batch_size, n_requests) for u in range(step - 1, n_updates, step)}
    marks.add(n_requests)
    return sorted(marks)


def run_sequential(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    edit_fn: EditFn,
    out_dir: Path | str,
    *,
    batch_size: int = 1,
    checkpoints: Iterable[int] | None = None,
    resume: bool = True,
    progress: bool = True,
    metrics: Iterable[str] = DEFAULT_METRICS,
    eval_batch_size: int = 16,
    method: str | None = None,
    tasks: Tasks | None = None,
    score_n: int | None = None,
    settings: dict | None = None,
) -> dict:
    """Apply updates of ``batch_size`` requests one after another, keeping each one.

    ``checkpoints`` are edit counts (default: about ten, evenly spaced, and the end) at
    which every request edited so far is scored again on the current model; each becomes
    one point of ``summary["curve"]``. The final checkpoint is the post-edit score of the
    whole run. ``score_n`` scores only that many evenly spaced requests, at every
    checkpoint (:func:`~lmpatch.eval.records.scored_indices`); all are still edited.
    ``settings`` join the run's identity, as in :func:`~lmpatch.eval.runner.run_independent`.
    Returns the summary also written to ``out_dir/summary.json``.
    """
    if batch_size < 1:
        raise LmpatchError(f"batch_size must be at least 1, got {batch_size}.")
    out = Path(out_dir)
    (out / UPDATES_DIR).mkdir(parents=True, exist_ok=True)
    groups = resolve_metrics(metrics)
    keys = unique_keys(requests)
    n = len(requests)
    sample = scored_indices(n, score_n)
    n_updates = (n + batch_size - 1) // batch_size
    marks = sorted({min(int(c), n) for c in checkpoints} | {n}) if checkpoints else default_checkpoints(
        n_updates, batch_size, n
    )
    claim_run(out, run_identity(**{"method": method, "model": model.fingerprint, "regime": "sequential",
                                   "batch_size": batch_size, "metrics": sorted(groups), **(settings or {})}), resume)
    if not resume:
        for name in (RECORDS_FILE, UPDATES_FILE, CURVE_FILE, SUMMARY_FILE, TASKS_FILE):
            (out / name).unlink(missing_ok=True)
        for f in (out / UPDATES_DIR).glob("*.lmpatch"):
            f.unlink()

    baseline = ModelState.of(model.model)
    applied_before = len(getattr(model, "applied", None) or ())
    originals: dict[str, torch.Tensor] = {}
    applied: list[Any] = []
    updates_log = [u for u in read_records(out / UPDATES_FILE) if "update" in u]
    curve = [c for c in read_records(out / CURVE_FILE) if "edits" in c]
    final_scores = None  # the final model's scores: the checkpoint at n edits measures them
    with run_progress(progress) as bar:
        pre_scores = measure(model, [requests[i] for i in sample], groups, eval_batch_size)
        tasks_before = _tasks_before(model, out, tasks, resume)
        try:
            applied = _reapply(model, out, updates_log, originals, keys, batch_size)
            done_updates = len(applied)
            curve = [c for c in curve if c["edits"] <= min(done_updates * batch_size, n)]
            measured = {c["edits"] for c in curve}
            task = bar.add_task(f"sequential, batches of {batch_size}", total=n_updates, completed=done_updates)
            with open_for_append(out / UPDATES_FILE) as ufh, open_for_append(out / CURVE_FILE) as cfh:
                for u in range(done_updates, n_updates):
                    lo, hi = u * batch_size, min((u + 1) * batch_size, n)
                    batch = list(requests[lo:hi])
                    t0 = time.perf_counter()
                    patch = edit_fn(model, batch[0] if batch_size == 1 else batch)
                    seconds = time.perf_counter() - t0
                    _remember_originals(model, patch, originals)
                    patch.apply(model)
                    applied.append(patch)
                    patch.save(out / UPDATES_DIR / _update_name(u))
                    parts = edit_parts(patch)
                    append_record(ufh, {
                        "update": u, "first": lo, "edits": hi, "keys": [str(k) for k in keys[lo:hi]],
                        "seconds": seconds, "patch_id": patch.patch_id, "parts": parts,
                    })
                    updates_log.append({"update": u, "seconds": seconds, "parts": parts})
                    bar.advance(task)
                    if hi in marks and hi not in measured:
                        upto = sum(1 for i in sample if i < hi)
                        point, scores = _checkpoint(model, [requests[i] for i in sample[:upto]], pre_scores[:upto],
                                                    groups, eval_batch_size, tasks, originals)
                        if hi == n:
                            final_scores = scores
                        point["edits"] = hi
                        point["edit_seconds"] = round(sum(u["seconds"] for u in updates_log), 2)
                        point["peak_rss_mb"] = peak_rss_mb()
                        append_record(cfh, point)
                        curve.append(point)
                        measured.add(hi)
            if final_scores is None:  # the last checkpoint was measured before a resume
                final_scores = measure(model, [requests[i] for i in sample], groups, eval_batch_size)
        finally:
            model.stack.remove_many([patch.patch_id for patch in applied])
    check_restored(model, baseline, "the sequential run", applied_before)

    records_path = out / RECORDS_FILE
    records_path.unlink(missing_ok=True)
    records = []
    position = {i: j for j, i in enumerate(sample)}
    with open_for_append(records_path) as fh:
        for i, r in enumerate(requests):
            rec: dict[str, Any] = {"case_id": r.case_id, "index": i, "update": i // batch_size, "method": method}
            j = position.get(i)
            if j is not None:
                rec["pre"] = request_values(r, pre_scores[j], pre_scores[j], groups)
                rec["post"] = request_values(r, final_scores[j], pre_scores[j], groups)
            append_record(fh, rec)
            records.append(rec)
    stats = summarize(records)
    final_tasks = next((c.get("tasks") for c in reversed(curve) if c["edits"] == n), None)
    task_keys = task_metrics({"before": tasks_before, "after": [final_tasks] if final_tasks else []})
    protocols = {**stats["protocols"], **task_protocols(tasks)}
    summary = {
        "method": method,
        "model": model.name,
        "fingerprint": model.fingerprint,
        "regime": "sequential",
        "batch_size": batch_size,
        "n": n,
        "scored": len(sample),
        "metrics": {**stats["metrics"], **task_keys},
        "metrics_pre": stats["metrics_pre"],
        "counts": stats["counts"],
        "protocols": protocols,
        "edit_seconds": timing([u["seconds"] for u in updates_log]),
        "edit_parts": parts_total([u.get("parts") or {} for u in updates_log]),
        "curve": sorted(curve, key=lambda c: c["edits"]),
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _tasks_before(model: LoadedModel, out: Path, tasks: Tasks | None, resume: bool) -> dict[str, float]:
    """Task scores of the unedited model: measured once per run directory and kept in
    ``tasks.json``, so resuming (or growing a run to more edits) does not pay for them again."""
    if not tasks:
        return {}
    state = _load_task_state(out, tasks, resume)
    if "before" not in state:
        state = {"before": measure_tasks(model, tasks)}
        atomic_write_json(out / TASKS_FILE, state)
    return state["before"]


def _update_name(u: int) -> str:
    return f"{u:05d}.lmpatch"


def _reapply(model, out: Path, updates_log: list[dict], originals: dict, keys: list, batch_size: int) -> list:
    """Apply the saved patches of an interrupted run, in order; stop at the first gap."""
    from lmpatch.patch import Patch

    applied = []
    by_update = {u["update"]: u for u in updates_log}
    for u in range(len(by_update)):
        entry, path = by_update.get(u), out / UPDATES_DIR / _update_name(u)
        if entry is None or not path.is_file():
            break
        expected = [str(k) for k in keys[u * batch_size : (u + 1) * batch_size]]
        if entry.get("keys") != expected:
            raise LmpatchError(
                f"{out} holds a sequential run over other requests or another batch size (update {u}); "
                "use a new --out directory or --no-resume."
            )
        patch = Patch.load(path)
        if patch.patch_id != entry.get("patch_id"):
            break
        _remember_originals(model, patch, originals)
        patch.apply(model)
        applied.append(patch)
    if applied:
        log.info("Resuming: re-applied %d saved updates from %s", len(applied), out)
    # updates recorded past the first gap are recomputed
    del updates_log[len(applied):]
    return applied


def _remember_originals(model: LoadedModel, patch: Any, originals: dict[str, torch.Tensor]) -> None:
    """Keep a copy of each parameter the first time any update touches it, to measure drift."""
    params = dict(model.model.named_parameters())
    for d in getattr(patch, "deltas", ()):
        if d.param not in originals and d.param in params:
            originals[d.param] = params[d.param].detach().float().cpu().clone()


def _checkpoint(model, requests, pre_scores, groups, eval_batch_size, tasks, originals) -> tuple[dict, list]:
    """Scores of all edits so far on the current model, weight drift and task scores, and
    the raw scores (at the final checkpoint they are the records' post-edit scores)."""
    post = measure(model, requests, groups, eval_batch_size)
    records = [
        {"pre": request_values(r, p, p, groups), "post": request_values(r, q, p, groups)}
        for r, p, q in zip(requests, pre_scores, post)
    ]
    stats = summarize(records)
    point: dict[str, Any] = {"metrics": stats["metrics"], "metrics_pre": stats["metrics_pre"]}
    params = dict(model.model.named_parameters())
    drift = {}
    for name, w0 in originals.items():
        w = params[name].detach().float().cpu()
        drift[name] = {"norm": float(w.norm()), "norm_before": float(w0.norm()), "delta_norm": float((w - w0).norm())}
    point["weights"] = drift
    if tasks:
        point["tasks"] = measure_tasks(model, tasks)
        for name, value in point["tasks"].items():
            point["metrics"][f"{name}_after"] = value
    return point, post
