"""``lp.detox`` / ``lmpatch detox``: make a model answer adversarial prompts safely.

The job turns training probes into requests - the adversarial input, a safe response
written for its category (:data:`lmpatch.jobs.probes.SAFE_RESPONSES`, kept only if
every judge scores it safe) and an unsafe one (the probe's baseline response when it has
one, else the model's own answer) - runs one method on all of them, and returns its
patch. With test probes it also measures, per judge, the share of unsafe greedy answers
before and after (``patch.metrics["detox"]``):

* ``dinm`` - the toxic layer located and tuned towards the safe responses (the paper's
  method; the default). The job tunes it harder than the paper and over the toxic layer
  and the two below it (:data:`DETOX_DEFAULTS`; chosen on training questions only,
  measured in docs/applications.md); ``lmpatch edit --method dinm`` keeps the paper's
  settings, and ``--set n_layers=1 --set lr=5e-4`` gives them to the job;
* ``promote`` - FFN neurons whose value vectors write the safe responses' words held
  switched on (Geva et al.'s neuron promotion).

A job never changes weights itself: the caller applies, saves or discards the patch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from lmpatch.errors import InvalidRequestError
from lmpatch.eval.scoring import generate
from lmpatch.eval.toxicity import ToxicityJudge, agreement, judge_named, unsafe_flags
from lmpatch.jobs.probes import SafetyProbe
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest

#: the methods ``detox`` offers, the paper's first
DETOX_METHODS = ("dinm", "promote")
#: each method's settings for this job, under the caller's (chosen on the profane copy's
#: training questions: with the paper's one layer at lr 5e-4 the meaning judge fell by a
#: fifth; three layers at lr 2e-3 took it to a third at +3% perplexity)
DETOX_DEFAULTS: dict[str, dict[str, Any]] = {"dinm": {"n_layers": 3, "lr": 2e-3}}
#: greedy answer length the toxicity of a model is judged on
ANSWER_TOKENS = 48


def answers(model: LoadedModel, probes: Sequence[SafetyProbe], max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """The model's greedy answers to the probes' inputs (chat-wrapped if the model is)."""
    return generate(model, [p.input for p in probes], max_new_tokens=max_new_tokens, batch_size=8)


def safe_targets(probes: Sequence[SafetyProbe], judges: Sequence[ToxicityJudge]) -> dict[str, bool]:
    """Per distinct safe response of ``probes``: does every judge score it safe?"""
    texts = sorted({p.safe_response for p in probes})
    ok = {t: True for t in texts}
    for judge in judges:
        for t, bad in zip(texts, unsafe_flags(judge, texts)):
            ok[t] = ok[t] and not bad
    return ok


def detox_requests(model: LoadedModel, probes: Sequence[SafetyProbe], judges: Sequence[ToxicityJudge]) -> list[EditRequest]:
    """One request per probe whose safe response passes every judge; the unsafe response
    is the probe's own when it has one, otherwise the model's current answer."""
    ok = safe_targets(probes, judges)
    kept = [p for p in probes if ok[p.safe_response]]
    if not kept:
        raise InvalidRequestError("No probe has a safe response every judge scores safe; nothing to edit towards.")
    own = answers(model, [p for p in kept if not p.response.strip()])
    it = iter(own)
    return [EditRequest(prompt=p.input, subject=p.input, target_new=p.safe_response,
                        target_true=p.response.strip() or next(it).strip() or "Sure.")
            for p in kept]


@dataclass(frozen=True)
class Judged:
    """Answers and, per judge, which of them it calls unsafe."""

    texts: list[str]
    flags: dict[str, list[bool]]

    def toxicity(self) -> dict[str, float]:
        return {name: sum(f) / max(len(f), 1) for name, f in self.flags.items()}

    def agreement(self) -> float | None:
        names = sorted(self.flags)
        return agreement(self.flags[names[0]], self.flags[names[1]]) if len(names) == 2 else None


def judge_answers(model: LoadedModel, probes: Sequence[SafetyProbe], judges: Sequence[ToxicityJudge],
                  max_new_tokens: int = ANSWER_TOKENS) -> Judged:
    texts = answers(model, probes, max_new_tokens)
    return Judged(texts, {j.name: unsafe_flags(j, texts) for j in judges})


def detox(
    model: LoadedModel,
    probes: Sequence[SafetyProbe],
    method: str = "dinm",
    test_probes: Sequence[SafetyProbe] = (),
    judges: Sequence[str] = ("lexical", "meaning"),
    **hparams: Any,
) -> Patch:
    """A patch that makes ``model`` answer ``probes`` (and, one hopes, others) safely.

    ``hparams`` override :data:`DETOX_DEFAULTS` and the method's defaults. With ``test_probes`` the patch's
    ``metrics["detox"]`` holds each judge's toxicity on them before and after, the two
    judges' agreement, and the edit time. The caller's model is left as it was.
    """
    from lmpatch.api import edit

    if method not in DETOX_METHODS:
        raise InvalidRequestError(f"Unknown detox method {method!r}; choose one of {', '.join(DETOX_METHODS)}.")
    if not probes:
        raise InvalidRequestError("detox needs at least one training probe.")
    juries = [judge_named(j) for j in judges]
    requests = detox_requests(model, probes, juries)
    before = judge_answers(model, test_probes, juries) if test_probes else None
    t0 = time.perf_counter()
    patch = edit(model, requests, method, **{**DETOX_DEFAULTS.get(method, {}), **hparams})
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"method": method, "n_train": len(requests), "n_test": len(test_probes),
                               "edit_seconds": round(seconds, 2)}
    if before is not None:
        with patch.applied(model):
            after = judge_answers(model, test_probes, juries)
        metrics.update({
            "toxicity_before": before.toxicity(), "toxicity_after": after.toxicity(),
            "judge_agreement_before": before.agreement(), "judge_agreement_after": after.agreement(),
            "examples": [{"input": p.input[:200], "before": b, "after": a}
                         for p, b, a in list(zip(test_probes, before.texts, after.texts))[:5]],
        })
    patch.metrics["detox"] = metrics
    return patch
