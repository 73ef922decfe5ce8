"""MQuAKE cases: the edits to make and the multi-hop questions whose answers they change.

A case is not one :class:`EditRequest` but a small bundle: one to three edits that must be
applied *together*, three paraphrased multi-hop questions, and two answer sets (the answer
before the edits and the answer the edits imply). The generic record loaders
(:mod:`lmpatch.data.loaders`) flatten files into single requests and skip bad records;
here a bad record is an error instead, because dropping a case silently would change the
denominator of a benchmark whose numbers are compared across papers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpatch.data.jsonio import read_records
from lmpatch.data.paths import shipped_path
from lmpatch.errors import InvalidRequestError
from lmpatch.request import EditRequest

SHIPPED_FILE = ("mquake", "MQuAKE-CF-subset254.json.gz")
PROMPT_DIR = ("mquake", "prompts")


@dataclass(frozen=True)
class SingleHop:
    """One link of a case's fact chain, as a question and as a cloze, with its answer."""

    question: str
    cloze: str
    answer: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class MQuAKECase:
    """One MQuAKE instance.

    ``requests`` are all applied at once (a case's edits only make sense together: its
    questions chain through every edited fact). ``answer``/``answer_aliases`` hold before
    the edits, ``new_answer``/``new_answer_aliases`` after them. ``single_hops`` is the
    original fact chain and ``new_single_hops`` the chain after the edits.
    """

    case_id: int
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    new_answer: str
    new_answer_aliases: tuple[str, ...]
    answer: str
    answer_aliases: tuple[str, ...]
    single_hops: tuple[SingleHop, ...] = ()
    new_single_hops: tuple[SingleHop, ...] = ()

    @property
    def n_hops(self) -> int:
        """Length of the fact chain (2-4 in MQuAKE); 0 when the record has no single hops."""
        return len(self.new_single_hops) or len(self.single_hops)

    def gold(self, which: str) -> tuple[str, ...]:
        """The accepted answers: ``"new"`` (after the edits) or ``"original"`` (before)."""
        if which == "new":
            return (self.new_answer, *self.new_answer_aliases)
        if which == "original":
            return (self.answer, *self.answer_aliases)
        raise ValueError(f"which must be 'new' or 'original', got {which!r}")


def default_path() -> Path:
    """The shipped 254-case subset of MQuAKE-CF (see ``files/mquake/ATTRIBUTION.md``)."""
    return shipped_path(*SHIPPED_FILE)


def prompt_path(name: str) -> Path:
    """A shipped official MQuAKE prompt file, e.g. ``prompt_path("multihop-prompts.txt")``."""
    return shipped_path(*PROMPT_DIR, *name.split("/"))


