"""Memory-based editors next to weight editors on the same records, teacher-forced and in the wild.

The first ``--n`` records of ``counterfact-edit`` (never used for tuning; every default of
these methods was chosen on ``counterfact-train``). Each method runs in the regime the
issue asks for: IKE and the weight editors one edit at a time from the unedited model
(single), SERAC and MemPrompt sequentially (all edits stay applied; the memory holds
``n`` facts when the last checkpoint is scored). Metrics: EasyEdit's teacher-forced
reliability / generalization / locality, ROME's probability comparisons (efficacy,
paraphrase, neighbourhood) and the generation-based ``_wild`` metrics; the last column
is how far the generated answers fall below the teacher-forced reliability.

Runs resume from ``--out/<method>``; one-off work (statistics, SERAC's classifier, IKE's
pool) runs before timing starts.

    OMP_NUM_THREADS=1 python benchmarks/memory_editors.py --method serac --method memprompt
    python benchmarks/memory_editors.py --method ike --set ike.k=4 --n 100
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.cli.options import parse_sets
from lmpatch.cli.warmup import prepare
from lmpatch.data import load_dataset
from lmpatch.eval.runner import run_single
from lmpatch.eval.sequential import run_sequential
from lmpatch.methods.hparams import with_overrides
from lmpatch.methods.registry import get_method

SEQUENTIAL = {"serac", "memprompt"}
DEFAULT_METHODS = ("serac", "memprompt", "ike", "rome", "memit", "alphaedit")
METRICS = ("reliability", "generalization", "locality", "counterfact", "wild")
COLUMNS = (
    ("efficacy_score", "eff"), ("paraphrase_score", "para"), ("neighborhood_score", "neigh"),
    ("reliability", "rel"), ("generalization", "gen"), ("locality", "loc"),
    ("reliability_wild", "rel wild"), ("generalization_wild", "gen wild"), ("locality_wild", "loc wild"),
)


def run(model, method: str, overrides: dict, requests, out: Path) -> dict:
    info = get_method(method)
    hp = with_overrides(info.hparams, overrides)
    prepare(model, info, hp, show=True)

    def edit_fn(m, r):
        return lmpatch.edit(m, r, info.name, hp)

    if method in SEQUENTIAL:
        return run_sequential(model, requests, edit_fn, out / method, checkpoints=[len(requests)], method=method,
                              metrics=METRICS)
    return run_single(model, requests, edit_fn, out / method, method=method, metrics=METRICS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help=f"repeatable; default {', '.join(DEFAULT_METHODS)}")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data", default="counterfact-edit")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("runs/memory-editors"))
    args = ap.parse_args()
    console = Console()
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model()
    requests = load_dataset(args.data, n=args.n)
    table = Table(title=f"{model.name}: first {len(requests)} {args.data} records")
    table.add_column("method (regime)")
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("rel - rel wild", justify="right")
    table.add_column("edit s (median)", justify="right")
    pre = None
    for method in args.method or DEFAULT_METHODS:
        mine = [s.split(".", 1)[1] for s in args.set if s.split(".", 1)[0] == method]
        overrides = parse_sets(mine, get_method(method).hparams)
        summary = run(model, method, overrides, requests, args.out)
        post, pre = summary["metrics"], pre or summary.get("metrics_pre", {})
        gap = _gap(post)
        seconds = summary.get("edit_seconds", {}).get("median")
        regime = "sequential" if method in SEQUENTIAL else "single"
        label = method + ("" if not overrides else " " + ",".join(f"{k}={v}" for k, v in overrides.items()))
        table.add_row(f"{label} ({regime})", *[_fmt(post.get(k)) for k, _ in COLUMNS], _fmt(gap),
                      "-" if seconds is None else f"{seconds:.2f}")
    if pre:
        table.add_row("unedited", *[_fmt(pre.get(k)) for k, _ in COLUMNS], "-", "-")
    console.print(table)


def _gap(metrics: dict) -> float | None:
    a, b = metrics.get("reliability"), metrics.get("reliability_wild")
    return None if a is None or b is None else a - b


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
