"""The record formats lmpatch reads, and how each maps onto :class:`EditRequest`.

Published editing datasets come in a few incompatible shapes. Each :class:`Schema` knows how
to recognise its shape and how to turn one record into ``EditRequest`` keyword arguments;
nothing else in lmpatch needs to know the upstream field names. Field names that the
request has no slot for are kept in ``meta`` under their upstream spelling (for example
``attribute_prompts`` or ``"Recalled Relation"``) so that metrics can find them by the names
the papers use.

Every probe carries a ``kind`` (see :data:`lmpatch.request.PROBE_KINDS`) so that metrics are
reported per side effect and per portability dimension rather than averaged together.

Choices worth knowing:

* ROME CounterFact: the neighbourhood prompts become ``neighborhood`` locality probes whose
  answer is the *original* object (``target_true``), because they are other subjects that
  share it. The ``distracting_neighborhood_prompts`` are the same prompts with the edited
  fact written in front ("<subject> <relation> <target_new>. <neighbour prompt>"), so their
  answer is also ``target_true``: the edit must not leak into a neighbour because the new
  fact is in context (EasyEdit scores them the same way). ``unrelated_relation`` is another
  fact about the edited subject (``other_attribution``; answer its ``object``), and
  ``alternative_subject`` is an alias: the edit prompt with the alias in place of the subject
  must give ``target_new`` (``subject_alias``). ``alternative_subject`` and
  ``unrelated_relation`` also stay in ``meta`` (the alias and the relation label are useful
  on their own); ``distracting_neighborhood_prompts`` does not, the probes carry all of it.
* zsRE: the ``loc`` question keeps its ``"nq question: "`` prefix, exactly as EasyEdit and
  ROME feed it to the model, so locality scores stay comparable with theirs. The
  portability paper's zsRE files add an ``"inverse question"`` (asks for the edited subject
  from the new object, e.g. "Who is <alt>'s sister?", so its answer is ``subject``) or an
  ``alter_subject_question`` (the edit question about an alias, answered by ``alt``).
* ``portability`` may be the paper's ``{"New Question", "New Answer"}`` annotation (a
  ``one_hop`` probe), a list of probes, or a dict of named categories as EasyEdit and
  KnowEdit write it (``{"Subject_Aliasing": [...], "Reasoning": [...]}``); ``locality`` may be
  such a dict as well. Category names map to kinds through :func:`probe_kind` (the same
  choices as ``lmpatch.data.knowedit``): KnowEdit's ``Relation_Specificity`` and
  ``Forgetfulness`` are other facts about the edited subject (``other_attribution``),
  ``Reasoning`` is ``one_hop``, and a ``Logical_Generalization`` is ``reversed_relation``
  when its answer is the edited subject, ``one_hop`` otherwise. Unknown categories keep
  ``kind=None``.
* ``case_id`` is the upstream id where the record has one (CounterFact, EasyEdit); zsRE
  records have none, so theirs is the record's position in its file (not comparable across files).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.request import EditRequest, Probe, check_field_names

Fields = dict[str, Any]
Side = Literal["locality", "portability"]


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
    """An answer as text: a string, ``{"str": ...}``, a list of aliases or a list of such lists.

    Lists are read as "any of these", of which the first is the canonical spelling; KnowEdit
    nests them (one alias list per correct answer), so the first of the first is taken.
    """
    while True:
        if isinstance(value, dict) and "str" in value:
            value = value["str"]
        elif isinstance(value, (list, tuple)):
            if not value:
                raise InvalidRequestError(f"{what} is an empty list.")
            value = value[0]
        else:
            break
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be text, got {type(value).__name__}.")
    return value


def _optional_answer(record: dict, key: str) -> str | None:
    value = record.get(key)
    return None if value is None else _answer(value, key)


def _texts(value: Any, what: str) -> list[str]:
    """A field that holds one prompt or a list of them, as a list (text checked by Probe)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequestError(f"{what} must be a list of prompts, got {type(value).__name__}.")
    return value


# ---------------------------------------------------------------- probes and their kinds


def _category_key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