def load_mquake(path: str | Path | None = None, n: int | None = None) -> list[MQuAKECase]:
    """The cases of an MQuAKE file (JSON, JSON Lines, optionally gzipped), in file order.

    ``path=None`` reads the shipped subset; ``n`` keeps the first ``n`` cases. Any record
    that is not a well-formed MQuAKE case raises :class:`InvalidRequestError` naming it.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidRequestError(f"n must be a positive number of cases, got {n!r}.")
    source = default_path() if path is None else Path(path).expanduser()
    records = read_records(source)
    if not records:
        raise InvalidRequestError(f"{source} contains no MQuAKE cases.")
    if n is not None:
        records = records[:n]
    return [parse_case(record, position) for position, record in enumerate(records)]


MQUAKE_FIELDS = ("requested_rewrite", "questions", "new_answer")


def looks_like_mquake(path: str | Path) -> bool:
    """Whether ``path`` is an MQuAKE-format file: its first record has a ``requested_rewrite``
    *list*, ``questions`` and ``new_answer`` (a ROME-schema CounterFact record has a single
    ``requested_rewrite`` object and no questions). Unreadable files are not."""
    source = Path(path).expanduser()
    if not source.is_file():
        return False
    try:
        records = read_records(source)
    except (InvalidRequestError, OSError, ValueError):
        return False
    first = records[0] if records else None
    return (isinstance(first, dict) and all(k in first for k in MQUAKE_FIELDS)
            and isinstance(first["requested_rewrite"], list))


def parse_case(record: Any, position: int = 0) -> MQuAKECase:
    """One raw MQuAKE record as a :class:`MQuAKECase` (``position`` only names it in errors)."""
    if not isinstance(record, dict):
        raise InvalidRequestError(
            f"MQuAKE record {position} is a JSON {type(record).__name__}, not an object with "
            "requested_rewrite, questions, answer and new_answer."
        )
    where = f"MQuAKE case {record.get('case_id', f'at position {position}')}"
    missing = [k for k in ("case_id", "requested_rewrite", "questions", "answer", "new_answer") if k not in record]
    if missing:
        raise InvalidRequestError(f"{where} is missing {', '.join(missing)}; is this an MQuAKE file?")
    case_id = record["case_id"]
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise InvalidRequestError(f"{where} has case_id {case_id!r}; MQuAKE case ids are integers.")
    rewrites = record["requested_rewrite"]
    if not isinstance(rewrites, list) or not rewrites:
        raise InvalidRequestError(f"{where} has no requested_rewrite list; each case needs at least one edit.")
    return MQuAKECase(
        case_id=case_id,
        requests=tuple(_request(r, case_id, i, where) for i, r in enumerate(rewrites)),
        questions=_strings(record["questions"], f"{where} questions", nonempty=True),
        new_answer=_string(record["new_answer"], f"{where} new_answer"),
        new_answer_aliases=_strings(record.get("new_answer_alias", []), f"{where} new_answer_alias"),
        answer=_string(record["answer"], f"{where} answer"),
        answer_aliases=_strings(record.get("answer_alias", []), f"{where} answer_alias"),
        single_hops=_hops(record.get("single_hops", []), f"{where} single_hops"),
        new_single_hops=_hops(record.get("new_single_hops", []), f"{where} new_single_hops"),
    )


def _request(rewrite: Any, case_id: int, index: int, where: str) -> EditRequest:
    """MQuAKE stores a cloze template with ``{}`` for the subject; requests need the filled prompt."""
    what = f"{where} requested_rewrite[{index}]"
    if not isinstance(rewrite, dict):
        raise InvalidRequestError(f"{what} must be an object with prompt, subject, target_new and target_true.")
    template = _string(rewrite.get("prompt"), f"{what} prompt")
    subject = _string(rewrite.get("subject"), f"{what} subject")
    if template.count("{}") != 1:
        raise InvalidRequestError(f"{what} prompt {template!r} must contain '{{}}' exactly once, where the subject goes.")
    target_new = _target(rewrite.get("target_new"), f"{what} target_new")
    target_true = _target(rewrite.get("target_true"), f"{what} target_true")
    meta = {"dataset": "mquake", "edit_index": index}
    for key in ("relation_id", "question"):
        if isinstance(rewrite.get(key), str):
            meta[key] = rewrite[key]
    try:
        return EditRequest(
            prompt=template.replace("{}", subject),
            subject=subject,
            target_new=target_new,
            target_true=target_true,
            case_id=str(case_id),
            meta=meta,
        )
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{what}: {exc}") from exc


def _target(value: Any, what: str) -> str:
    """MQuAKE targets are ``{"str": ..., "id": ...}``; a bare string is accepted too."""
    if isinstance(value, dict):
        value = value.get("str")
    return _string(value, what)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{what} must be non-empty text, got {value!r:.80}.")
    return value


def _strings(value: Any, what: str, nonempty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or (nonempty and not value):
        raise InvalidRequestError(f"{what} must be a {'non-empty ' if nonempty else ''}list of text, got {value!r:.80}.")
    return tuple(_string(v, f"an entry of {what}") for v in value)


def _hops(value: Any, what: str) -> tuple[SingleHop, ...]:
    if not isinstance(value, list):
        raise InvalidRequestError(f"{what} must be a list of {{question, cloze, answer}} objects.")
    hops = []
    for i, hop in enumerate(value):
        if not isinstance(hop, dict):
            raise InvalidRequestError(f"{what}[{i}] must be an object with question, cloze and answer.")
        hops.append(
            SingleHop(
                question=_string(hop.get("question"), f"{what}[{i}] question"),
                cloze=_string(hop.get("cloze"), f"{what}[{i}] cloze"),
                answer=_string(hop.get("answer"), f"{what}[{i}] answer"),
                aliases=_strings(hop.get("answer_alias", []), f"{what}[{i}] answer_alias"),
            )
        )
    return tuple(hops)
