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

:func:`fact_memory_part` is the matching edit-side helper: it embeds the keys and writes
the settings every memory records (the embedder's name and id, so a patch embedded with
other weights is refused instead of silently retrieving nonsense).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch

from lmpatch.errors import PatchError
from lmpatch.memory.embedder import Embedder, embedder_for
from lmpatch.memory.index import ExactIndex
from lmpatch.patch.parts import MemoryRuntime, RetrievalMemory

__all__ = ["FactMemory", "fact_memory_part"]


def fact_memory_part(
    type_name: str, embedder_name: str, settings: dict, entries: list[dict], key_texts: Sequence[str],
) -> RetrievalMemory:
    """A memory part holding ``entries`` found by the embeddings of ``key_texts`` (one each)."""
    if len(entries) != len(key_texts):
        raise ValueError("one key text per entry")
    embedder = embedder_for(embedder_name)
    keys = embedder.embed(list(key_texts))
    full = {**settings, "embedder": embedder_name, "embedder_id": embedder.id}
    return RetrievalMemory(type_name, full, entries, {"keys": keys})


class FactMemory(MemoryRuntime):
    """Stored facts with embedding keys; each prompt is wrapped with its nearest in-scope fact.

    Subclasses set ``type_name`` and override :meth:`in_scope` and :meth:`wrap` (and
    :meth:`query_text` when keys are normalised, as MemPrompt lower-cases them).
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

    def in_scope(self, query_keys: torch.Tensor, scores: torch.Tensor, nearest: torch.Tensor) -> list[bool]:
        """Whether each prompt's nearest fact applies (``scores``: cosine similarities)."""
        threshold = self.settings.get("threshold")
        if threshold is None:
            return [True] * len(scores)
        return [bool(s >= threshold) for s in scores.tolist()]

    def wrap(self, entry: dict, current: str) -> str:
        """The prompt ``current`` with ``entry``'s fact put before it."""
        return self.settings["template"].format(fact=entry["fact"], query=current)

    # ------------------------------------------------------------ the shared mechanism

    def nearest(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query keys [m, d], best cosine [m], index of the nearest fact [m])."""
        query_keys = self.embedder.embed([self.query_text(q) for q in queries])
        scores, idx = self.index.search(query_keys, 1)
        return query_keys, scores[:, 0], idx[:, 0]

    def rewrite(self, queries: list[str], current: list[str]) -> list[str]:
        if not self.entries or not queries:
            return list(current)
        query_keys, scores, idx = self.nearest(queries)
        keep = self.in_scope(query_keys, scores, idx)
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

