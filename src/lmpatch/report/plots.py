"""PNG plots of runs: metric-vs-edits curves of batch/sequential runs, and a bar chart.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``)
instead of through ``pyplot``: no process-wide backend switch, no global figure
registry to leak figures into, and it works on machines without a display. File
names depend only on the metric keys, so rerunning a report overwrites its own plots.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lmpatch.fileio import atomic_path
from lmpatch.report.catalog import OTHER, MetricSpec, is_number, pre_post, select, spec_for
from lmpatch.report.runs import Run

BARS_FILE = "bars-main-metrics.png"
DPI = 110
# A span of more than two decades of edit counts is unreadable on a linear axis.
LOG_X_RATIO = 100.0


@dataclass(frozen=True)
class Plot:
    path: Path
    title: str


def curve_file(key: str) -> str:
    return "curve-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(i: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


def _number(value: Any) -> float | None:
    return float(value) if is_number(value) else None


# --------------------------------------------------------------------------- curves


def _restrict(specs: list[MetricSpec], metrics: Sequence[str] | None) -> list[MetricSpec]:
    """Only the specs ``metrics`` names (a before/after key names its pair); all without it."""
    if not metrics:
        return specs
    named = {spec_for(k).key for k in metrics}
    return [s for s in specs if s.key in named]


def curve_specs(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> list[MetricSpec]:
    """The metrics some run's curve has a number for, in report order."""
    keys = {k for run in runs for point in run.curve for k, v in point.metrics.items() if is_number(v)}
    specs = _restrict(select(keys), metrics)
    return [s for s in specs if any(_curve_xy(run, s)[0] for run in runs)]


def _curve_xy(run: Run, spec: MetricSpec) -> tuple[list[int], list[float], list[int], list[float]]:
    xs, ys, pre_xs, pre_ys = [], [], [], []
    for point in run.curve:
        pre, post = pre_post(point.metrics, point.metrics_pre, spec)
        if _number(post) is not None:
            xs.append(point.edits)
            ys.append(float(post))
        if _number(pre) is not None:
            pre_xs.append(point.edits)
            pre_ys.append(float(pre))
    return xs, ys, pre_xs, pre_ys


def x_scale(edits: Sequence[int]) -> str:
    """"log" when the edit counts span more than two decades, else "linear".

    A checkpoint at 0 edits has no place on a log axis, so such curves get "symlog"
    (linear up to one edit, logarithmic beyond).
    """
    positive = [e for e in edits if e > 0]
    if not positive or max(positive) / min(positive) <= LOG_X_RATIO:
        return "linear"
    return "symlog" if len(positive) < len(edits) else "log"


def plot_curves(runs: Sequence[Run], labels: Sequence[str], out_dir: Path,
                metrics: Sequence[str] | None = None) -> list[Plot]:
    """One PNG per metric: its value after each checkpoint's number of edits, a line per run.

    Dashed lines of the same colour are the unedited model's values on the same requests,
    where the run recorded them.
    """
    plots = []
    for spec in curve_specs(runs, metrics):
        fig = _figure(6.4, 4.0)
        ax = fig.add_subplot()
        all_edits: list[int] = []
        for i, (run, label) in enumerate(zip(runs, labels)):
            xs, ys, pre_xs, pre_ys = _curve_xy(run, spec)
            if not xs:
                continue
            all_edits += xs + pre_xs
            ax.plot(xs, ys, marker="o", markersize=3, color=_colour(i), label=label)
            if pre_xs:
                ax.plot(pre_xs, pre_ys, linestyle="--", color=_colour(i), alpha=0.6, label=f"{label} (unedited)")
        scale = x_scale(all_edits)
        if scale == "symlog":
            ax.set_xscale(scale, linthresh=1)
        else:
            ax.set_xscale(scale)
        if spec.fraction:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("number of edits")
        ax.set_ylabel(spec.label)
        title = f"{spec.heading} vs number of edits"
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        path = out_dir / curve_file(spec.key)
        _save(fig, path)
        plots.append(Plot(path, title))
    return plots


# --------------------------------------------------------------------------- bars


def bar_specs(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> list[MetricSpec]:
    """Metrics that fit a shared [0, 1] axis and that some run has an edited value for."""
    present = set().union(*(run.keys() for run in runs))
    chosen = []
    for spec in _restrict(select(present), metrics):
        values = [pre_post(run.post_metrics(), run.metrics_pre, spec) for run in runs]
        numbers = [float(v) for pair in values for v in pair if is_number(v)]
        if not any(is_number(post) for _, post in values):
            continue
        if spec.fraction or (spec.section == OTHER and all(0.0 <= x <= 1.0 for x in numbers)):
            chosen.append(spec)
    return chosen


def plot_bars(runs: Sequence[Run], labels: Sequence[str], out_dir: Path,
              metrics: Sequence[str] | None = None) -> Plot | None:
    """Grouped bars of edited-model values per metric, one colour per run; ticks mark pre-edit."""
    specs = bar_specs(runs, metrics)
    if not specs:
        return None
    width = 0.8 / len(runs)
    fig = _figure(max(6.4, 0.55 * len(specs) * max(1.0, len(runs) / 2) + 2.0), 4.4)
    ax = fig.add_subplot()
    pre_drawn = False
    for i, (run, label) in enumerate(zip(runs, labels)):
        offset = (i - (len(runs) - 1) / 2) * width
        xs, heights, pre_xs, pre_ys = [], [], [], []
        for j, spec in enumerate(specs):
            pre, post = pre_post(run.post_metrics(), run.metrics_pre, spec)
            if is_number(post):
                xs.append(j + offset)
                heights.append(float(post))
            if is_number(pre):
                pre_xs.append(j + offset)
                pre_ys.append(float(pre))
        ax.bar(xs, heights, width=width, color=_colour(i), label=label)
        if pre_xs:
            ax.scatter(pre_xs, pre_ys, marker="_", s=max(40.0, 400.0 * width), color="black", zorder=3,
                       label=None if pre_drawn else "unedited model")
            pre_drawn = True
    ax.set_xticks(range(len(specs)), [s.heading for s in specs], rotation=30, ha="right", fontsize="small")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("score (edited model)")
    title = "Runs compared on the main metrics"
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = out_dir / BARS_FILE
    _save(fig, path)
    return Plot(path, title)
