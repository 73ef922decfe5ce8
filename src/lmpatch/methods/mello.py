"""MeLLo: multi-hop questions answered by decomposition and retrieval over edited facts
(Zhong et al., "MQuAKE", EMNLP 2023).

The model is prompted (the official ``MeLLo-prompt.txt``, shipped with MQuAKE) to split
a multi-hop question into subquestions. For each one it writes a tentative answer; the
edited fact nearest to the subquestion is then put after it ("Retrieved fact: ..."),
and the model, following the demonstrations, decides whether the fact contradicts its
answer and continues from the right intermediate answer, until it writes
"Final answer: ...". The edits never touch the weights: they are only the facts
retrieved.

The loop, as in the authors' notebook: at most ``max_iterations`` rounds; each is one
greedy generation of at most ``max_new_tokens`` that stops at "Retrieved fact:" (or where
a new "Question:" would begin, see :data:`NEXT_EXAMPLE`); if its
last line starts with "Final answer: " that is the answer; otherwise the line before
must start with "Subquestion: " (else the question fails - counted, not hidden), the
top-1 fact for that subquestion is appended and the next round continues.

Deviations, stated: the retriever is all-MiniLM-L6-v2 (the paper's Contriever is not
available offline); the questions go through the model as lmpatch formats any prompt
(chat template when ``--chat``), and other applied patches - ROME weight edits, say -
stay applied while MeLLo generates, so MeLLo stacks with them. Outside multi-hop
questions (CounterFact prompts, the ``_wild`` metrics) MeLLo reduces to one hop: a
prompt whose nearest fact reaches ``fact_threshold`` gets "Retrieved fact: {fact}." on
the line before it, with no contradiction check.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Sequence

from lmpatch.errors import InvalidRequestError
from lmpatch.memory.fact_memory import FactMemory, memory_patch, statement
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.patch.parts import register_memory
from lmpatch.request import EditRequest

__all__ = ["MelloHparams", "MelloMemory", "apply_mello", "mello_answer"]

TYPE = "mello.memory"
STOP = "Retrieved fact:"
#: Where the next demonstration would begin. The authors' API model stopped after its final
#: answer; SmolLM2 writes "Final answer: X" and goes on to invent a new "Question:", which
#: would hide the answer from the loop (5 of 30 traces on 10 MQuAKE cases), so a round also
#: ends there.
NEXT_EXAMPLE = "\n\nQuestion:"
FINAL = "Final answer: "
SUBQUESTION = "Subquestion: "


@dataclass(frozen=True)
class MelloHparams:
    """MeLLo's settings: the authors' loop bounds (4 rounds, 256 tokens each, top-1 fact).
    ``fact_threshold`` gates the one-hop use outside multi-hop questions: 0.6 is where raw
    MiniLM cosine between an edit statement and prompts kept paraphrases 0.83 and
    neighbourhood probes 0.045 in scope on 200 tuning edits (counterfact-train 5000+)."""

    max_iterations: int = 4
    max_new_tokens: int = 256
    fact_threshold: float = 0.6
    embedder: str = "minilm"
    prompt_file: str = "MeLLo-prompt.txt"
    template: str = "Retrieved fact: {fact}.\n{query}"

    def check(self) -> None:
        if self.max_iterations < 1 or self.max_new_tokens < 1:
            raise InvalidRequestError("MeLLo max_iterations and max_new_tokens must be at least 1.")
        if not self.template.endswith("{query}") or "{fact}" not in self.template:
            raise InvalidRequestError("MeLLo's template must contain {fact} and end with {query}.")


@lru_cache(maxsize=2)
def task_prompt(name: str) -> str:
    from lmpatch.data.mquake import prompt_path

    return prompt_path(name).read_text(encoding="utf-8").rstrip("\n")


def apply_mello(model: LoadedModel, requests: list[EditRequest], hp: MelloHparams) -> Patch:
    """One memory entry per edited fact, found by its MiniLM embedding (no model computation)."""
    hp.check()
    task_prompt(hp.prompt_file)  # a missing prompt file fails now, not at the first question
    t0 = time.perf_counter()
    entries = [{"fact": statement(r)} for r in requests]
    settings = {"threshold": hp.fact_threshold, "template": hp.template, "max_iterations": hp.max_iterations,
                "max_new_tokens": hp.max_new_tokens, "prompt_file": hp.prompt_file}
    return memory_patch(model, requests, hp, method="mello", type_name=TYPE, settings=settings, entries=entries,
                        key_texts=[e["fact"] for e in entries], started=t0)


@dataclass
class _Trace:
    prompt: str
    answer: str | None = None
    failed: str | None = None
    rounds: int = 0
    facts: list[str] | None = None


def mello_answer(model: LoadedModel, memory: "MelloMemory", questions: Sequence[str]) -> tuple[list[str], list[str], list[dict]]:
    """(traces, answers, details) for ``questions``: the MeLLo loop, all questions batched per round.

    A failed question has the answer "" and says why in its details (``no_subquestion``:
    the model wrote neither a subquestion nor a final answer; ``rounds``: it ran out of
    rounds). Memories are paused while the model generates; weight patches are not.
    """
    from lmpatch.eval.scoring import generate
    from lmpatch.model.context import memories_paused

    s = memory.settings
    head = task_prompt(s["prompt_file"])
    traces = [_Trace(prompt=f"{head}\n\nQuestion: {q}\n", facts=[]) for q in questions]
    for _ in range(int(s["max_iterations"])):
        active = [t for t in traces if t.answer is None and t.failed is None]
        if not active:
            break
        with memories_paused():
            gens = generate(model, [t.prompt for t in active], max_new_tokens=int(s["max_new_tokens"]),
                            stop_texts=(STOP, NEXT_EXAMPLE))
        asked: list[tuple[_Trace, str, str]] = []
        for t, gen in zip(active, gens):
            t.rounds += 1
            lines = gen.strip().split("\n")
            if lines[-1].startswith(FINAL):
                t.answer = lines[-1][len(FINAL):].strip()
                t.prompt += gen
                continue
            if len(lines) < 2 or not lines[-2].startswith(SUBQUESTION):
                t.failed = "no_subquestion"
                t.prompt += gen
                continue
            asked.append((t, gen, lines[-2][len(SUBQUESTION):].strip()))
        if asked:
            _, idx = memory.nearest([sub for _, _, sub in asked])
            for (t, gen, _), j in zip(asked, idx.tolist()):
                fact = memory.entries[int(j)]["fact"]
                t.facts.append(fact)
                t.prompt += gen + f"{STOP} {fact}."
    for t in traces:
        if t.answer is None and t.failed is None:
            t.failed = "rounds"
    details = [{"rounds": t.rounds, "failed": t.failed, "facts": t.facts} for t in traces]
    return [t.prompt[len(head):] for t in traces], [t.answer or "" for t in traces], details


@register_memory
class MelloMemory(FactMemory):
    """Edited facts for MeLLo's loop (:func:`mello_answer`); one-hop rewrite elsewhere."""

    type_name: ClassVar[str] = TYPE
    answers_questions: ClassVar[bool] = True

    def answer(self, model: LoadedModel, questions: Sequence[str]) -> tuple[list[str], list[str], list[dict]]:
        return mello_answer(model, self, questions)


register(Method(
    name="mello", aliases=("MeLLo",),
    summary="MeLLo: multi-hop questions decomposed by the model, each subanswer checked against retrieved edits (Zhong et al. 2023)",
    hparams=MelloHparams, edit=apply_mello, regimes=frozenset({"single", "batch", "sequential"}),
    produces=frozenset({"retrieval_memories"}),
    paper="Zhong et al., MQuAKE: Assessing Knowledge Editing in Language Models via Multi-Hop Questions, EMNLP 2023",
))