# Category names used by EasyEdit's scripts, KnowEdit and the portability paper's folders
# (normalised by _category_key), per probe list.
_CATEGORY_KINDS: dict[str, dict[str, str]] = {
    "locality": {
        "neighborhood": "neighborhood",
        "neighbourhood": "neighborhood",
        "other_attribution": "other_attribution",
        "unrelated_relation": "other_attribution",
        "relation_specificity": "other_attribution",
        "forgetfulness": "other_attribution",  # the subject's other objects for the edited relation
        "distracting_neighborhood": "distracting_neighborhood",
        "distracting_neighbourhood": "distracting_neighborhood",
        "distracting_neighbor": "distracting_neighborhood",
        "distracting_neighbour": "distracting_neighborhood",
    },
    "portability": {
        "subject_alias": "subject_alias",
        "subject_aliasing": "subject_alias",
        "subject_replace": "subject_alias",
        "reversed_relation": "reversed_relation",
        "reverse": "reversed_relation",
        "reversed": "reversed_relation",
        "inverse_relation": "reversed_relation",
        "one_hop": "one_hop",
        "reasoning": "one_hop",
        # KnowEdit's logical generalisations are consequences one inference away; those whose
        # answer is the edited subject are reversed relations (see read_probes).
        "logical_generalization": "one_hop",
    },
}
_REVERSIBLE = {"logical_generalization"}


def probe_kind(category: str, side: Side) -> str | None:
    """The lmpatch probe kind for a dataset's category name, or ``None`` if it names none.

    ``side`` is the list the probes go to (``"locality"`` or ``"portability"``). Names are
    matched case-insensitively with spaces, hyphens and underscores alike, so
    ``"Subject Replace"``, ``"Subject_Aliasing"`` and ``"subject_alias"`` are one kind.
    """
    return _CATEGORY_KINDS[side].get(_category_key(category))


_ANSWER_KEYS = ("answer", "ground_truth", "target", "New Answer")


def _probe(item: Any, kind: str | None, side: Side) -> list[Probe]:
    """The probes in one item: a probe object, a ``[prompt, answer]`` pair, or parallel lists."""
    if isinstance(item, Probe):
        return [item]
    if _is_pair(item):
        return [Probe(item[0], item[1], kind)]
    if not isinstance(item, dict):
        raise InvalidRequestError(
            f"Cannot read a {side} probe from {item!r:.120}: give {{'prompt': ..., 'answer': ...}}."
        )
    prompt = item.get("prompt", item.get("New Question"))
    key = next((k for k in _ANSWER_KEYS if item.get(k) is not None), None)
    if prompt is None or key is None:
        raise InvalidRequestError(
            f"A {side} probe needs a prompt and an answer ('answer' or 'ground_truth'), got {item!r:.120}."
        )
    kind = item.get("kind", kind)
    if isinstance(prompt, list):  # EasyEdit's {"prompt": [...], "ground_truth": [...]}
        answers = item[key]
        if not isinstance(answers, list) or len(answers) != len(prompt):
            raise InvalidRequestError(f"{side} prompts and answers must be lists of the same length.")
        return [Probe(p, _answer(a, f"{side} answer"), kind) for p, a in zip(prompt, answers)]
    return [Probe(prompt, _answer(item[key], f"{side} answer of {prompt!r}"), kind)]


def _is_pair(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)


def _is_category_dict(value: dict) -> bool:
    return not any(k in value for k in ("prompt", "New Question", "kind", *_ANSWER_KEYS))


