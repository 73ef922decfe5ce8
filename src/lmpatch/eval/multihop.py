"""MQuAKE multi-hop accuracy: does an edit change the answers that *follow* from it?

Recalling an edited fact is easy for locate-and-edit methods; MQuAKE asks questions whose
answer chains through the edited fact ("Who is the head of state of the country Ellie
Kemper is a citizen of?" after editing her citizenship). Protocol, after Zhong et al.
(EMNLP 2023) and their released evaluation code:

* each case's edits (1-3) are computed together by ``edit_fn`` from the unedited model and
  applied only while that case's questions are asked (edits of different cases never
  meet: MQuAKE-CF v1 cases contradict each other);
* each of the case's 3 paraphrased questions is asked after the official few-shot prompt
  (``multihop-prompts.txt``: ``"\\nQ: {question} A:"``; or the chain-of-thought prompt
  ``multihop-cot-prompts.txt``), greedy decoding;
* the answer is the generated text up to the first newline (for CoT: the text after the
  first ``"Answer:"`` up to the newline), whitespace-stripped;
* a question is correct when the answer matches the gold answer or one of its aliases;
  ``match="exact"`` is MQuAKE's string equality, ``"normalized"`` the same after SQuAD-style
  normalisation, ``"contains"`` accepts a normalised alias anywhere in the answer;
* **multi-hop accuracy** is case-level: a case counts when ANY of its questions is correct.
  Question-level accuracy is reported beside it.

Without ``edit_fn`` the unedited model is scored against the ORIGINAL answers (the base
model's own multi-hop ability, the ceiling an edit can hope to keep); with ``edit_fn``
against the NEW answers. Each record also says whether the other answer set matched, so a
post-edit run shows how often the model still gives the pre-edit answer.

Speed: the few-shot block (~320 tokens) dwarfs a question (~20), so its key/value cache is
computed once and shared by every question asked of the same weights (all questions before
editing; a case's 3 questions after it), and decoding stops as soon as every answer line
is complete: :func:`lmpatch.eval.scoring.generate` with the prompt's completion test.
"""
from __future__ import annotations

import logging
import re
import string
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from lmpatch.data.mquake import MQuAKECase, prompt_path
from lmpatch.errors import InvalidRequestError
from lmpatch.eval.scoring import generate
from lmpatch.model.loading import LoadedModel
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

EditFn = Callable[[LoadedModel, list[EditRequest]], Any]
"""``edit_fn(model, requests) -> Patch``: all of one case's edits, computed together."""

MATCHES = ("exact", "normalized", "contains")
GOLDS = ("new", "original")


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptFormat:
    """How a question is put after the official demonstrations and how its answer is read back.

    ``question_prefix`` and ``question_suffix`` wrap the question exactly as the
    demonstrations do; ``answer_marker`` is where the answer starts in the generation
    (``None``: at its start); an answer ends at the first newline after that.
    """

    name: str
    file: str
    question_prefix: str
    question_suffix: str
    answer_marker: str | None
    default_max_new_tokens: int

    def demonstrations(self) -> str:
        return prompt_path(self.file).read_text(encoding="utf-8")

    def build(self, demonstrations: str, question: str) -> str:
        return f"{demonstrations}{self.question_prefix}{question}{self.question_suffix}"

    def parse(self, generation: str) -> str:
        """The answer in a generation, or ``""`` when the format was not followed."""
        text = generation
        if self.answer_marker is not None:
            at = text.find(self.answer_marker)
            if at < 0:
                return ""
            text = text[at + len(self.answer_marker) :]
        return text.split("\n", 1)[0].strip()

    def complete(self, generation: str) -> bool:
        """True once the answer line has ended, so further tokens cannot change :meth:`parse`."""
        if self.answer_marker is None:
            return "\n" in generation
        at = generation.find(self.answer_marker)
        return at >= 0 and "\n" in generation[at + len(self.answer_marker) :]


PROMPTS: dict[str, PromptFormat] = {
    # Demonstrations are "Q: ... A: answer" lines; the file has no trailing newline.
    "multihop": PromptFormat("multihop", "multihop-prompts.txt", "\nQ: ", " A:", None, 12),
    # Blocks "Question: ...\nThoughts: ...\nAnswer: ..." separated by blank lines.
    "cot": PromptFormat("cot", "multihop-cot-prompts.txt", "\n\nQuestion: ", "\nThoughts:", "Answer:", 96),
}


