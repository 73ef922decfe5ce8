"""MemPrompt: a memory of user feedback added to matching prompts (Madaan et al., EMNLP 2022).

MemPrompt keeps (question pattern, feedback) pairs. When a new question is close enough
to a stored pattern, the stored feedback is given to the model along with the question;
otherwise the model runs untouched. For an edit the pattern is the edit prompt
(lower-cased and stripped, as the authors key their memory) and the feedback is the new
fact, or ``request.meta["feedback"]`` when the user wrote one ("Paris is no longer the
capital; say Lyon").

Two deviations, both forced by cloze-style edits and stated here:

* MemPrompt appends ``question | feedback``; a CounterFact prompt must be continued by
  its target, so lmpatch puts the feedback *before* the prompt (``template``);
* the authors train their matcher; here the matcher is frozen all-MiniLM-L6-v2 and only
  the similarity ``threshold`` is tuned, on ``counterfact-train`` records 5000+ (the
  tuning split; see ``benchmarks/tune_memory.py`` for the run that chose the default).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from lmpatch.errors import InvalidRequestError
from lmpatch.memory.fact_memory import FactMemory, memory_patch, statement
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.patch.parts import register_memory
from lmpatch.request import EditRequest

__all__ = ["MemPromptHparams", "MemPromptMemory", "apply_memprompt", "pattern"]

TYPE = "memprompt.memory"


@dataclass(frozen=True)
class MemPromptHparams:
    """MemPrompt's settings. ``threshold`` is the cosine similarity from which stored
    feedback is used. The authors' code uses 0.9 with a trained matcher; with frozen
    MiniLM that keeps only 11% of paraphrases. 0.625 is the value
    ``benchmarks/tune_memory.py --method memprompt`` chose on 100 stored edits of the
    tuning split (every edit prompt found, paraphrases found 0.92, neighbourhood probes
    left alone 0.96)."""

    threshold: float = 0.625
    embedder: str = "minilm"
    template: str = "Feedback: {fact}\n{query}"

    def check(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise InvalidRequestError(f"MemPrompt threshold is a cosine similarity in [-1, 1], got {self.threshold}.")
        if not self.template.endswith("{query}") or "{fact}" not in self.template:
            raise InvalidRequestError(
                "MemPrompt's template must contain {fact} and end with {query} (the target follows the prompt)."
            )


def pattern(prompt: str) -> str:
    """A prompt as the memory keys it: lower-cased, surrounding space removed."""
    return prompt.strip().lower()


def feedback(request: EditRequest) -> str:
    """What the model is told: the user's own words if given, else the new fact."""
    given = request.meta.get("feedback") if request.meta else None
    if given is not None and not isinstance(given, str):
        raise InvalidRequestError("A MemPrompt edit's meta['feedback'] must be text.")
    return given.strip() if given else statement(request)


def apply_memprompt(model: LoadedModel, requests: list[EditRequest], hp: MemPromptHparams) -> Patch:
    """One memory entry per request: the prompt's pattern and the feedback (no model computation)."""
    hp.check()
    t0 = time.perf_counter()
    entries = [{"fact": feedback(r), "pattern": pattern(r.prompt)} for r in requests]
    return memory_patch(model, requests, hp, method="memprompt", type_name=TYPE,
                        settings={"threshold": hp.threshold, "template": hp.template}, entries=entries,
                        key_texts=[e["pattern"] for e in entries], started=t0)


@register_memory
class MemPromptMemory(FactMemory):
    """Feedback of the nearest stored pattern, when its similarity reaches the threshold."""

    type_name: ClassVar[str] = TYPE

    def query_text(self, query: str) -> str:
        return pattern(query)


register(Method(
    name="memprompt", aliases=("MemPrompt",),
    summary="MemPrompt: stored feedback put before prompts that match an edited one (Madaan et al. 2022)",
    hparams=MemPromptHparams, edit=apply_memprompt, regimes=frozenset({"single", "batch", "sequential"}),
    produces=frozenset({"retrieval_memories"}),
    paper="Madaan et al., Memory-assisted prompt editing to improve GPT-3 after deployment, EMNLP 2022",
))