def read_probes(value: Any, side: Side, kind: str | None = None, subject: str | None = None) -> list[Probe]:
    """Probes from any of the shapes datasets use for a ``locality`` or ``portability`` field.

    Accepted: one probe dict (``prompt`` plus ``answer``/``ground_truth``, optionally
    ``kind``), the portability paper's ``{"New Question", "New Answer"}`` (a ``one_hop``
    probe), a ``[prompt, answer]`` pair, a list of any of these, or a dict of categories
    (``{"Subject_Aliasing": [...], "Reasoning": [...]}``) whose names set the kind via
    :func:`probe_kind`. ``kind`` is the kind for items that do not say theirs. Given the
    edited ``subject``, a logical generalisation whose answer is that subject is a
    ``reversed_relation`` probe ("Who is the son of <new father>?").
    """
    if value is None:
        return []
    if isinstance(value, list):
        return [
            probe
            for item in value
            for probe in (_probe(item, kind, side) if _is_pair(item) else read_probes(item, side, kind, subject))
        ]
    if isinstance(value, dict):
        if "New Question" in value:
            return _probe(value, kind or "one_hop", side)
        if _is_category_dict(value):
            return [
                _reversed_if_subject(probe, subject) if _category_key(str(category)) in _REVERSIBLE else probe
                for category, items in value.items()
                for probe in read_probes(items, side, probe_kind(str(category), side), subject)
            ]
    return _probe(value, kind, side)


def _reversed_if_subject(probe: Probe, subject: str | None) -> Probe:
    if subject is not None and probe.answer.strip().lower() == subject.strip().lower():
        return replace(probe, kind="reversed_relation")
    return probe


def _recalled_relations(value: Any) -> list[str]:
    """The "Recalled Relation" notes the portability paper attaches to its one-hop questions."""
    items = value if isinstance(value, list) else [value]
    return [i["Recalled Relation"] for i in items if isinstance(i, dict) and i.get("Recalled Relation") is not None]