def prompt_format(name: str) -> PromptFormat:
    if name not in PROMPTS:
        raise InvalidRequestError(f"Unknown multi-hop prompt {name!r}; choose one of {', '.join(PROMPTS)}.")
    return PROMPTS[name]


# --------------------------------------------------------------------------- matching

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """SQuAD-style: NFKC, casefold, punctuation to spaces, drop articles, collapse spaces."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(answer: str, gold: Sequence[str], match: str = "exact") -> bool:
    """Whether ``answer`` is one of the ``gold`` answers under the ``match`` rule.

    ``exact`` is MQuAKE's rule (string equality; only surrounding whitespace is ignored).
    ``normalized`` compares :func:`normalize_answer` forms. ``contains`` accepts a normalised
    gold answer occurring as whole words inside the normalised answer; an empty answer or a
    gold answer that normalises to nothing never matches.
    """
    if match not in MATCHES:
        raise InvalidRequestError(f"Unknown answer match {match!r}; choose one of {', '.join(MATCHES)}.")
    if match == "exact":
        a = answer.strip()
        return bool(a) and any(a == g.strip() for g in gold)
    a = normalize_answer(answer)
    if not a:
        return False
    golds = [g for g in (normalize_answer(g) for g in gold) if g]
    if match == "normalized":
        return a in golds
    return any(f" {g} " in f" {a} " for g in golds)


# --------------------------------------------------------------------------- generation


def question_answerer(model: LoadedModel):
    """The first applied memory that answers multi-hop questions with its own loop, or None."""
    from lmpatch.model.context import memories_active

    if not memories_active():
        return None
    return next((g.runtime for g in model.stack.memories() if g.runtime.answers_questions), None)


def ask(
    model: LoadedModel,
    questions: Sequence[str],
    prompt: str = "multihop",
    max_new_tokens: int | None = None,
    batch_size: int = 16,
) -> tuple[list[str], list[str]]:
    """(generations, parsed answers) for ``questions`` asked after the few-shot prompt.

    When an applied memory answers questions itself (MeLLo), it does instead: its own
    prompt and loop replace the few-shot prompt.
    """
    answerer = question_answerer(model)
    if answerer is not None:
        texts, answers, _ = answerer.answer(model, questions)
        return texts, answers
    fmt = prompt_format(prompt)
    limit = fmt.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    demos = fmt.demonstrations()
    prompts = [fmt.build(demos, q) for q in questions]
    texts = generate(model, prompts, max_new_tokens=limit, batch_size=batch_size, complete=fmt.complete)
    return texts, [fmt.parse(t) for t in texts]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CaseRecord:
    """What the model said for one case's questions and how each was judged.

    ``correct`` is judged against the run's gold answers (new after editing, original
    before) under the run's match rule; ``matches_other`` against the other answer set.
    """

    case_id: int
    n_edits: int
    n_hops: int
    questions: tuple[str, ...]
    generations: tuple[str, ...]
    answers: tuple[str, ...]
    correct: tuple[bool, ...]
    matches_other: tuple[bool, ...]
    edit_seconds: float = 0.0
    answer_seconds: float = 0.0
    answered_by: str = "few-shot prompt"

    @property
    def case_correct(self) -> bool:
        """MQuAKE's case-level criterion: any one of the paraphrased questions answered."""
        return any(self.correct)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), case_correct=self.case_correct)


