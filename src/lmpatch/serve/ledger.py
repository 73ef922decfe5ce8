"""The service's ledger: every edit ever asked for, what became of it, and the state it left.

One SQLite database (WAL journal, so readers never block the writer) in the ledger
directory, next to the patch files it points to. The ledger is the service's memory
across restarts: the model state is *defined* as the base model plus the patches of the
``committed`` edits, applied in commit order. Each change of that set (a commit, a
revert) is one transaction that also bumps the generation counter and records the
fingerprint of the resulting state, so a restart can rebuild the state and check it.

Statuses: ``queued`` -> ``running`` -> ``committed`` | ``failed``; ``committed`` ->
``reverting`` -> ``reverted``; ``queued`` -> ``cancelled``. A kill leaves at most a
``running`` or ``reverting`` row, which :meth:`Ledger.interrupted` hands back to be
done again, and perhaps a patch file no row commits, which is ignored.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpatch.errors import LmpatchError

__all__ = ["EditRecord", "Ledger", "LedgerMismatchError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- 'edit' (computed here) or 'upload' (a patch file sent in)
    method TEXT NOT NULL,
    hparams TEXT NOT NULL,              -- JSON
    requests TEXT NOT NULL,             -- JSON list of EditRequest dicts
    status TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '',
    error TEXT,
    idempotency_key TEXT UNIQUE,
    patch_id TEXT,
    patch_file TEXT,
    patch_sha256 TEXT,
    commit_seq INTEGER,                 -- order in the stack (committed edits only)
    generation_committed INTEGER,
    generation_reverted INTEGER,
    started REAL,
    finished REAL,
    reverted REAL,
    timings TEXT NOT NULL DEFAULT '{}', -- JSON
    checks TEXT NOT NULL DEFAULT '{}'   -- JSON: the quick check after the edit
);
CREATE INDEX IF NOT EXISTS edits_created ON edits (created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: every status an edit can have (the module docstring says how they follow each other)
STATUSES = ("queued", "running", "committed", "failed", "reverting", "reverted", "cancelled")
#: statuses whose edit is in the model state
LIVE = ("committed", "reverting")
#: restarts during one edit's computation after which it is failed rather than queued again
MAX_RESTARTS = 3


class LedgerMismatchError(LmpatchError):
    """The ledger belongs to another base model, or the rebuilt state differs from the recorded one."""


class IdempotencyConflictError(LmpatchError):
    """An Idempotency-Key already names a different request."""


@dataclass
class EditRecord:
    """One row of the ledger, as the API shows it."""

    id: str
    created: float
    actor: str
    kind: str
    method: str
    hparams: dict
    requests: list[dict]
    status: str
    progress: str = ""
    error: str | None = None
    idempotency_key: str | None = None
    patch_id: str | None = None
    patch_file: str | None = None
    patch_sha256: str | None = None
    commit_seq: int | None = None
    generation_committed: int | None = None
    generation_reverted: int | None = None
    started: float | None = None
    finished: float | None = None
    reverted: float | None = None
    timings: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "EditRecord":
        d = dict(row)
        for key in ("hparams", "requests", "timings", "checks"):
            d[key] = json.loads(d[key])
        return cls(**d)

    def public(self) -> dict:
        """The record for API answers (the patch file's path on the server stays private)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("patch_file", "idempotency_key")}
        out["object"] = "edit"
        return out


class Ledger:
    """The SQLite ledger of one service; every method is one short transaction.

    Safe to call from several threads (one connection behind a lock); the service keeps
    a single writer of the model state (its worker), so transactions never race on meaning.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "patches").mkdir(exist_ok=True)
            self._db = sqlite3.connect(self.folder / "ledger.sqlite3", check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise LmpatchError(f"Cannot open the ledger in '{self.folder}': {exc}.") from exc
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed edit survives power loss, not only a kill
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------- meta

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def generation(self) -> int:
        return int(self.meta("generation", "0"))

    @property
    def state_fingerprint(self) -> str | None:
        return self.meta("state_fingerprint")

    def bind_base(self, fingerprint: str, name: str) -> None:
        """Tie a new ledger to its base model; refuse a ledger made for another one."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'base_fingerprint'").fetchone()
            if row is None:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("base_fingerprint", fingerprint),
                                                                 ("base_name", name), ("generation", "0")])
                return
        if row[0] != fingerprint:
            raise LedgerMismatchError(
                f"The ledger in '{self.folder}' was made for model '{self.meta('base_name')}' (fingerprint "
                f"{row[0]}), not '{name}' ({fingerprint}); start with that model or another --ledger."
            )

    # ----------------------------------------------------------------- rows

    def replay(self, idempotency_key: str | None, *, kind: str, method: str, hparams: dict, requests: list[dict],
               patch_id: str | None = None) -> EditRecord | None:
        """The edit ``idempotency_key`` already made, when this is a retry of the same request.

        A client that retries after a timeout must get its edit back, whatever happened to
        the ledger since (so this is asked before any check of the generation); the same
        key with a different request is refused, never answered with another edit's record."""
        if idempotency_key is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM edits WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return None if row is None else _same_or_refuse(EditRecord.from_row(row), idempotency_key, kind, method,
                                                        hparams, requests, patch_id)

    def add(self, *, actor: str, kind: str, method: str, hparams: dict, requests: list[dict],
            idempotency_key: str | None = None, patch: tuple[str, str, str] | None = None) -> tuple[EditRecord, bool]:
        """A new queued edit, or (same ``idempotency_key``, same request) the one already made:
        (record, created). The same key with another request raises :class:`IdempotencyConflictError`."""
        edit_id = "ed_" + uuid.uuid4().hex[:16]
        patch_id, patch_file, sha = patch or (None, None, None)
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM edits WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    return _same_or_refuse(EditRecord.from_row(row), idempotency_key, kind, method, hparams,
                                           requests, patch_id), False
            db.execute(
                "INSERT INTO edits (id, created, actor, kind, method, hparams, requests, status, idempotency_key, "
                "patch_id, patch_file, patch_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (edit_id, time.time(), actor, kind, method, json.dumps(hparams), json.dumps(requests),
                 idempotency_key, patch_id, patch_file, sha),
            )
        return self.get(edit_id), True

    def get(self, edit_id: str) -> EditRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM edits WHERE id = ?", (edit_id,)).fetchone()
        return EditRecord.from_row(row) if row else None

    def page(self, limit: int = 50, before: float | None = None, status: str | None = None) -> list[EditRecord]:
        """Newest first; ``before`` (a ``created`` time) pages further back."""
        sql, args = "SELECT * FROM edits WHERE 1=1", []
        if before is not None:
            sql += " AND created < ?"
            args.append(before)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [EditRecord.from_row(r) for r in self._db.execute(sql, args).fetchall()]

    def live(self) -> list[EditRecord]:
        """The edits in the model state, in stack order."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM edits WHERE status IN {LIVE} ORDER BY commit_seq").fetchall()
        return [EditRecord.from_row(r) for r in rows]

    def interrupted(self) -> list[EditRecord]:
        """Work a kill cut short, oldest first: edits to compute (again) and reverts to finish.

        An edit the service was computing each of the last :data:`MAX_RESTARTS` times it
        stopped is failed instead of queued again: if the edit itself brings the service
        down (memory, a runaway input), requeueing it would bring it down at every start."""
        with self._tx() as db:
            for row in db.execute("SELECT id, timings FROM edits WHERE status = 'running'").fetchall():
                timings = json.loads(row["timings"] or "{}")
                timings["restarts"] = int(timings.get("restarts", 0)) + 1
                if timings["restarts"] >= MAX_RESTARTS:
                    db.execute("UPDATE edits SET status = 'failed', finished = ?, timings = ?, error = ? WHERE id = ?",
                               (time.time(), json.dumps(timings), f"The service stopped while computing this edit "
                                f"{timings['restarts']} times; it is not tried again.", row["id"]))
                else:
                    db.execute("UPDATE edits SET status = 'queued', progress = 'requeued after a restart', "
                               "timings = ? WHERE id = ?", (json.dumps(timings), row["id"]))
            rows = db.execute("SELECT * FROM edits WHERE status IN ('queued', 'reverting') ORDER BY created").fetchall()
        return [EditRecord.from_row(r) for r in rows]

    def update(self, edit_id: str, **fields: Any) -> None:
        """Set plain fields of one row (progress, status while running, timings ...)."""
        for key in ("timings", "checks", "hparams", "requests"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE edits SET {cols} WHERE id = ?", (*fields.values(), edit_id))

    def cancel(self, edit_id: str) -> bool:
        """Cancel a queued edit; False if it had already started."""
        with self._tx() as db:
            cur = db.execute("UPDATE edits SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                             (time.time(), edit_id))
            return cur.rowcount == 1

    def start(self, edit_id: str, progress: str) -> bool:
        """queued -> running; False if the edit is no longer queued (cancelled meanwhile)."""
        with self._tx() as db:
            cur = db.execute("UPDATE edits SET status = 'running', started = ?, progress = ? "
                             "WHERE id = ? AND status = 'queued'", (time.time(), progress, edit_id))
            return cur.rowcount == 1

    def mark_reverting(self, edit_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE edits SET status = 'reverting' WHERE id = ? AND status = 'committed'", (edit_id,))
            return cur.rowcount == 1

    def commit(self, edit_id: str, *, patch_id: str, patch_file: str, sha256: str, state_fingerprint: str,
               timings: dict, checks: dict) -> int:
        """The edit joins the state: one transaction; returns the new generation."""
        with self._tx() as db:
            gen = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]) + 1
            seq = db.execute("SELECT COALESCE(MAX(commit_seq), 0) + 1 FROM edits").fetchone()[0]
            db.execute(
                "UPDATE edits SET status = 'committed', progress = 'done', patch_id = ?, patch_file = ?, "
                "patch_sha256 = ?, commit_seq = ?, generation_committed = ?, finished = ?, timings = ?, checks = ? "
                "WHERE id = ?",
                (patch_id, patch_file, sha256, seq, gen, time.time(), json.dumps(timings), json.dumps(checks), edit_id),
            )
            _set_state(db, gen, state_fingerprint)
        return gen

    def revert(self, edit_id: str, *, state_fingerprint: str) -> int:
        """The edit leaves the state: one transaction; returns the new generation."""
        with self._tx() as db:
            gen = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]) + 1
            db.execute("UPDATE edits SET status = 'reverted', generation_reverted = ?, reverted = ? WHERE id = ?",
                       (gen, time.time(), edit_id))
            _set_state(db, gen, state_fingerprint)
        return gen

    def fail(self, edit_id: str, error: str) -> None:
        self.update(edit_id, status="failed", error=error, finished=time.time())

    def set_state_fingerprint(self, fingerprint: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('state_fingerprint', ?)", (fingerprint,))


def _set_state(db: sqlite3.Connection, generation: int, fingerprint: str) -> None:
    db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('state_fingerprint', ?)", (fingerprint,))


class _Transaction:
    """``with ledger._tx() as db``: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), under the lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, *_: Any) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def _same_or_refuse(prior: EditRecord, key: str, kind: str, method: str, hparams: dict, requests: list[dict],
                    patch_id: str | None) -> EditRecord:
    """``prior`` when it was made by the same request, else one clear refusal."""
    asked = {"kind": kind, "method": method, "hparams": json.loads(json.dumps(hparams)),
             "requests": json.loads(json.dumps(requests))}
    made = {"kind": prior.kind, "method": prior.method, "hparams": prior.hparams, "requests": prior.requests}
    if patch_id is not None:  # an upload names its patch; an edit's patch is what the worker made of it
        asked["patch_id"], made["patch_id"] = patch_id, prior.patch_id
    differ = [k for k in asked if asked[k] != made[k]]
    if differ:
        raise IdempotencyConflictError(
            f"Idempotency-Key {key!r} was used for edit {prior.id}, a different request ({', '.join(differ)} "
            "differ); use a new key for a new request.")
    return prior
