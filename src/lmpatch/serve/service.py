"""One running service: the model, its ledger, the state rebuilt from it, and the writer.

Starting is where "after a crash, the model is exactly as the ledger says" is made true:
the committed edits' patch files are checked against the hashes the ledger recorded,
applied in commit order to both copies of the base model, and the resulting state's
fingerprint is compared with the one recorded with the last commit. Work a kill cut
short (an edit being computed, a revert half done) is then queued again.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from lmpatch.errors import LmpatchError
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.serve.generation import Batcher
from lmpatch.serve.ledger import Ledger, LedgerMismatchError
from lmpatch.serve.state import ServedState
from lmpatch.serve.worker import EditWorker, Job, file_sha256

__all__ = ["Service", "ServiceConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """How the service guards itself."""

    ledger: Path
    token: str | None = None          # None: a random one is made and written to <ledger>/token
    protect_reads: bool = False       # reads need the token too
    max_body_bytes: int = 1 << 20     # JSON bodies
    max_upload_bytes: int = 1 << 30   # patch uploads
    max_batch: int = 8                # requests decoded together


def _token_for(config: ServiceConfig) -> str:
    """The configured token, else the one kept in ``LEDGER/token``, else a new one written
    there readable by its owner only from the first byte (never world-readable, even briefly)."""
    if config.token:
        return config.token
    path = config.ledger / "token"
    kept = path.read_text().strip() if path.is_file() else ""
    if kept:
        return kept
    token = secrets.token_urlsafe(24)
    tmp = path.with_name(f".token.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


class Service:
    """The model served, its ledger and its writer, ready for the HTTP app."""

    def __init__(self, model: LoadedModel, config: ServiceConfig) -> None:
        if len(model.stack):
            raise LmpatchError("Serve a model without applied patches; the ledger decides what is applied.")
        self.config = config
        self.ledger = Ledger(config.ledger)
        self.ledger.bind_base(model.fingerprint, model.name)
        self.token = _token_for(config)
        self.state = ServedState(model)
        self._rebuild()
        self.worker = EditWorker(self.state, self.ledger)
        self.worker.start()
        self.batcher = Batcher(self.state, config.max_batch)
        for rec in self.ledger.interrupted():
            self.worker.submit(Job(kind="edit" if rec.status == "queued" else "revert", edit_id=rec.id))

    @property
    def model(self) -> LoadedModel:
        return self.state.model

    def close(self) -> None:
        self.batcher.stop()
        self.worker.stop()
        self.ledger.close()

    def _rebuild(self) -> None:
        patches = []
        for rec in self.ledger.live():
            path = Path(rec.patch_file or "")
            if not path.is_file():
                raise LedgerMismatchError(f"Edit {rec.id} is committed but its patch file '{path}' is missing.")
            if file_sha256(path) != rec.patch_sha256:
                raise LedgerMismatchError(f"Edit {rec.id}'s patch file '{path}' differs from the one committed.")
            patches.append(Patch.load(path))
        fingerprint = self.state.rebuild(patches, self.ledger.generation)
        recorded = self.ledger.state_fingerprint
        if recorded is None:
            self.ledger.set_state_fingerprint(fingerprint)
        elif recorded != fingerprint:
            raise LedgerMismatchError(
                f"The state rebuilt from the ledger in '{self.ledger.folder}' (fingerprint {fingerprint}) differs "
                f"from the one recorded at generation {self.ledger.generation} ({recorded}); the model or a patch "
                "file has changed."
            )
        if patches:
            log.info("Rebuilt %d committed edit(s), generation %d", len(patches), self.ledger.generation)
