"""The record formats lmpatch reads, and how each maps onto :class:`EditRequest`.

Published editing datasets come in a few incompatible shapes. Each :class:`Schema` knows how
to recognise its shape and how to turn one record into ``EditRequest`` keyword arguments;
nothing else in lmpatch needs to know the upstream field names. Field names that the
request has no slot for are kept in ``meta`` under their upstream spelling (for example
``attribute_prompts`` or ``"Recalled Relation"``) so that metrics can find them by the names
the papers use.

Choices worth knowing:

* ROME CounterFact: the neighbourhood prompts become locality probes whose answer is the
  *original* object (``target_true``), because they are other subjects that share it.
* zsRE: the ``loc`` question keeps its ``"nq question: "`` prefix, exactly as EasyEdit and
  ROME feed it to the model, so locality scores stay comparable with theirs.
* ``case_id`` is the upstream id where the record has one (CounterFact, EasyEdit); zsRE
  records have none, so theirs is the record's position in its file (not comparable across files).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.request import EditRequest, Probe

Fields = dict[str, Any]


@dataclass(frozen=True)
class Schema:
    """One record format: how to recognise it and how to read a record of it."""

    name: str
    required: tuple[str, ...]
    expected: str
    to_fields: Callable[[dict, int], Fields]
    any_of: tuple[str, ...] = ()

    def matches(self, record: Any) -> bool:
        if not isinstance(record, dict) or not all(k in record for k in self.required):
            return False
        return not self.any_of or any(k in record for k in self.any_of)


# ---------------------------------------------------------------- field helpers


def _field(record: dict, key: str, where: str = "record") -> Any:
    if not isinstance(record, dict):
        raise InvalidRequestError(f"{where} must be a JSON object, got {type(record).__name__}.")
    if key not in record or record[key] is None:
        raise InvalidRequestError(f"The {where} has no {key!r} field.")
    return record[key]


def _answer(value: Any, what: str) -> str:
    """An answer as text: datasets store it as a string, ``{"str": ...}`` or a list of aliases."""
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidRequestError(f"{what} is an empty list.")
        value = value[0]
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be text, got {type(value).__name__}.")
    return value


def _optional_answer(record: dict, key: str) -> str | None:
    value = record.get(key)
    return None if value is None else _answer(value, key)


def _portability(value: Any) -> tuple[list[Probe], list[str]]:
    """Portability probes plus the recalled relations EasyEdit annotates them with."""
    if value is None:
        return [], []
    items = value if isinstance(value, list) else [value]
    probes, relations = [], []
    for item in items:
        if isinstance(item, dict) and "New Question" in item:
            probes.append(Probe(item["New Question"], _answer(item.get("New Answer"), "portability 'New Answer'")))
            if item.get("Recalled Relation") is not None:
                relations.append(item["Recalled Relation"])
        else:
            probes.append(Probe.coerce(item))
    return probes, relations


def _probe_pairs(prompts: Any, answers: Any, what: str) -> list[Probe]:
    """Probes from parallel prompt/answer fields, each either one text or a list."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [Probe(prompts, _answer(answers, f"{what} answer"))]
    if not isinstance(prompts, list) or not isinstance(answers, list) or len(answers) != len(prompts):
        raise InvalidRequestError(f"{what} prompts and answers must be lists of the same length.")
    return [Probe(p, _answer(a, f"{what} answer")) for p, a in zip(prompts, answers)]


def _extras(record: dict, consumed: set[str]) -> dict:
    return {k: v for k, v in record.items() if k not in consumed}


def _with_relations(meta: dict, relations: list[str]) -> dict:
    if relations:
        meta["Recalled Relation"] = relations[0] if len(relations) == 1 else relations
    return meta


# ---------------------------------------------------------------- the formats


def _rome_fields(record: dict, position: int) -> Fields:
    rewrite = _field(record, "requested_rewrite")
    where = "record's requested_rewrite"
    subject = _field(rewrite, "subject", where)
    template = _field(rewrite, "prompt", where)
    if not isinstance(subject, str) or not isinstance(template, str) or "{}" not in template:
        raise InvalidRequestError(
            "requested_rewrite.prompt must be a text template with '{}' where the subject goes, "
            f"got {template!r}."
        )
    target_new = _answer(_field(rewrite, "target_new", where), "requested_rewrite.target_new")
    target_true = _optional_answer(rewrite, "target_true")
    neighbours = record.get("neighborhood_prompts") or []
    portability, relations = _portability(record.get("portability"))
    meta = {"schema": "rome"}
    if rewrite.get("relation_id") is not None:
        meta["relation_id"] = rewrite["relation_id"]
    for key in ("target_new", "target_true"):
        if isinstance(rewrite.get(key), dict) and rewrite[key].get("id") is not None:
            meta[f"{key}_id"] = rewrite[key]["id"]
    consumed = {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "portability"}
    if target_true is None:
        consumed.discard("neighborhood_prompts")  # no answer to score them with; keep them visible
    meta.update(_extras(record, consumed))
    return {
        "prompt": template.replace("{}", subject),
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "rephrase": record.get("paraphrase_prompts") or (),
        "locality": [Probe(p, target_true) for p in neighbours] if target_true is not None else [],
        "portability": portability,
        "case_id": record.get("case_id", position),
        "meta": _with_relations(meta, relations),
    }


