"""IKE: in-context knowledge editing (Zheng et al., EMNLP 2023). No weight changes at all.

The edit is shown to the model in its prompt, after ``k`` demonstrations that teach it
what to do with a "New Fact": repeat it (*copy*), answer a rephrased question with it
(*update*), and answer an unrelated question as before (*retain*). The demonstrations
are the ``k`` most similar, by sentence embedding, to the new fact, out of a pool built
from ``counterfact-train`` records (:mod:`lmpatch.methods.demonstrations`), ordered from
least to most similar so the closest example sits next to the edit. The edit's own copy
demonstration comes last, as in the authors' evaluation code.

What lmpatch adds: the demonstrations are chosen when the edit is made and stored in
the patch, so an applied IKE patch needs neither the pool nor the retriever's pool
cache, and the same patch gives the same prompts everywhere. Several applied IKE edits
(the sequential regime, which the paper does not cover) share one memory: a prompt gets
the context of the one edit whose fact is nearest to it. IKE has no scope test - every
prompt gets that context - which is why its locality is low in the paper too.

Cost: the prompt grows by ``k`` demonstrations (about 40 tokens each with CounterFact),
so scoring an IKE-edited model reads ~1,300 tokens per prompt at ``k = 32``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from lmpatch.errors import InvalidRequestError
from lmpatch.memory.fact_memory import FactMemory, memory_patch, statement
from lmpatch.methods.demonstrations import nearest_demonstrations, pool_one_off
from lmpatch.methods.registry import Method, OneOff, register
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.patch.parts import register_memory
from lmpatch.request import EditRequest

__all__ = ["IkeHparams", "IkeMemory", "apply_ike", "choose_demonstrations"]

TYPE = "ike.memory"


@dataclass(frozen=True)
class IkeHparams:
    """IKE's settings. ``k = 32`` demonstrations is the paper's; the pool is built from
    ``counterfact-train`` (its records up to ``pool_records``) and the retriever is
    all-MiniLM-L6-v2, the paper's sentence encoder.

    On 20 tuning records (counterfact-train 5000+; efficacy / paraphrase / neighbourhood
    scores) k = 4, 16 and 32 gave 0.90 / 0.90 / 0.25, 0.90 / 0.95 / 0.15 and 0.90 / 1.00 /
    0.20: no k is clearly better, so the paper's 32 stays. With k = 0 (the fact alone,
    no demonstrations) SmolLM2 scored 1.00 / 0.95 / 0.30: at 135M parameters the
    demonstrations teach less than they cost in context."""

    k: int = 32
    pool_records: int = 5000
    embedder: str = "minilm"
    template: str = "New Fact: {fact}\nPrompt: {query}"

    def check(self) -> None:
        if self.k < 0:
            raise InvalidRequestError(f"IKE k (demonstrations per edit) must be 0 or more, got {self.k}.")
        if self.pool_records < 1:
            raise InvalidRequestError(f"IKE pool_records must be at least 1, got {self.pool_records}.")
        if not self.template.endswith("{query}") or "{fact}" not in self.template:
            raise InvalidRequestError(
                "IKE's template must contain {fact} and end with {query} (the target follows the prompt)."
            )


def _pool_one_off(model: LoadedModel, hp: IkeHparams) -> list[OneOff]:
    return pool_one_off(hp.embedder, hp.pool_records)


def choose_demonstrations(fact: str, hp: IkeHparams) -> list[str]:
    """The ``k`` pool demonstrations nearest to ``fact`` (least similar first), then the fact's copy."""
    return nearest_demonstrations(fact, hp.k, hp.pool_records, hp.embedder)


def apply_ike(model: LoadedModel, requests: list[EditRequest], hp: IkeHparams) -> Patch:
    """One memory entry per request: its fact and its demonstrations (no model computation)."""
    hp.check()
    t0 = time.perf_counter()
    entries = [{"fact": statement(r), "demos": choose_demonstrations(statement(r), hp)} for r in requests]
    return memory_patch(model, requests, hp, method="ike", type_name=TYPE, settings={"k": hp.k, "template": hp.template},
                        entries=entries, key_texts=[e["fact"] for e in entries], started=t0)


@register_memory
class IkeMemory(FactMemory):
    """Every prompt gets the demonstrations and fact of the nearest applied IKE edit."""

    type_name: ClassVar[str] = TYPE


register(Method(
    name="ike", aliases=("IKE",),
    summary="IKE: the edit and k retrieved copy/update/retain demonstrations put in the prompt (Zheng et al. 2023)",
    hparams=IkeHparams, edit=apply_ike, regimes=frozenset({"single", "batch", "sequential"}),
    produces=frozenset({"retrieval_memories"}), prepare=_pool_one_off,
    paper="Zheng et al., Can We Edit Factual Knowledge by In-Context Learning?, EMNLP 2023",
))
