"""What to edit (:class:`EditRequest`) and what to check (:class:`Probe`).

Requests are validated when built, so a typo in a dataset or on the command line is
reported as one sentence naming the field, long before any model work starts.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from lmpatch.errors import InvalidRequestError


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be text, got {type(value).__name__}.")
    if not value.strip():
        raise InvalidRequestError(f"{what} is empty.")
    return value


# What a probe tests, beyond its list (locality or portability). Metrics are reported per
# kind, so a locality probe about the edited subject's *other* facts is never averaged
# with an unrelated neighbour. ``None`` is the plain kind of each list.
LOCALITY_KINDS = ("neighborhood", "other_attribution", "distracting_neighborhood")
PORTABILITY_KINDS = ("subject_alias", "reversed_relation", "one_hop")
PROBE_KINDS = LOCALITY_KINDS + PORTABILITY_KINDS


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected after it (teacher-forced or generated).

    ``kind`` (one of :data:`PROBE_KINDS`, or ``None``) says which side effect or
    portability dimension the probe measures.
    """

    prompt: str
    answer: str
    kind: str | None = None

    def __post_init__(self) -> None:
        _text(self.prompt, "Probe prompt")
        _text(self.answer, f"Answer of probe {self.prompt!r}")
        if self.kind is not None and self.kind not in PROBE_KINDS:
            raise InvalidRequestError(
                f"Unknown probe kind {self.kind!r} for {self.prompt!r}; choose one of {', '.join(PROBE_KINDS)}."
            )

    @classmethod
    def coerce(cls, value: Any) -> "Probe":
        if isinstance(value, Probe):
            return value
        if isinstance(value, dict):
            prompt = value.get("prompt")
            answer = value.get("answer", value.get("target", value.get("ground_truth")))
            return cls(prompt, answer, value.get("kind"))
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(*value)
        raise InvalidRequestError(f"Cannot read a probe from {value!r}: give {{'prompt': ..., 'answer': ...}}.")


@dataclass(frozen=True)
class EditRequest:
    """One fact to change: after the edit, ``prompt`` should continue with ``target_new``.

    ``subject`` must occur in ``prompt``; locate-and-edit methods read the model's
    internal key at the subject's last token. ``rephrase`` prompts test generalisation
    (they also expect ``target_new``); ``locality`` probes are unrelated facts that must
    not change; ``portability`` probes are consequences of the edit (expected answers
    under the new fact).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    case_id: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        _text(self.prompt, "Edit prompt")
        _text(self.subject, "Subject")
        _text(self.target_new, "Target (target_new)")
        if self.subject not in self.prompt:
            raise InvalidRequestError(
                f"Subject {self.subject!r} does not occur in prompt {self.prompt!r}; "
                "the subject must be written exactly as it appears in the prompt."
            )
        if self.target_true is not None:
            _text(self.target_true, "target_true")
            if self.target_true.strip() == self.target_new.strip():
                raise InvalidRequestError(
                    f"target_new and target_true are both {self.target_new!r}: nothing to change."
                )
        object.__setattr__(self, "rephrase", tuple(_text(r, "Rephrase prompt") for r in _seq(self.rephrase)))
        object.__setattr__(self, "locality", tuple(Probe.coerce(p) for p in _seq(self.locality)))
        object.__setattr__(self, "portability", tuple(Probe.coerce(p) for p in _seq(self.portability)))
        if self.case_id is not None:
            object.__setattr__(self, "case_id", str(self.case_id))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rephrase"] = list(self.rephrase)
        d["locality"] = [asdict(p) for p in self.locality]
        d["portability"] = [asdict(p) for p in self.portability]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EditRequest":
        if not isinstance(d, dict):
            raise InvalidRequestError(f"An edit request must be a JSON object, got {type(d).__name__}.")
        known = {f for f in cls.__dataclass_fields__}
        check_field_names(d, known, "Edit request")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise InvalidRequestError(f"Edit request is missing {', '.join(missing)}: {d!r:.200}")
        return cls(**{k: v for k, v in d.items() if k in known})


def check_field_names(record: dict, known: set[str] | Sequence[str], what: str) -> None:
    """Refuse a key that reads as a misspelt field ("rephrse", "target"): kept as an unknown
    key, the paraphrases or probes it holds would be dropped without a word and scored as
    absent. Keys unlike any field stay the caller's to keep (as metadata) or ignore."""
    known = set(known)
    for key in record:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        if close:
            raise InvalidRequestError(f"{what} has a field {key!r}; did you mean {close[0]!r}?")


def as_requests(value: "EditRequest | Sequence[EditRequest]", what: str = "edit") -> list["EditRequest"]:
    """One request or a sequence of them, as a non-empty list (the entry points' shared check)."""
    reqs = [value] if isinstance(value, EditRequest) else list(value)
    if not reqs:
        raise InvalidRequestError(f"No edit requests given to {what}().")
    for r in reqs:
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(f"{what}() takes EditRequest objects, got {type(r).__name__}.")
    return reqs


def _seq(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, dict, Probe)):
        return (value,)
    return tuple(value)
