"""Demonstrations of what to do with a "New Fact", built from ``counterfact-train``.

IKE shows them to the model before every prompt (all three kinds); SERAC's counterfactual
model sees the nearest *copy* and *update* ones before an in-scope prompt, because at
135M parameters the model follows an edit it is only told about far less often than one
it has seen applied (see :mod:`lmpatch.methods.serac`). One pool, one embedding cache
and one nearest-neighbour search serve both.

A training record gives up to three demonstrations:

* *copy* - the record's own prompt, answered with its new target;
* *update* - its first paraphrase that is not held out, answered with the new target;
* *retain* - its first neighbourhood probe that is not held out, answered with the
  probe's true answer (the fact does not apply, so nothing changes).

Only the first :data:`~lmpatch.methods.negatives.NEGATIVE_RECORDS` records are used and
every prompt held out for tuning or reporting is skipped, so no demonstration leaks an
evaluation prompt.
"""
from __future__ import annotations

from functools import lru_cache

from lmpatch.errors import InvalidRequestError
from lmpatch.memory.embedder import embedder_for
from lmpatch.memory.fact_memory import statement
from lmpatch.memory.index import ExactIndex
from lmpatch.memory.pools import pool_embeddings, pool_path
from lmpatch.methods.registry import OneOff

__all__ = ["KINDS", "copy_demonstration", "demonstration_kinds", "demonstration_pool", "nearest_demonstrations",
           "pool_one_off"]

KINDS = ("copy", "update", "retain")
POOL_NAME = "ike-demonstrations"  # the cache's name since IKE was the only user; kept so caches stay valid


def demonstration(fact: str, prompt: str, answer: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt} {answer}\n\n"


def copy_demonstration(fact: str) -> str:
    """The edit's own demonstration: its fact, repeated as the answer."""
    return f"New Fact: {fact}\nPrompt: {fact}\n\n"


@lru_cache(maxsize=4)
def _pool(pool_records: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from lmpatch.methods.negatives import NEGATIVE_RECORDS, held_out, training_records

    if pool_records > NEGATIVE_RECORDS:
        raise InvalidRequestError(
            f"The demonstration pool may use at most the first {NEGATIVE_RECORDS} training records "
            "(the rest are for tuning)."
        )
    skip = held_out()
    kinds: dict[str, str] = {}  # text -> kind of its first occurrence (texts repeat across records)
    for r in training_records()[:pool_records]:
        if r.prompt.strip() in skip:
            continue
        fact = statement(r)
        kinds.setdefault(demonstration(fact, r.prompt, r.target_new), "copy")
        para = next((p for p in r.rephrase if p.strip() not in skip), None)
        if para is not None:
            kinds.setdefault(demonstration(fact, para, r.target_new), "update")
        probe = next((p for p in r.locality if p.answer and p.prompt.strip() not in skip), None)
        if probe is not None:
            kinds.setdefault(demonstration(fact, probe.prompt, probe.answer), "retain")
    return tuple(kinds), tuple(kinds.values())


def demonstration_pool(pool_records: int) -> tuple[str, ...]:
    """The copy, update and retain demonstrations of the first ``pool_records`` training records."""
    return _pool(pool_records)[0]


def demonstration_kinds(pool_records: int) -> tuple[str, ...]:
    """The kind of each demonstration of :func:`demonstration_pool`, in the same order."""
    return _pool(pool_records)[1]


def pool_one_off(embedder_name: str, pool_records: int) -> list[OneOff]:
    """Embedding the pool once (minutes on one core), as a one-off the CLI announces."""
    embedder = embedder_for(embedder_name)
    texts = demonstration_pool(pool_records)
    path = pool_path(embedder, texts)
    return [OneOff(
        what=f"embed {len(texts):,} demonstrations from counterfact-train",
        where=path,
        done=path.is_file,
        run=lambda show: pool_embeddings(embedder, texts, POOL_NAME, progress=show),
        draws_progress=True,
    )]


@lru_cache(maxsize=2)
def _pool_index(embedder_name: str, pool_records: int) -> ExactIndex:
    """The searchable pool, read from its disk cache once per process (an edit needs one search)."""
    texts = demonstration_pool(pool_records)
    return ExactIndex(pool_embeddings(embedder_for(embedder_name), texts, POOL_NAME))


def nearest_demonstrations(
    fact: str, k: int, pool_records: int, embedder_name: str, kinds: tuple[str, ...] = KINDS,
) -> list[str]:
    """The ``k`` demonstrations of ``kinds`` nearest to ``fact`` (least similar first), then its copy.

    Nearest means by the embedding of ``fact``'s copy demonstration, so demonstrations of
    the same relation come first; the closest ends up next to the edit.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InvalidRequestError(f"Unknown demonstration kinds {sorted(unknown)}; choose from {', '.join(KINDS)}.")
    copy = copy_demonstration(fact)
    if k == 0:
        return [copy]
    texts = demonstration_pool(pool_records)
    allowed = [kind in kinds for kind in demonstration_kinds(pool_records)]
    index = _pool_index(embedder_name, pool_records)
    query = embedder_for(embedder_name).embed([copy])
    want = min(k, sum(allowed))
    search = want
    while True:  # widen the search until enough demonstrations of the wanted kinds are found
        _, idx = index.search(query, min(search, len(texts)))
        chosen = [int(j) for j in idx[0].tolist() if allowed[int(j)]][:want]
        if len(chosen) == want or search >= len(texts):
            break
        search *= 4
    return [texts[j] for j in reversed(chosen)] + [copy]