@dataclass(frozen=True)
class MultiHopResult:
    """Multi-hop accuracy of one run, with every generation kept for inspection.

    ``accuracy`` is case-level (MQuAKE's "multi-hop accuracy"), ``question_accuracy``
    per question; ``other_accuracy`` is the case-level rate of matching the *other* answer
    set (after editing: still giving the pre-edit answer). ``accuracy_by_match`` re-judges
    the same answers under every match rule; ``by_hops`` splits ``accuracy`` by chain length.
    """

    tag: str
    protocol: str
    prompt: str
    match: str
    gold: str
    edited: bool
    n_cases: int
    n_questions: int
    accuracy: float
    question_accuracy: float
    other_accuracy: float
    accuracy_by_match: dict[str, float]
    by_hops: dict[int, dict[str, float]]
    seconds: float
    records: tuple[CaseRecord, ...] = field(repr=False, default=())

    @property
    def seconds_per_case(self) -> float:
        return self.seconds / self.n_cases if self.n_cases else 0.0

    def to_dict(self, records: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        d["seconds_per_case"] = self.seconds_per_case
        if records:
            d["records"] = [r.to_dict() for r in self.records]
        return d


# --------------------------------------------------------------------------- the loop


def multihop_accuracy(
    model: LoadedModel,
    cases: Sequence[MQuAKECase],
    edit_fn: EditFn | None = None,
    *,
    prompt: str = "multihop",
    match: str = "exact",
    gold: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> MultiHopResult:
    """MQuAKE multi-hop accuracy of ``model`` on ``cases``, edited per case by ``edit_fn``.

    ``edit_fn(model, requests) -> Patch`` gets all of a case's edit requests, e.g.
    ``lambda m, reqs: lmpatch.edit(m, reqs, "rome")``; the patch is applied while that
    case's questions are asked and reverted after. Without ``edit_fn`` the unedited model
    is scored. ``gold`` picks the answers that count ("new" or "original"; by default new
    when editing, original when not). ``max_new_tokens`` defaults to the prompt's (12 for
    "multihop", 96 for "cot"). The model is left exactly as it was given.
    """
    if not isinstance(model, LoadedModel):
        raise InvalidRequestError(
            "multihop_accuracy() needs the object returned by lmpatch.load_model() (or lmpatch.wrap_model)."
        )
    fmt = prompt_format(prompt)
    if match not in MATCHES:
        raise InvalidRequestError(f"Unknown answer match {match!r}; choose one of {', '.join(MATCHES)}.")
    gold = gold or ("new" if edit_fn is not None else "original")
    if gold not in GOLDS:
        raise InvalidRequestError(f"gold must be 'new' or 'original', got {gold!r}.")
    cases = list(cases)
    if not cases:
        raise InvalidRequestError("No MQuAKE cases to evaluate; load some with lmpatch.data.mquake.load_mquake().")
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be at least 1, got {batch_size}.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    ask_kw = dict(prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)

    started = time.perf_counter()
    if edit_fn is None:
        records = _unedited_records(model, cases, gold, match, ask_kw, progress)
    else:
        records = _edited_records(model, cases, edit_fn, gold, match, ask_kw, progress)
    seconds = time.perf_counter() - started
    return _summarize(cases, records, model, fmt, match, gold, edit_fn is not None, max_new_tokens, seconds)


def _unedited_records(model, cases, gold, match, ask_kw, progress) -> list[CaseRecord]:
    """Unedited, every question is asked of the same weights, so they are pooled across cases.

    Pooling fills batches (3 questions per case would leave them small); chunks of about
    ``batch_size * 4 / 3`` cases let the progress bar move, at the price of one prefix
    pass per chunk (roughly a sixth of a chunk's work at the default batch size).
    """
    records: list[CaseRecord] = []
    chunk_cases = max(1, ask_kw["batch_size"] * 4 // 3)
    with progress_bar(progress, "MQuAKE multi-hop (unedited)", len(cases), "cases") as advance:
        for start in range(0, len(cases), chunk_cases):
            chunk = cases[start : start + chunk_cases]
            questions = [q for c in chunk for q in c.questions]
            texts, answers = ask(model, questions, **ask_kw)
            k = 0
            for case in chunk:
                n = len(case.questions)
                records.append(_record(case, texts[k : k + n], answers[k : k + n], gold, match))
                k += n
            advance(len(chunk))
    return records


def _edited_records(model, cases, edit_fn, gold, match, ask_kw, progress) -> list[CaseRecord]:
    records: list[CaseRecord] = []
    with progress_bar(progress, "MQuAKE multi-hop (edited)", len(cases), "cases") as advance:
        for case in cases:
            t0 = time.perf_counter()
            patch = edit_fn(model, list(case.requests))
            edit_seconds = time.perf_counter() - t0
            if not hasattr(patch, "applied"):
                raise InvalidRequestError(
                    f"edit_fn returned {type(patch).__name__} for case {case.case_id}; it must return a "
                    "Patch, e.g. lambda m, reqs: lmpatch.edit(m, reqs, 'rome')."
                )
            with patch.applied(model):
                t0 = time.perf_counter()
                answerer = question_answerer(model)
                texts, answers = ask(model, case.questions, **ask_kw)
                answer_seconds = time.perf_counter() - t0
            by = "few-shot prompt" if answerer is None else f"{answerer.type_name} loop"
            records.append(_record(case, texts, answers, gold, match, edit_seconds, answer_seconds, by))
            advance(1)
    return records


def _record(case: MQuAKECase, texts, answers, gold: str, match: str, edit_seconds: float = 0.0,
            answer_seconds: float = 0.0, answered_by: str = "few-shot prompt") -> CaseRecord:
    other = "original" if gold == "new" else "new"
    return CaseRecord(
        case_id=case.case_id,
        n_edits=len(case.requests),
        n_hops=case.n_hops,
        questions=tuple(case.questions),
        generations=tuple(texts),
        answers=tuple(answers),
        correct=tuple(answer_matches(a, case.gold(gold), match) for a in answers),
        matches_other=tuple(answer_matches(a, case.gold(other), match) for a in answers),
        edit_seconds=edit_seconds,
        answer_seconds=answer_seconds,
        answered_by=answered_by,
    )


def _summarize(cases, records, model, fmt: PromptFormat, match, gold, edited, max_new_tokens, seconds) -> MultiHopResult:
    n_cases = len(records)
    n_questions = sum(len(r.questions) for r in records)
    by_hops: dict[int, dict[str, float]] = {}
    for hops in sorted({r.n_hops for r in records}):
        group = [r for r in records if r.n_hops == hops]
        by_hops[hops] = {"n": len(group), "accuracy": sum(r.case_correct for r in group) / len(group)}
    by_match = {
        rule: sum(any(answer_matches(a, c.gold(gold), rule) for a in r.answers) for c, r in zip(cases, records))
        / n_cases
        for rule in MATCHES
    }
    limit = fmt.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    answered_by = sorted({r.answered_by for r in records})
    return MultiHopResult(
        tag=f"generation_multihop_{match}",
        protocol=_protocol(model, fmt, match, gold, edited, limit, n_cases, answered_by),
        prompt=fmt.name,
        match=match,
        gold=gold,
        edited=edited,
        n_cases=n_cases,
        n_questions=n_questions,
        accuracy=sum(r.case_correct for r in records) / n_cases,
        question_accuracy=sum(sum(r.correct) for r in records) / n_questions,
        other_accuracy=sum(any(r.matches_other) for r in records) / n_cases,
        accuracy_by_match=by_match,
        by_hops=by_hops,
        seconds=seconds,
        records=tuple(records),
    )


def _protocol(model, fmt: PromptFormat, match, gold, edited, limit, n_cases, answered_by=("few-shot prompt",)) -> str:
    rule = {
        "exact": "equals the gold answer or an alias (whitespace-stripped string equality, MQuAKE's rule)",
        "normalized": "equals the gold answer or an alias after SQuAD normalisation (casefold, no punctuation/articles)",
        "contains": "contains the gold answer or an alias as whole words, both SQuAD-normalised",
    }[match]
    edits = "each case's edits applied together by edit_fn, then reverted" if edited else "unedited model"
    answer = "first line of the generation" if fmt.answer_marker is None else f"text after '{fmt.answer_marker}' to end of line"
    if list(answered_by) != ["few-shot prompt"]:
        return (
            f"MQuAKE multi-hop accuracy over {n_cases} cases ({edits}); questions answered by "
            f"{', '.join(answered_by)} (MeLLo: the official MeLLo-prompt.txt, greedy rounds stopped at "
            f"'Retrieved fact:', top-1 retrieved edit appended, answer = text after 'Final answer: ', '' when the "
            f"loop fails); a question is correct when its answer {rule} ({gold} answers); a case is correct when "
            f"any of its questions is; chat template {'on' if model.chat else 'off'}"
        )
    return (
        f"MQuAKE multi-hop accuracy over {n_cases} cases ({edits}); official few-shot prompt {fmt.file} + "
        f"{(fmt.question_prefix + '{question}' + fmt.question_suffix)!r}; greedy, <= {limit} new tokens; "
        f"answer = {answer}; a question is correct when its answer {rule} ({gold} answers); "
        f"a case is correct when any of its questions is; chat template {'on' if model.chat else 'off'}"
    )
