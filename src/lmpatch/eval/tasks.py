"""Model-level side effects: scores of the whole model, not of one edit request.

A downstream task (PIQA) or the perplexity of held-out text says whether an edit damaged
the model as a whole. Such a score does not belong to any request, so runners measure it
before editing and after, and report ``<task>_before`` / ``<task>_after`` next to the
per-request metrics. Each task is a named function of the model, tagged with its
protocol, so the runners need not know what PIQA or perplexity are.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Callable

from lmpatch.errors import LmpatchError
from lmpatch.model.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One model-level score: ``fn(model)`` returns a float measured by ``protocol``."""

    name: str
    protocol: str
    fn: Callable[[LoadedModel], float]
    higher_is_better: bool = True


Tasks = dict[str, Task]

TASK_NAMES = ("piqa", "perplexity")


@dataclass(frozen=True)
class TaskConfig:
    """How much of each task to run: enough to see damage, small enough to repeat."""

    piqa_n: int | None = 200          # PIQA validation items (first n; None = all 1,838)
    perplexity_tokens: int = 20_000   # WikiText-2 test tokens scored
    batch_size: int = 16


def build_tasks(names: tuple[str, ...] | list[str], config: TaskConfig = TaskConfig()) -> Tasks:
    """The named tasks (``piqa``, ``perplexity``) as :class:`Task` objects."""
    tasks: Tasks = {}
    for name in names:
        if name == "piqa":
            from lmpatch.eval.piqa import piqa_accuracy

            def piqa(model: LoadedModel) -> float:
                return piqa_accuracy(model, n=config.piqa_n, batch_size=config.batch_size, progress=False).value

            tasks[name] = Task("piqa", "piqa_length_normalised_loglik_accuracy", piqa)
        elif name == "perplexity":
            from lmpatch.eval.perplexity import DEFAULT_WINDOW, perplexity

            def ppl(model: LoadedModel) -> float:
                # A model with a shorter context than the default window (small test models)
                # is scored with windows of its full context instead of being refused.
                window = min(DEFAULT_WINDOW, model.context_length or DEFAULT_WINDOW)
                return perplexity(model, max_tokens=config.perplexity_tokens, window=window, progress=False).value

            tasks[name] = Task("perplexity", "wikitext2_test_perplexity", ppl, higher_is_better=False)
        else:
            raise LmpatchError(f"Unknown side-effect task {name!r}; choose from {', '.join(TASK_NAMES)}.")
    return tasks


def measure_tasks(model: LoadedModel, tasks: Tasks) -> dict[str, float]:
    """Every task's score on ``model`` as it is now (edits applied or not)."""
    scores = {}
    for name, task in tasks.items():
        scores[name] = float(task.fn(model))
        log.info("%s = %.4f", name, scores[name])
    return scores


def task_metrics(state: dict) -> dict[str, float | None]:
    """``<task>_before`` and ``<task>_after`` (the mean over the measured updates)."""
    out: dict[str, float | None] = {}
    before = state.get("before") or {}
    after = state.get("after") or []
    for name, value in before.items():
        out[f"{name}_before"] = value
        vals = [a[name] for a in after if name in a]
        out[f"{name}_after"] = statistics.fmean(vals) if vals else None
    return out


def task_protocols(tasks: Tasks | None) -> dict[str, str]:
    """The protocol of every ``<task>_before`` / ``<task>_after`` key."""
    out: dict[str, str] = {}
    for name, task in (tasks or {}).items():
        out[f"{name}_before"] = out[f"{name}_after"] = task.protocol
    return out
