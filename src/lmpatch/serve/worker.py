"""The service's one writer: computes edits off the request path and swaps them in.

Every change of the model state goes through this thread, one job at a time, in the
order asked: compute an edit on the twin, revert an edit, write a snapshot. An edit's
life, each step durable before the next:

1. the patch is computed on the twin (which holds every committed patch) and checked
   there (the edited prompts' answers, the locality probes' answers before and after);
2. the patch file is written atomically into the ledger directory;
3. one ledger transaction commits it (status, generation, state fingerprint);
4. it is swapped into the serving copy between two requests.

A kill between 2 and 3 leaves an orphan file and a ``running`` row, which a restart
computes again; a kill after 3 leaves a committed edit that the restart applies from its
file. A revert removes the patch from the twin, commits, then swaps it out, with the
same guarantees. Nothing the user was told is committed is ever lost.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmpatch.errors import LmpatchError
from lmpatch.fileio import atomic_path
from lmpatch.patch import Patch
from lmpatch.request import EditRequest
from lmpatch.serve.ledger import EditRecord, Ledger
from lmpatch.serve.state import ServedState

__all__ = ["EditWorker", "Job", "answers", "file_sha256", "quick_check"]

log = logging.getLogger(__name__)

#: how many requests of one edit the quick check answers (each is a short generation)
CHECK_REQUESTS = 4


@dataclass
class Job:
    """One unit of the writer's work. ``kind``: "edit", "revert" or "call" (run ``fn`` on the twin)."""

    kind: str
    edit_id: str = ""
    fn: Callable[[Any], Any] | None = None
    done: Future = field(default_factory=Future)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def answers(model, asked: list[tuple[str, str]]) -> list[str]:
    """Greedy answers to (prompt, expected answer) pairs in one batched call, each as
    long as its expected answer plus two tokens."""
    from lmpatch.eval.scoring import generate
    from lmpatch.tokens import encode

    if not asked:
        return []
    limits = [len(encode(model.tokenizer, " " + like.strip(), special=False)) + 2 for _, like in asked]
    return [a.strip() for a in generate(model, [p for p, _ in asked], max_new_tokens=limits)]


def locality_probes(requests: list[EditRequest]) -> list[tuple[str, str]]:
    """The (prompt, answer) locality probes the quick check reads, of the first requests."""
    return [(p.prompt, p.answer) for r in requests[:CHECK_REQUESTS] for p in r.locality]


def quick_check(model, patch: Patch, before: list[str]) -> dict:
    """What the edit did on the model that now holds it: each edited prompt's answer
    (``hit`` when it starts with the new target) and each locality probe's answer with
    whether it is unchanged from ``before`` (the probes' answers taken before the edit,
    in :func:`locality_probes` order). One generation call for all of it."""
    requests = list(patch.requests[:CHECK_REQUESTS])
    probes = locality_probes(requests)
    said = answers(model, [(r.prompt, r.target_new) for r in requests] + probes)
    edited, after = said[: len(requests)], iter(zip(probes, before, said[len(requests):]))
    out = []
    for r, answer in zip(requests, edited):
        checked = [{"prompt": prompt, "before": was, "after": now, "unchanged": was == now}
                   for (prompt, _), was, now in (next(after) for _ in r.locality)]
        out.append({"prompt": r.prompt, "target_new": r.target_new, "answer": answer,
                    "hit": answer.startswith(r.target_new.strip()), "locality": checked})
    hits = [x["hit"] for x in out]
    kept = [p["unchanged"] for x in out for p in x["locality"]]
    return {"requests": out, "efficacy": sum(hits) / len(hits) if hits else None,
            "locality": sum(kept) / len(kept) if kept else None}


