"""The running side shared by the retrieval editors: stored facts, one nearest fact per prompt.

SERAC, IKE, MemPrompt and MeLLo differ in *what* they store per edit (a statement, IKE's
demonstrations, a feedback line), in *when* a stored fact is in scope (a trained
classifier, a cosine threshold, always) and in *how* it is put before the prompt (their
templates). They share everything else, which lives here once:

* the facts of every applied patch of one type and settings are searched together
  (:class:`FactMemory` is a grouped :class:`~lmpatch.patch.parts.MemoryRuntime`);
* each fact is found by an embedding key stored in the patch (``state["keys"]``), so a
  loaded patch never re-embeds its facts and answers exactly as when it was saved;
* a prompt is embedded once per call (the embedder caches texts), matched against every
  key with one exact inner-product search, and wrapped with the nearest fact when the
  subclass says that fact is in scope.

:func:`memory_patch` is the matching edit-side helper: it embeds the keys and writes
the settings every memory records (the embedder's name and id, so a patch embedded with
other weights is refused instead of silently retrieving nonsense).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, ClassVar, Sequence

import torch

from lmpatch.errors import PatchError
from lmpatch.memory.embedder import Embedder, embedder_for
from lmpatch.memory.index import ExactIndex
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.patch.parts import MemoryRuntime, RetrievalMemory
from lmpatch.request import EditRequest

__all__ = ["FactMemory", "memory_patch", "statement"]


def statement(request: EditRequest) -> str:
    """An edit as one sentence: its prompt continued with the new target (what the retrieval
    editors store and retrieve, as IKE's and MeLLo's reference code do)."""
    return f"{request.prompt} {request.target_new}"


def memory_patch(
    model: LoadedModel, requests: list[EditRequest], hp: Any, *, method: str, type_name: str, settings: dict,
    entries: list[dict], key_texts: Sequence[str], started: float, state: dict[str, torch.Tensor] | None = None,
    metrics: dict | None = None,
) -> Patch:
    """The patch of a retrieval editor: one memory part holding ``entries``, found by the
    embeddings of ``key_texts`` (one each), plus any other ``state`` (SERAC's classifier).

    The embedder's name and id go into the settings, so a patch embedded with other
    weights is refused when applied. ``started`` is when the edit began (for its time).
    """
    if len(entries) != len(key_texts):
        raise ValueError("one key text per entry")
    name = hp.embedder
    embedder = embedder_for(name)
    part = RetrievalMemory(type_name, {**settings, "embedder": name, "embedder_id": embedder.id}, entries,
                           {"keys": embedder.embed(list(key_texts)), **(state or {})})
    edit = {"entries": len(entries), "seconds": round(time.perf_counter() - started, 3), **(metrics or {})}
    return Patch(parts=[part], method=method, model_fingerprint=model.fingerprint, model_name=model.name,
                 hparams=asdict(hp), requests=requests, metrics={"edit": edit})


class FactMemory(MemoryRuntime):
    """Stored facts with embedding keys; each prompt is wrapped with its nearest in-scope fact.

    Subclasses set ``type_name`` and override only what differs: :meth:`nearest` (SERAC
    scores with its classifier), :meth:`wrap` (IKE adds its demonstrations) or
    :meth:`query_text` (MemPrompt case-folds its keys).
    """

    type_name: ClassVar[str] = ""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.embedder: Embedder = _checked_embedder(settings, self.type_name)
        self.entries: list[dict] = []
        self.index = ExactIndex(torch.empty(0, self.embedder.dim))

    @classmethod
    def combine(cls, members: list[RetrievalMemory]) -> "FactMemory":
        runtime = cls(members[0].settings)
        for member in members:
            runtime.extend(member)
        return runtime

    def extend(self, member: RetrievalMemory) -> None:
        keys = member.state.get("keys")
        if keys is None or keys.dim() != 2 or keys.shape != (len(member.entries), self.embedder.dim):
            raise PatchError(
                f"The {self.type_name} memory needs one {self.embedder.dim}-dimensional key per entry; "
                f"it has {len(member.entries)} entries and keys of shape "
                f"{None if keys is None else tuple(keys.shape)}."
            )
        self.index.add(keys)
        self.entries.extend(member.entries)

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------ what subclasses decide

    def query_text(self, query: str) -> str:
        """The text embedded for a prompt (the prompt itself unless keys were normalised)."""
        return query

    def in_scope(self, scores: torch.Tensor) -> list[bool]:
        """Whether each prompt's nearest fact applies (``scores`` from :meth:`nearest`)."""
        threshold = self.settings.get("threshold")
        if threshold is None:
            return [True] * len(scores)
        return [bool(s >= threshold) for s in scores.tolist()]

    def wrap(self, entry: dict, current: str) -> str:
        """The prompt ``current`` with ``entry``'s demonstrations (if any) and fact put before it."""
        return "".join(entry.get("demos", ())) + self.settings["template"].format(fact=entry["fact"], query=current)

    # ------------------------------------------------------------ the shared mechanism

    def nearest(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(best cosine [m], index of the nearest fact [m]) for each query."""
        scores, idx = self.index.search(self.embedder.embed([self.query_text(q) for q in queries]), 1)
        return scores[:, 0], idx[:, 0]

    def rewrite(self, queries: list[str], current: list[str]) -> list[str]:
        if not self.entries or not queries:
            return list(current)
        scores, idx = self.nearest(queries)
        keep = self.in_scope(scores)
        return [
            self.wrap(self.entries[int(j)], text) if ok else text
            for text, ok, j in zip(current, keep, idx.tolist())
        ]


def _checked_embedder(settings: dict, type_name: str) -> Embedder:
    name = settings.get("embedder")
    if not name:
        raise PatchError(f"The {type_name} memory does not name the embedder its keys were made with.")
    embedder = embedder_for(name)
    recorded = settings.get("embedder_id")
    if recorded != embedder.id:
        raise PatchError(
            f"The {type_name} memory's keys were made with embedder {name!r} of id {recorded}, but the installed "
            f"one has id {embedder.id}; install the embedder the patch was made with or edit again."
        )
    return embedder

