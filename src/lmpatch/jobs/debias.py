"""``lp.debias`` / ``lmpatch debias``: take the gender stereotype out of how a model picks pronouns.

The job edits on prompts that stop where a pronoun about a profession comes next (DAMA's
2,409 training prompts, or the user's own ``{"prompt", "subject"}`` records) with one
of two methods:

* ``lsdm`` - the layers that carry a profession's gender located by causal tracing,
  then a least-squares edit that makes "he" and "she" equally likely there (the
  default: on SmolLM2 it halves WinoBias' gap, docs/applications.md);
* ``dama`` - the he/she contrast projected out of upper MLP outputs (the paper's
  settings; on SmolLM2 it costs coreference accuracy and barely narrows the gap).

With ``measure`` it scores the model before and after, on WinoBias (coreference
accuracy on pro- and anti-stereotypical sentences and their gap) and on DAMA's
language-model bias score over the held-apart test professions
(``patch.metrics["debias"]``). A job never changes weights itself: the caller applies,
saves or discards the patch.
"""
from __future__ import annotations

import random
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

from lmpatch.errors import InvalidRequestError
from lmpatch.eval.gender_bias import BiasPrompt, bias_scores, load_bias_prompts
from lmpatch.eval.winobias import SPLITS as WINOBIAS_SPLITS
from lmpatch.eval.winobias import winobias_scores
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest

#: the methods ``debias`` offers, the default first
DEBIAS_METHODS = ("lsdm", "dama")
#: training prompts each method edits on by default (chosen on WinoBias dev, docs/applications.md)
DEFAULT_PROMPTS = {"dama": 128, "lsdm": 64}
#: the methods read only prompt and subject; an EditRequest still needs a target
PLACEHOLDER_TARGET = "they"


def training_prompts(n: int = 0, seed: int = 0) -> list[BiasPrompt]:
    """A seeded sample of ``n`` of DAMA's training prompts (all of them for ``n`` = 0)."""
    prompts = load_bias_prompts("train")
    random.Random(seed).shuffle(prompts)
    return prompts[:n] if n > 0 else prompts


def debias_requests(prompts: Sequence[BiasPrompt | dict | EditRequest]) -> list[EditRequest]:
    """Edit requests from bias prompts, ``{"prompt", "subject"}`` records or requests."""
    out = []
    for p in prompts:
        if isinstance(p, EditRequest):
            out.append(p)
        elif isinstance(p, BiasPrompt):
            out.append(EditRequest(prompt=p.prompt, subject=p.subject, target_new=PLACEHOLDER_TARGET))
        elif isinstance(p, dict):
            if "prompt" not in p or "subject" not in p:
                raise InvalidRequestError(f"A debias record needs 'prompt' and 'subject': {p!r:.200}")
            out.append(EditRequest(prompt=p["prompt"], subject=p["subject"], target_new=PLACEHOLDER_TARGET))
        else:
            raise InvalidRequestError(f"Cannot read a debias prompt from {type(p).__name__}.")
    return out


def bias_report(model: LoadedModel, winobias_split: str = "test") -> dict:
    """WinoBias scores on a split and DAMA's bias score on its test professions."""
    return {"winobias": winobias_scores(model, winobias_split), "lm_bias": bias_scores(model, "test")}


def debias(
    model: LoadedModel,
    prompts: Sequence[BiasPrompt | dict | EditRequest] | None = None,
    method: str = "lsdm",
    n_prompts: int | None = None,
    seed: int = 0,
    measure: str | None = "test",
    stage: Callable[[str], AbstractContextManager] | None = None,
    **hparams: Any,
) -> Patch:
    """A patch that weakens the profession-to-pronoun stereotype of ``model``.

    ``prompts`` default to a seeded sample of ``n_prompts`` of DAMA's training prompts
    (None: the method's :data:`DEFAULT_PROMPTS`; 0: all 2,409).
    ``measure`` is the WinoBias split to score on before and after (``"test"``, ``"dev"``
    for tuning, or None to skip); ``hparams`` override the method's defaults. The
    caller's model is left as it was. ``stage(message)``, when given, wraps each
    measurement (the CLI shows a spinner with it; the methods draw their own bars).
    """
    from lmpatch.api import edit

    if method not in DEBIAS_METHODS:
        raise InvalidRequestError(f"Unknown debias method {method!r}; choose one of {', '.join(DEBIAS_METHODS)}.")
    if measure is not None and measure not in WINOBIAS_SPLITS:
        raise InvalidRequestError(f"Unknown WinoBias split {measure!r}; choose one of {', '.join(WINOBIAS_SPLITS)}, or none.")
    if n_prompts is None:
        n_prompts = DEFAULT_PROMPTS[method]
    if n_prompts < 0:
        raise InvalidRequestError(f"n_prompts must be >= 0, got {n_prompts}.")
    requests = debias_requests(training_prompts(n_prompts, seed) if prompts is None else prompts)
    if not requests:
        raise InvalidRequestError("debias needs at least one prompt.")
    stage = stage or (lambda message: nullcontext())
    before = None
    if measure:
        with stage(f"Measuring bias before (WinoBias {measure}, DAMA test prompts) ..."):
            before = bias_report(model, measure)
    t0 = time.perf_counter()
    patch = edit(model, requests, method, **hparams)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"method": method, "n_prompts": len(requests), "edit_seconds": round(seconds, 2)}
    if before is not None:
        with patch.applied(model), stage("Measuring bias after ..."):
            after = bias_report(model, measure)
        metrics.update({"winobias_split": measure, "before": before, "after": after})
    patch.metrics["debias"] = metrics
    return patch
