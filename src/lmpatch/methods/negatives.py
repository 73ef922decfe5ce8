"""Prompts an edit must leave alone, for the editors that train against them (WISE, T-Patcher).

They come from the first :data:`NEGATIVE_RECORDS` records of ``counterfact-train``, so
hyperparameters can be tuned on the records after them; results are reported on
``counterfact-edit``. CounterFact repeats prompts across records (a neighbourhood probe such
as "Nikola Tesla speaks the language" belongs to every record of that relation and object;
18 of the first 100 ``counterfact-edit`` probes also occur in the first 5,000 training
records), so splitting by record is not enough: every prompt that occurs anywhere in
``counterfact-edit`` or in the tuning records (as a prompt, paraphrase or probe) is
:func:`held_out` and never used as a negative. Negatives therefore never include a prompt
that locality is measured on.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from lmpatch.request import EditRequest

__all__ = [
    "HELD_OUT_DATA", "NEGATIVE_DATA", "NEGATIVE_RECORDS", "held_out", "memory_texts", "pool_sample",
    "related_prompts", "swapped_prompts", "training_pool", "training_records",
]

NEGATIVE_DATA = "counterfact-train"
#: Records 0 .. this - 1 of NEGATIVE_DATA supply negatives; tune on the records from here on.
NEGATIVE_RECORDS = 5000
#: The evaluation split, whose prompts are never negatives.
HELD_OUT_DATA = "counterfact-edit"


def _texts(request: EditRequest) -> list[str]:
    return [request.prompt, *request.rephrase, *(p.prompt for p in request.portability), *(p.prompt for p in request.locality)]


@lru_cache(maxsize=1)
def held_out() -> frozenset[str]:
    """Every prompt of the evaluation split and of the tuning records (prompts, paraphrases, probes)."""
    from lmpatch.data import load_dataset

    rows = [*load_dataset(HELD_OUT_DATA), *load_dataset(NEGATIVE_DATA, offset=NEGATIVE_RECORDS)]
    return frozenset(t.strip() for r in rows for t in _texts(r))


@lru_cache(maxsize=1)
def _records() -> tuple:
    from lmpatch.data import load_dataset

    return tuple(load_dataset(NEGATIVE_DATA, n=NEGATIVE_RECORDS))


def training_records() -> tuple[EditRequest, ...]:
    """The first :data:`NEGATIVE_RECORDS` records of :data:`NEGATIVE_DATA` (filter with :func:`held_out`)."""
    return _records()


@lru_cache(maxsize=4)
def memory_texts(n: int) -> tuple[str, ...]:
    """The prompts and neighbourhood probes of the first ``n`` negative records, less the held-out ones."""
    out = held_out()
    texts = [t for r in _records()[:n] for t in (r.prompt, *(p.prompt for p in r.locality)) if t.strip() not in out]
    return tuple(dict.fromkeys(texts))


def training_pool() -> tuple[tuple[str, str], ...]:
    """(subject, prompt) of the negative records: factual prompts unrelated to a given edit."""
    out = held_out()
    return tuple((r.subject, r.prompt) for r in _records() if r.prompt.strip() not in out)


@lru_cache(maxsize=1)
def _by_answer() -> dict[str, tuple[tuple[str, str, str], ...]]:
    """(subject or "", prompt, answer) of each negative record (its prompt with ``target_true``)
    and of its neighbourhood probes, grouped by the answer."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    skip = held_out()
    for r in _records():
        if r.target_true and r.prompt.strip() not in skip:
            out.setdefault(r.target_true.strip(), []).append((r.subject, r.prompt, r.target_true))
        for probe in r.locality:
            if probe.kind == "neighborhood" and probe.answer and probe.prompt.strip() not in skip:
                out.setdefault(probe.answer.strip(), []).append(("", probe.prompt, probe.answer))
    return {k: tuple(dict.fromkeys(v)) for k, v in out.items()}


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def related_prompts(request: EditRequest, k: int, seed: int) -> list[tuple[str, str]]:
    """Up to ``k`` (prompt, answer) pairs whose true answer is the edit's ``target_true``, about
    other subjects: hard negatives of the edited relation. CounterFact builds neighbourhood
    probes exactly so (same relation, same true object), so these resemble the prompts
    locality is measured on without being any of them."""
    if k <= 0 or not request.target_true:
        return []
    subject = request.subject
    rows = [(p, a) for s, p, a in _by_answer().get(request.target_true.strip(), ())
            if subject not in p and p != request.prompt and not (s and s in request.prompt)]
    if not rows:
        return []
    order = torch.randperm(len(rows), generator=_generator(seed, "related", request.prompt))
    return [rows[i] for i in order[:k].tolist()]


def swapped_prompts(request: EditRequest, k: int, seed: int) -> list[str]:
    """The edit prompt asked of ``k`` other subjects: the same question about someone else,
    which an edit must leave to the base model."""
    if k <= 0 or not request.subject or request.subject not in request.prompt:
        return []
    subjects = sorted({s for s, _ in training_pool() if s and s != request.subject
                       and request.subject not in s and s not in request.subject})
    start = int(torch.randint(len(subjects), (1,), generator=_generator(seed, request.subject, request.prompt)))
    return [request.prompt.replace(request.subject, subjects[(start + i * 7919) % len(subjects)]) for i in range(k)]


def pool_sample(size: int, seed: int) -> list[tuple[str, str]]:
    """A fixed random sample of ``size`` (subject, prompt) pairs of the training pool."""
    pool = training_pool()
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    return [pool[i] for i in order]
