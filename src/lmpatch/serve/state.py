"""The served model and its twin: where generation runs and where edits are computed.

Computing an edit runs the model with hooks installed and, for some methods, trains
weights in place for a while; generation running at the same moment on the same modules
would see all of that. So the service keeps two copies of the model with the same patch
stack:

* the **serving** copy answers requests; it only ever changes by a whole patch pushed
  or removed while no request is running (the :class:`FairLock`, taken by each request
  for its whole duration and by each swap);
* the **editing** copy (the *twin*) is where the worker computes edits; a new patch goes
  onto the twin first, then the ledger commits it, then it is swapped into the serving
  copy.

This costs a second copy of the weights (540 MB for the embedded model) and buys
generation that never waits for an edit to be computed, only for the swap.
"""
from __future__ import annotations

import copy
import hashlib
import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from lmpatch.model.loading import LoadedModel, fingerprint_model
from lmpatch.patch import Patch

__all__ = ["FairLock", "ServedState", "state_fingerprint", "twin_of"]


class FairLock:
    """A mutex granted in arrival order, so a waiting swap is not starved by a stream of requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


def twin_of(model: LoadedModel) -> LoadedModel:
    """An independent copy of ``model`` (weights and an empty patch stack of its own)."""
    if len(model.stack):
        raise ValueError("twin_of needs a model without applied patches")
    return LoadedModel(model=copy.deepcopy(model.model), tokenizer=model.tokenizer, name=model.name,
                       chat=model.chat, fingerprint=model.fingerprint)


def state_fingerprint(model: LoadedModel) -> str:
    """The base model, the applied patches in order, and a sample of the current weights:
    what a restart must reproduce exactly."""
    h = hashlib.sha256()
    h.update(model.fingerprint.encode())
    for patch_id in model.stack.ids():
        h.update(patch_id.encode())
    h.update(fingerprint_model(model.model).encode())
    return h.hexdigest()[:16]


class ServedState:
    """The two copies and the swap between them. Only the service's worker calls the
    write methods (one writer); requests call :meth:`serving` (many readers, one at a time)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.twin = twin_of(model)
        self.lock = FairLock()
        self.generation = 0

    @contextmanager
    def serving(self) -> Iterator[tuple[LoadedModel, int]]:
        """The serving model and the generation it is at, unchanged while held."""
        with self.lock.hold():
            yield self.model, self.generation

    # ----------------------------------------------------------------- the worker's side

    def push_twin(self, patch: Patch) -> str:
        """Put ``patch`` on the twin; returns the state fingerprint it would give."""
        patch.apply(self.twin)
        return state_fingerprint(self.twin)

    def remove_twin(self, patch_id: str) -> str:
        self.twin.stack.remove(patch_id)
        return state_fingerprint(self.twin)

    def swap_in(self, patch: Patch, commit: Callable[[], int]) -> int:
        """The serving copy catches up with the twin: ``patch`` pushed, then ``commit`` (the
        ledger's transaction, returning the new generation) run, both between requests.

        Why both under one hold: a client that reads "committed" must be answered by the
        edited model. Were the ledger committed before the hold, a request could slip in
        between and be answered by the old one. If ``commit`` fails the patch comes off
        again, so the serving copy never holds an edit the ledger does not."""
        with self.lock.hold():
            patch.apply(self.model)
            try:
                self.generation = commit()
            except BaseException:
                self.model.stack.remove(patch.patch_id)
                raise
            return self.generation

    def swap_out(self, patch_id: str, commit: Callable[[], int]) -> int:
        """:meth:`swap_in`'s reverse, in one hold: ``commit`` first (a failed transaction then
        leaves the serving copy as it was), then ``patch_id`` removed."""
        with self.lock.hold():
            self.generation = commit()
            self.model.stack.remove(patch_id)
            return self.generation

    def rebuild(self, patches: list[Patch], generation: int) -> str:
        """Both copies from the base model plus ``patches`` in order (at start); returns the
        state fingerprint of the result."""
        for p in patches:
            p.apply(self.twin)
            p.apply(self.model)
        self.generation = generation
        return state_fingerprint(self.model)
