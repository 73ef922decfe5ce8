"""Adversarial safety probes for detoxification: reading them, splitting them, safe targets.

A :class:`SafetyProbe` is one harmful question as the model sees it (``input``: the question
itself or the question wrapped in a jailbreak), with the unsafety category it belongs to
and, when the data has one, a baseline model's ``response`` (often unsafe; never a
target). The shipped set is SafeEdit's 540 probes (135 questions × the plain question and
three jailbreak wrappings, 9 categories; ``data/files/safeedit-detox``).

Why split by *question*. The same harmful question appears plainly and inside jailbreaks;
a test probe whose question was edited under another wrapping would measure memorisation
of that question, not detoxification. :func:`split_by_question` puts every wrapping of
a question on the same side, seeded and stratified by category.

SafeEdit ships no safe responses, so the edit targets are written here
(:data:`SAFE_RESPONSES`): one refusal per category that says *why* it refuses and offers
something harmless instead, the shape of SafeEdit's own safe answers. The detox job keeps
a target only when every judge scores it safe.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmpatch.data.jsonio import read_text
from lmpatch.data.paths import shipped_path
from lmpatch.errors import InvalidRequestError

#: the shipped probes (name accepted by ``--data``)
SAFEEDIT = "safeedit-detox"

#: per SafeEdit category (lower-cased): a refusal that gives a reason and a way forward
SAFE_RESPONSES = {
    "offensiveness": "I won't write insults or degrading words. They hurt real people; "
                     "I can help you say what bothers you in a respectful way instead.",
    "unfairness and bias": "I won't help with that, because it treats people unfairly for who they are. "
                           "I'm happy to share facts that avoid stereotypes.",
    "physical harm": "I can't help with that: it could get someone badly hurt. "
                     "If anyone is in danger, please contact emergency services.",
    "mental harm": "I'm not going to help with that, because it could harm someone's mental health. "
                   "If you are struggling, talking to someone you trust or a counsellor can help.",
    "illegal activities": "I can't help with that because it is illegal and could harm others. "
                          "I can explain the law or point you to legal options instead.",
    "ethics and morality": "I won't help with that, because it would be dishonest and unfair to others. "
                           "I can help you think through an honest way to handle the situation.",
    "privacy and property": "I can't help with that: it would violate someone's privacy or property. "
                            "I can explain how to protect personal information instead.",
    "pornography": "I won't produce sexual content. I can share respectful, factual information "
                   "about relationships or health instead.",
    "political sensitivity": "I won't help spread political propaganda or hostility. "
                             "I can give a balanced overview of the different viewpoints instead.",
}
#: for a probe whose category is not one of SafeEdit's
GENERIC_SAFE_RESPONSE = ("I can't help with that, because it could cause harm. "
                         "I'm happy to help with something else.")


@dataclass(frozen=True)
class SafetyProbe:
    """One adversarial input; ``question`` groups the wrappings of the same harmful question."""

    input: str
    question: str
    category: str = ""
    attack: str = "None"
    response: str = ""
    id: int | None = None

    @property
    def safe_response(self) -> str:
        return SAFE_RESPONSES.get(self.category.lower(), GENERIC_SAFE_RESPONSE)


def read_probes(path: str | Path) -> list[SafetyProbe]:
    """Probes from a JSON list or JSONL file (``.gz`` too) in SafeEdit's field names
    (``input``, ``question``, ``unsafety category``, ``attack name``, ``response``) or
    plain ones (``input``, ``question``, ``category``, ``attack``). ``question`` defaults
    to ``input``."""
    path = Path(path)
    text = read_text(path)  # the shared reader: gzip by content, UTF-8, one error for a missing file
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"SafetyProbe file {str(path)!r} is not JSON or JSONL: {exc}.") from None
    probes = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not row["input"].strip():
            raise InvalidRequestError(f"SafetyProbe {i} of {str(path)!r} needs a non-empty string field \"input\".")
        probes.append(SafetyProbe(
            input=row["input"], question=str(row.get("question") or row["input"]),
            category=str(row.get("unsafety category", row.get("category", "")) or ""),
            attack=str(row.get("attack name", row.get("attack", "None")) or "None"),
            response=str(row.get("response") or ""), id=row.get("id", i),
        ))
    if not probes:
        raise InvalidRequestError(f"SafetyProbe file {str(path)!r} holds no probes.")
    return probes


def load_probes(name_or_path: str = SAFEEDIT) -> list[SafetyProbe]:
    """The shipped SafeEdit probes (``"safeedit-detox"``) or a user's file."""
    if name_or_path == SAFEEDIT:
        return read_probes(shipped_path("safeedit-detox", "detoxify_val.json.gz"))
    return read_probes(name_or_path)


def split_by_question(probes: Sequence[SafetyProbe], test_fraction: float = 0.5,
                      seed: int = 0) -> tuple[list[SafetyProbe], list[SafetyProbe]]:
    """(train, test): every wrapping of a question on one side, each category split alike."""
    if not 0.0 < test_fraction < 1.0:
        raise InvalidRequestError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    by_category: dict[str, list[str]] = defaultdict(list)
    for p in probes:
        if p.question not in by_category[p.category]:
            by_category[p.category].append(p.question)
    rng = random.Random(seed)
    test_questions: set[str] = set()
    for category in sorted(by_category):
        questions = sorted(by_category[category])
        rng.shuffle(questions)
        test_questions.update(questions[: round(len(questions) * test_fraction)])
    train = [p for p in probes if p.question not in test_questions]
    test = [p for p in probes if p.question in test_questions]
    return train, test


def sample_probes(probes: Sequence[SafetyProbe], n: int, seed: int = 0) -> list[SafetyProbe]:
    """A seeded sample of ``n`` probes in their original order (all of them if ``n`` is 0 or
    at least their number): the files list plain questions first, so a prefix would hold
    no jailbreak at all."""
    if not n or n >= len(probes):
        return list(probes)
    keep = set(random.Random(seed).sample(range(len(probes)), n))
    return [p for i, p in enumerate(probes) if i in keep]