def _zsre_fields(record: dict, position: int) -> Fields:
    answers = record.get("answers")
    portability, relations = _portability(record.get("portability"))
    locality = []
    if record.get("loc") is not None:
        locality = [Probe(record["loc"], _answer(_field(record, "loc_ans"), "loc_ans"))]
    meta = {"schema": "zsre"}
    meta.update(_extras(record, {"src", "subject", "alt", "rephrase", "loc", "loc_ans", "portability", "case_id"}))
    return {
        "prompt": _field(record, "src"),
        "subject": _field(record, "subject"),
        "target_new": _answer(_field(record, "alt"), "alt"),
        "target_true": _answer(answers, "answers") if answers else None,
        "rephrase": record.get("rephrase") or (),
        "locality": locality,
        "portability": portability,
        "case_id": record.get("case_id", position),
        "meta": _with_relations(meta, relations),
    }


def _easyedit_fields(record: dict, position: int) -> Fields:
    portability, relations = _portability(record.get("portability"))
    consumed = {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                "locality_ground_truth", "portability", "case_id"}
    meta = {"schema": "easyedit"}
    meta.update(_extras(record, consumed))
    return {
        "prompt": _field(record, "prompt"),
        "subject": _field(record, "subject"),
        "target_new": _answer(_field(record, "target_new"), "target_new"),
        "target_true": _optional_answer(record, "ground_truth"),
        "rephrase": record.get("rephrase_prompt") or (),
        "locality": _probe_pairs(record.get("locality_prompt"), record.get("locality_ground_truth"), "locality"),
        "portability": portability,
        "case_id": record.get("case_id", position),
        "meta": _with_relations(meta, relations),
    }


_REQUEST_FIELDS = ("prompt", "subject", "target_new", "target_true", "rephrase", "locality", "portability", "case_id")


def _lmpatch_fields(record: dict, position: int) -> Fields:
    """Records written by :func:`lmpatch.data.save_requests` (``EditRequest.to_dict``)."""
    meta = dict(record.get("meta") or {})
    meta.update(_extras(record, set(_REQUEST_FIELDS) | {"meta"}))
    fields = {k: record[k] for k in _REQUEST_FIELDS if record.get(k) is not None}
    for key in ("prompt", "subject", "target_new"):
        _field(record, key)
    fields.setdefault("case_id", position)
    fields["meta"] = meta
    return fields


ROME = Schema(
    "rome", ("requested_rewrite",),
    "ROME CounterFact: requested_rewrite{prompt with '{}', subject, target_new{str}, target_true{str}}, "
    "paraphrase_prompts, neighborhood_prompts",
    _rome_fields,
)
ZSRE = Schema(
    "zsre", ("src", "subject", "alt"),
    "zsRE/MEND: src, subject, alt, answers, rephrase, loc, loc_ans",
    _zsre_fields,
)
EASYEDIT = Schema(
    "easyedit", ("prompt", "subject", "target_new"),
    "EasyEdit: prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth",
    _easyedit_fields,
    any_of=("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"),
)
LMPATCH = Schema(
    "lmpatch", ("prompt", "subject", "target_new"),
    "lmpatch: prompt, subject, target_new, target_true, rephrase, locality, portability",
    _lmpatch_fields,
)

SCHEMAS: tuple[Schema, ...] = (ROME, ZSRE, EASYEDIT, LMPATCH)


def detect_schema(record: Any, source: str) -> Schema:
    """The schema of ``record`` (the first record of a file decides for the whole file)."""
    for schema in SCHEMAS:
        if schema.matches(record):
            return schema
    found = sorted(record)[:12] if isinstance(record, dict) else type(record).__name__
    expected = "; ".join(s.expected for s in SCHEMAS)
    raise LmpatchError(
        f"The records in {source} match no format lmpatch reads (first record has {found}). "
        f"Expected one of: {expected}."
    )


# ---------------------------------------------------------------- safe repairs


def repair(fields: Fields) -> tuple[Fields, list[str]]:
    """Fix defects that have exactly one sensible reading; return the names of the fixes.

    * subject written with different letter case than in the prompt (zsRE has these):
      use the prompt's spelling, since locate-and-edit methods need the exact token span;
    * ``target_true`` equal to ``target_new`` (zsRE answers that coincide with the new
      answer): drop ``target_true``, the edit target itself is still well defined.
    """
    fixes = []
    fields = dict(fields)
    prompt, subject = fields.get("prompt"), fields.get("subject")
    if isinstance(prompt, str) and isinstance(subject, str) and subject.strip() and subject not in prompt:
        match = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
        if match:
            fields["subject"] = match.group(0)
            fields["meta"] = {**fields.get("meta", {}), "subject_as_given": subject}
            fixes.append("subject_case")
    new, true = fields.get("target_new"), fields.get("target_true")
    if isinstance(new, str) and isinstance(true, str) and new.strip() and new.strip() == true.strip():
        fields["target_true"] = None
        fixes.append("target_true_equals_target_new")
    if fixes:
        fields["meta"] = {**fields.get("meta", {}), "fixes": fixes}
    return fields, fixes


def to_request(schema: Schema, record: Any, position: int) -> tuple[EditRequest, list[str]]:
    """One record as a validated request plus the repairs applied; raises InvalidRequestError."""
    if not isinstance(record, dict):
        raise InvalidRequestError(f"Record must be a JSON object, got {type(record).__name__}.")
    fields, fixes = repair(schema.to_fields(record, position))
    return EditRequest(**fields), fixes
