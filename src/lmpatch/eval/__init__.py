"""Measuring edits: teacher-forced scoring, protocol-tagged metrics, experiment runners."""
from lmpatch.eval.metrics import (
    DEFAULT_METRICS,
    PROTOCOLS,
    EvalReport,
    Metric,
    evaluate,
    evaluate_request,
    summarize,
)
from lmpatch.eval.runner import run_single
from lmpatch.eval.scoring import TargetScore, generate, score_targets

__all__ = [
    "DEFAULT_METRICS",
    "PROTOCOLS",
    "EvalReport",
    "Metric",
    "TargetScore",
    "evaluate",
    "evaluate_request",
    "generate",
    "run_single",
    "score_targets",
    "summarize",
]