def _probe_pairs(prompts: Any, answers: Any, what: str, kind: str | None) -> list[Probe]:
    """Probes from parallel prompt/answer fields, each either one text or a list."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [Probe(prompts, _answer(answers, f"{what} answer"), kind)]
    if not isinstance(prompts, list) or not isinstance(answers, list) or len(answers) != len(prompts):
        raise InvalidRequestError(f"{what} prompts and answers must be lists of the same length.")
    return [Probe(p, _answer(a, f"{what} answer"), kind) for p, a in zip(prompts, answers)]


def _alias(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"alternative_subject must be a non-empty name, got {value!r}.")
    return value


def _other_attributions(value: Any) -> list[Probe]:
    """``unrelated_relation {relation_id, object, question}``: another fact about the subject."""
    probes = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or item.get("question") is None or item.get("object") is None:
            raise InvalidRequestError(
                f"unrelated_relation must be an object with 'question' and 'object', got {item!r:.120}."
            )
        probes.append(Probe(item["question"], _answer(item["object"], "unrelated_relation.object"), "other_attribution"))
    return probes


def _extras(record: dict, consumed: set[str]) -> dict:
    return {k: v for k, v in record.items() if k not in consumed}


def _with_relations(meta: dict, portability: Any) -> dict:
    relations = _recalled_relations(portability)
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
    locality = []
    consumed = {"case_id", "requested_rewrite", "paraphrase_prompts", "portability"}
    if target_true is not None:  # without it neighbours cannot be scored; they stay visible in meta
        for key, kind in (("neighborhood_prompts", "neighborhood"), ("distracting_neighborhood_prompts", "distracting_neighborhood")):
            locality += [Probe(p, target_true, kind) for p in _texts(record.get(key), key)]
            consumed.add(key)
    if record.get("unrelated_relation") is not None:
        locality += _other_attributions(record["unrelated_relation"])
    portability = read_probes(record.get("portability"), "portability")
    portability += [
        Probe(template.replace("{}", _alias(alias)), target_new, "subject_alias")
        for alias in _texts(record.get("alternative_subject"), "alternative_subject")
    ]
    meta = {"schema": "rome"}
    if rewrite.get("relation_id") is not None:
        meta["relation_id"] = rewrite["relation_id"]
    for key in ("target_new", "target_true"):
        if isinstance(rewrite.get(key), dict) and rewrite[key].get("id") is not None:
            meta[f"{key}_id"] = rewrite[key]["id"]
    meta.update(_extras(record, consumed))
    return {
        "prompt": template.replace("{}", subject),
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "rephrase": record.get("paraphrase_prompts") or (),
        "locality": locality,
        "portability": portability,
        "case_id": record.get("case_id", position),
        "meta": _with_relations(meta, record.get("portability")),
    }


def _zsre_fields(record: dict, position: int) -> Fields:
    answers = record.get("answers")
    subject = _field(record, "subject")
    target_new = _answer(_field(record, "alt"), "alt")
    locality = []
    if record.get("loc") is not None:
        locality = [Probe(record["loc"], _answer(_field(record, "loc_ans"), "loc_ans"), "neighborhood")]
    portability = read_probes(record.get("portability"), "portability")
    # The inverse question asks for the edited subject from the new object ("Who is <alt>'s sister?").
    portability += [Probe(q, subject, "reversed_relation") for q in _texts(record.get("inverse question"), "inverse question")]
    portability += [
        Probe(q, target_new, "subject_alias") for q in _texts(record.get("alter_subject_question"), "alter_subject_question")
    ]
    meta = {"schema": "zsre"}
    consumed = {"src", "subject", "alt", "rephrase", "loc", "loc_ans", "portability", "case_id",
                "inverse question", "alter_subject_question"}
    meta.update(_extras(record, consumed))
    return {
        "prompt": _field(record, "src"),
        "subject": subject,
        "target_new": target_new,
        "target_true": _answer(answers, "answers") if answers else None,
        "rephrase": record.get("rephrase") or (),
        "locality": locality,
        "portability": portability,
        "case_id": record.get("case_id", position),
        "meta": _with_relations(meta, record.get("portability")),
    }


def _easyedit_fields(record: dict, position: int) -> Fields:
    # EasyEdit's flat locality prompt is the CounterFact/zsRE neighbour (its scripts pass it as
    # 'neighborhood'); KnowEdit adds a dict of categories under "locality".
    locality = _probe_pairs(record.get("locality_prompt"), record.get("locality_ground_truth"), "locality", "neighborhood")
    locality += read_probes(record.get("locality"), "locality", subject=record.get("subject"))
    consumed = {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                "locality_ground_truth", "locality", "portability", "case_id"}
    meta = {"schema": "easyedit"}
    meta.update(_extras(record, consumed))
    return {
        "prompt": _field(record, "prompt"),
        "subject": _field(record, "subject"),
        "target_new": _answer(_field(record, "target_new"), "target_new"),
        "target_true": _optional_answer(record, "ground_truth"),
        "rephrase": record.get("rephrase_prompt") or (),
        "locality": locality,
        "portability": read_probes(record.get("portability"), "portability", subject=record.get("subject")),
        "case_id": record.get("case_id", position),
        "meta": _with_relations(meta, record.get("portability")),
    }


_REQUEST_FIELDS = ("prompt", "subject", "target_new", "target_true", "rephrase", "locality", "portability", "case_id")


def _lmpatch_fields(record: dict, position: int) -> Fields:
    """Records written by :func:`lmpatch.data.save_requests` (``EditRequest.to_dict``) or by hand."""
    check_field_names(record, set(_REQUEST_FIELDS) | {"meta"}, f"Record {position + 1}")
    meta = dict(record.get("meta") or {})
    meta.update(_extras(record, set(_REQUEST_FIELDS) | {"meta"}))
    fields = {k: record[k] for k in _REQUEST_FIELDS if record.get(k) is not None}
    for key in ("prompt", "subject", "target_new"):
        _field(record, key)
    for side in ("locality", "portability"):
        fields[side] = read_probes(record.get(side), side, subject=record.get("subject"))
    fields.setdefault("case_id", position)
    fields["meta"] = meta
    return fields


ROME = Schema(
    "rome", ("requested_rewrite",),
    "ROME CounterFact: requested_rewrite{prompt with '{}', subject, target_new{str}, target_true{str}}, "
    "paraphrase_prompts, neighborhood_prompts (optionally distracting_neighborhood_prompts, "
    "unrelated_relation, alternative_subject, portability)",
    _rome_fields,
)
ZSRE = Schema(
    "zsre", ("src", "subject", "alt"),
    "zsRE/MEND: src, subject, alt, answers, rephrase, loc, loc_ans (optionally 'inverse question', "
    "alter_subject_question)",
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
