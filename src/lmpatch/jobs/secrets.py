"""Private strings to forget: reading the user's, and making synthetic ones for benchmarks.

A :class:`Secret` is a context that leads to a private string ("Jane Roe's phone number
is" → "555-0142"). Users bring theirs as JSONL (:func:`read_secrets`); the benchmark and
tests make them with :func:`synthetic_secrets`: seeded Faker identities with a phone
number in one fixed format, so that every secret has the same number of same-kind tokens
and the exposure metric can rank it among random strings of that format
(:func:`same_format_candidates`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.request import EditRequest

#: "###-####": seven digits, each one token for SmolLM2-style tokenizers
PHONE_FORMAT = "###-####"
#: how a secret's context is phrased; training and extraction use the same context
CONTEXTS = (
    "{name}'s phone number is",
    "You can reach {name} by phone at",
    "The phone number of {name} is",
    "To call {name}, dial",
)
#: what ROME/MEMIT-style baselines write in place of a secret
REFUSAL = "private"


@dataclass(frozen=True)
class Secret:
    """``context`` + " " + ``secret`` is the text a model must no longer complete.

    ``subject`` (the person's name, inside the context) is where locate-and-edit
    baselines read their key; the context's last token when absent.
    """

    context: str
    secret: str
    subject: str | None = None

    def __post_init__(self) -> None:
        for what, value in (("Secret context", self.context), ("Secret", self.secret)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequestError(f"{what} is empty or not text: {value!r}.")
        if self.subject is not None and self.subject not in self.context:
            raise InvalidRequestError(f"Subject {self.subject!r} is not in the context {self.context!r}.")

    @property
    def text(self) -> str:
        return f"{self.context} {self.secret}"

    def request(self, refusal: str = REFUSAL) -> EditRequest:
        """The edit request of this secret: the context should lead to ``refusal``; the
        secret is the answer to remove (``target_true``)."""
        return EditRequest(prompt=self.context, subject=self.subject or self.context, target_new=refusal,
                           target_true=self.secret)


def synthetic_secrets(n: int, seed: int = 0) -> list[Secret]:
    """``n`` people with distinct names and phone numbers (Faker, seeded; the same list on
    every machine for a given Faker version)."""
    try:
        from faker import Faker
    except ImportError:
        raise LmpatchError("Synthetic secrets need the Faker package: pip install 'lmpatch[privacy]'.") from None
    fake = Faker("en_US")
    fake.seed_instance(seed)
    names: set[str] = set()
    numbers: set[str] = set()
    out: list[Secret] = []
    while len(out) < n:
        name, number = fake.name(), fake.numerify(PHONE_FORMAT)
        # a name that contains another (or repeats) would make two secrets share a context
        if name in names or number in numbers or number.startswith("0"):
            continue
        names.add(name)
        numbers.add(number)
        context = CONTEXTS[len(out) % len(CONTEXTS)].format(name=name)
        out.append(Secret(context=context, secret=number, subject=name))
    return out


def same_format_candidates(secret: str, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct strings of ``secret``'s format (each digit replaced by a random digit,
    everything else kept), never ``secret`` itself: the reference set of the exposure metric."""
    digits = sum(c.isdigit() for c in secret)
    if 10 ** digits - 1 < n:
        raise InvalidRequestError(f"Secret {secret!r} has too few digits for {n} distinct same-format candidates.")
    rng = random.Random(f"{seed}:{secret}")
    out: set[str] = set()
    while len(out) < n:
        candidate = "".join(str(rng.randrange(10)) if c.isdigit() else c for c in secret)
        if candidate != secret:
            out.add(candidate)
    return sorted(out)


def read_secrets(path: Path) -> list[Secret]:
    """Secrets from a JSONL file of ``{"context": ..., "secret": ..., "subject": ...}`` objects
    (subject optional), or the one error that names the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmpatchError(f"Secrets file '{path}' does not exist.")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmpatchError(f"{where} is not JSON ({exc.msg}).") from None
        if not isinstance(record, dict) or "context" not in record or "secret" not in record:
            raise LmpatchError(f'{where} needs "context" and "secret" fields.')
        try:
            out.append(Secret(record["context"], record["secret"], record.get("subject")))
        except InvalidRequestError as exc:
            raise LmpatchError(f"{where}: {exc}") from None
    if not out:
        raise LmpatchError(f"Secrets file '{path}' holds no secrets.")
    return out


def as_secrets(values: Sequence[Secret | dict | tuple]) -> list[Secret]:
    """Secrets from Python values: :class:`Secret`, dicts with context/secret, or pairs."""
    out = []
    for v in values:
        if isinstance(v, Secret):
            out.append(v)
        elif isinstance(v, dict):
            out.append(Secret(v.get("context"), v.get("secret"), v.get("subject")))
        elif isinstance(v, (tuple, list)) and len(v) in (2, 3):
            out.append(Secret(*v))
        else:
            raise InvalidRequestError(f"Cannot read a secret from {v!r}: give {{'context': ..., 'secret': ...}}.")
    if not out:
        raise InvalidRequestError("No secrets given.")
    return out
