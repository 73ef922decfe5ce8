"""SERAC: a scope classifier plus a counterfactual model (Mitchell et al., ICML 2022).

SERAC stores edits as text and leaves the base model untouched. For each prompt a
scope classifier finds the stored edit most likely to concern it; if its probability
reaches ``threshold`` (0.5, the paper's), the prompt goes to a *counterfactual model*
that reads the edit with the prompt, otherwise the base model answers as if nothing
had been edited - which is what keeps locality high.

The two parts here, and how they differ from the paper:

* **scope classifier** - frozen all-MiniLM-L6-v2 with a trained head
  (:mod:`lmpatch.methods.scope`), trained on ``counterfact-train`` on this CPU in about
  three minutes and cached per base model (``lmpatch train serac``). The paper
  fine-tunes DistilBERT, which is not available offline.
* **counterfactual model** - the base model itself, conditioned on the retrieved edit.
  The paper trains a separate smaller model (GPT-2 for GPT-2 XL) on (edit, in-scope
  input, new answer) examples; nothing smaller than SmolLM2-135M is available offline
  and a fine-tuned copy would cost hours of CPU. So the training examples are shown
  instead of trained on: before an in-scope prompt come the ``demonstrations`` (32)
  *copy* and *update* examples from ``counterfact-train`` nearest to the edit (the pool
  IKE uses, :mod:`lmpatch.methods.demonstrations`, without its *retain* examples - an
  in-scope prompt is by definition one the edit applies to), then the edit stated once
  as its own example, then "New Fact: <edit>\nPrompt: <prompt>".

  Chosen on the tuning split with ``benchmarks/tune_serac.py`` (counterfact-train
  5000-5099, one edit at a time, teacher-forced token accuracy of the new target after
  the edit prompt / after its paraphrases): the edit alone, stated once as its own
  example, gave 0.92 / 0.37; the 16 nearest copy/update demonstrations 0.92 / 0.72; 32
  (chosen) 0.94 / 0.85, at about 1,300 prompt tokens instead of 700. Two exploratory
  runs on 40 of those records, not in the script: IKE's pool *with* its retain examples
  gave 0.85 / 0.73 at 16, and fixed (not retrieved) demonstrations at best 0.95 / 0.56.
  The retrieved ones teach the relation; the retain ones teach the model to keep its
  old answer. A 135M model still sometimes answers from memory right after reading the
  edit ("The mother tongue of Raymond Triboulet is Dutch." and then " French"), which
  is what holds reliability near 0.92-0.94.

A patch stores the edit statements, their MiniLM embeddings and the head's tensors, so
it is self-contained: applied anywhere, it needs neither the training data nor the
cache. All applied SERAC patches with the same head and settings form one memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from lmpatch.errors import InvalidRequestError, PatchError
from lmpatch.memory.fact_memory import FactMemory, memory_patch, statement
from lmpatch.methods.demonstrations import nearest_demonstrations, pool_one_off
from lmpatch.methods.registry import Method, OneOff, register
from lmpatch.methods.scope import (
    HEAD_ROLES,
    ScopeConfig,
    ScopeHead,
    head_id,
    load_scope_head,
    scope_dir,
    train_scope_head,
)
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.patch.parts import RetrievalMemory, register_memory
from lmpatch.request import EditRequest

__all__ = ["SeracHparams", "SeracMemory", "apply_serac", "scope_head"]

TYPE = "serac.memory"


@dataclass(frozen=True)
class SeracHparams:
    """SERAC's settings. ``classifier="cosine"`` skips training and uses raw MiniLM
    cosine with ``threshold`` as its cut (for quick runs and tiny test models); the
    trained classifier's probability cut is the paper's 0.5."""

    threshold: float = 0.5
    classifier: str = "trained"
    template: str = "New Fact: {fact}\nPrompt: {query}"
    demonstrations: int = 32
    pool_records: int = 5000
    embedder: str = "minilm"
    train_records: int = 5000
    train_epochs: int = 30
    train_lr: float = 3e-4
    seed: int = 0

    def check(self) -> None:
        if self.classifier not in ("trained", "cosine"):
            raise InvalidRequestError(f"SERAC classifier must be 'trained' or 'cosine', got {self.classifier!r}.")
        if self.demonstrations < 0:
            raise InvalidRequestError(f"SERAC demonstrations must be 0 or more, got {self.demonstrations}.")
        if not -1.0 <= self.threshold <= 1.0:
            raise InvalidRequestError(f"SERAC threshold must lie in [-1, 1], got {self.threshold}.")
        if not self.template.endswith("{query}") or "{fact}" not in self.template:
            raise InvalidRequestError(
                "SERAC's template must contain {fact} and end with {query} (the target follows the prompt)."
            )

    def scope_config(self) -> ScopeConfig:
        return ScopeConfig(embedder=self.embedder, records=self.train_records, epochs=self.train_epochs,
                           lr=self.train_lr, seed=self.seed)


def scope_head(model: LoadedModel, hp: SeracHparams, show: bool = False) -> tuple[ScopeHead, dict]:
    """The trained scope classifier for ``model`` (trained now if not cached) and its report."""
    cached = load_scope_head(model.fingerprint, hp.scope_config())
    if cached is not None:
        return cached
    return train_scope_head(model.fingerprint, hp.scope_config(), show=show)


def _one_offs(model: LoadedModel, hp: SeracHparams) -> list[OneOff]:
    jobs = pool_one_off(hp.embedder, hp.pool_records) if hp.demonstrations else []
    if hp.classifier != "trained":
        return jobs
    config = hp.scope_config()
    folder = scope_dir(model.fingerprint, config)
    return jobs + [OneOff(
        what=f"train SERAC's scope classifier on {config.data} (records 0-{config.records - 1})",
        where=folder,
        done=lambda: load_scope_head(model.fingerprint, config) is not None,
        run=lambda show: train_scope_head(model.fingerprint, config, show=show),
        draws_progress=True,
    )]


def train_serac(model: LoadedModel, hp: SeracHparams, show: bool = True) -> dict:
    """``lmpatch train serac``: (re)train the scope classifier and return its report."""
    hp.check()
    if hp.classifier != "trained":
        raise InvalidRequestError("SERAC with classifier='cosine' has nothing to train.")
    _, report = train_scope_head(model.fingerprint, hp.scope_config(), show=show)
    return {**report, "cached_in": str(scope_dir(model.fingerprint, hp.scope_config()))}


def apply_serac(model: LoadedModel, requests: list[EditRequest], hp: SeracHparams) -> Patch:
    """One memory entry per request (its fact and nearest demonstrations); the trained head travels with the patch."""
    hp.check()
    t0 = time.perf_counter()
    settings = {"threshold": hp.threshold, "template": hp.template, "classifier": hp.classifier}
    state: dict[str, torch.Tensor] = {}
    report = None
    if hp.classifier == "trained":
        head, report = scope_head(model, hp)
        state = head.state()
        settings["head_id"] = head_id(state)
    entries = [
        {"fact": fact, "demos": nearest_demonstrations(fact, hp.demonstrations, hp.pool_records, hp.embedder,
                                                       kinds=("copy", "update"))}
        for fact in map(statement, requests)
    ]
    return memory_patch(model, requests, hp, method="serac", type_name=TYPE, settings=settings, entries=entries,
                        key_texts=[e["fact"] for e in entries], started=t0, state=state,
                        metrics={} if report is None else {"classifier": report.get("validation", {})})


@register_memory
class SeracMemory(FactMemory):
    """Nearest edit by the classifier's projection; in scope when its probability reaches the threshold."""

    type_name: ClassVar[str] = TYPE

    def __init__(self, settings: dict) -> None:
        super().__init__(settings)
        self.head: ScopeHead | None = None
        self._projected = torch.empty(0, 0)

    def extend(self, member: RetrievalMemory) -> None:
        if self.settings.get("classifier") == "trained":
            missing = [r for r in HEAD_ROLES if r not in member.state]
            if missing:
                raise PatchError(f"This SERAC memory lacks its scope classifier ({', '.join(missing)}).")
            if self.head is None:
                self.head = ScopeHead.from_state(member.state)
        super().extend(member)
        if self.head is not None:
            with torch.no_grad():
                new = self.head.project(member.state["keys"])
            self._projected = new if self._projected.numel() == 0 else torch.cat([self._projected, new])

    def nearest(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(in-scope probability of the likeliest edit [m], its index [m]); raw cosine without a head."""
        if self.head is None:
            return super().nearest(queries)
        with torch.no_grad():
            sims = self.head.project(self.embedder.embed(list(queries))) @ self._projected.T
            probs = torch.sigmoid(self.head.scale * sims + self.head.offset)
        return probs.max(dim=1)


register(Method(
    name="serac", aliases=("SERAC",),
    summary="SERAC: a trained scope classifier sends in-scope prompts to a counterfactual model (Mitchell et al. 2022)",
    hparams=SeracHparams, edit=apply_serac, regimes=frozenset({"single", "batch", "sequential"}),
    produces=frozenset({"retrieval_memories"}), prepare=_one_offs,
    paper="Mitchell et al., Memory-Based Model Editing at Scale, ICML 2022",
    train=train_serac,
))