class EditWorker:
    """The writer thread over a :class:`ServedState` and its :class:`Ledger`."""

    def __init__(self, state: ServedState, ledger: Ledger) -> None:
        self.state, self.ledger = state, ledger
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="lmpatch-editor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.jobs.put(None)
        self.thread.join(timeout)

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.done

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if job.kind == "edit":
                    job.done.set_result(self._edit(job.edit_id))
                elif job.kind == "revert":
                    job.done.set_result(self._revert(job.edit_id))
                else:
                    job.done.set_result(job.fn(self.state.twin))
            except BaseException as exc:  # keep serving: the job's caller gets the error
                if not isinstance(exc, LmpatchError):
                    log.exception("Service job %s %s failed", job.kind, job.edit_id)
                job.done.set_exception(exc)

    # ----------------------------------------------------------------- jobs

    def _edit(self, edit_id: str) -> EditRecord:
        rec = self.ledger.get(edit_id)
        t0 = time.time()
        if rec is None or not self.ledger.start(edit_id, f"computing ({rec.method})"):
            return self.ledger.get(edit_id)  # cancelled meanwhile, or done before a restart
        twin = self.state.twin
        try:
            requests = [EditRequest.from_dict(r) for r in rec.requests]
            before = answers(twin, locality_probes(requests))
            t1 = time.time()
            if rec.kind == "upload":
                patch = Patch.load(rec.patch_file)
            else:
                import lmpatch

                patch = lmpatch.edit(twin, requests, rec.method, rec.hparams)
            t2 = time.time()
            if patch.patch_id in twin.stack:
                raise LmpatchError(f"Patch {patch.patch_id} is already applied (edit "
                                   f"{self._live_edit_of(patch.patch_id)}); revert that edit first.")
            fingerprint = self.state.push_twin(patch)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, LmpatchError) else f"internal error: {type(exc).__name__}: {exc}"
            self.ledger.fail(edit_id, msg)
            if rec.kind == "upload" and rec.patch_file:  # a failed upload keeps its record, not its file
                Path(rec.patch_file).unlink(missing_ok=True)
            if not isinstance(exc, LmpatchError):
                log.exception("Edit %s failed", edit_id)
            return self.ledger.get(edit_id)
        try:
            self.ledger.update(edit_id, progress="checking")
            checks = quick_check(twin, patch, before)
            t3 = time.time()
            path = self.ledger.folder / "patches" / f"{edit_id}.lmpatch"
            if rec.kind != "upload":
                with atomic_path(path) as tmp:
                    patch.save(tmp)
            else:
                path = Path(rec.patch_file)
            timings = {"queued_s": round(t0 - rec.created, 3), "compute_s": round(t2 - t1, 3),
                       "check_s": round(t3 - t2, 3)}

            def commit() -> int:
                # runs after the serving copy took the patch, before any request sees it
                timings["swap_s"] = round(time.time() - t4, 3)
                timings["total_s"] = round(time.time() - rec.created, 3)
                return self.ledger.commit(edit_id, patch_id=patch.patch_id, patch_file=str(path),
                                          sha256=file_sha256(path), state_fingerprint=fingerprint,
                                          timings=timings, checks=checks)

            t4 = time.time()
            self.state.swap_in(patch, commit)
        except BaseException:
            self.state.remove_twin(patch.patch_id)  # not committed: the twin goes back to the ledger's state
            raise
        return self.ledger.get(edit_id)

    def _resync_twin(self) -> None:
        twin = self.state.twin
        twin.stack.remove_many(twin.stack.ids())
        for r in self.ledger.live():
            Patch.load(r.patch_file).apply(twin)

    def _live_edit_of(self, patch_id: str) -> str:
        return next((r.id for r in self.ledger.live() if r.patch_id == patch_id), "?")

    def _revert(self, edit_id: str) -> EditRecord:
        rec = self.ledger.get(edit_id)
        if rec is None or rec.status != "reverting":
            return rec
        fingerprint = self.state.remove_twin(rec.patch_id)
        try:
            self.state.swap_out(rec.patch_id, lambda: self.ledger.revert(edit_id, state_fingerprint=fingerprint))
        except BaseException:
            self._resync_twin()  # not committed: the twin goes back to the ledger's state
            raise
        return self.ledger.get(edit_id)
