"""MEND and KE, trained on this CPU, next to ROME on the same records: quality and edit time.

The first ``--n`` records of ``counterfact-edit`` and of the zsRE eval split (neither is
ever used in training: the editors train on ``counterfact-train`` 0-4999 and
``zsre-train`` 0-899). Each method runs in the single regime (every edit from the
unedited model) and, with ``--batch``, once more with all ``n`` requests in ONE call
(the paper's batched edit; one patch holds them all). Metrics: ROME's probability
comparisons (efficacy, paraphrase, neighbourhood) on CounterFact, EasyEdit's
teacher-forced reliability / generalization / locality on both, and the generation-based
``_wild`` metrics. The edit time is the median over the single-regime edits; one-off
work (ROME's statistics) runs before timing starts, and an editor must have been
trained (``lmpatch train mend``) or shipped.

Settings are chosen on records no editor trains on and no report uses: ``--data
counterfact-train --offset 5100`` (the training loop stops at 5099).

Runs resume from ``--out/<data>[-<offset>]/<method>[-batch]``.

    OMP_NUM_THREADS=1 python benchmarks/learned_editors.py --method mend --method rome --batch
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.cli.options import parse_sets
from lmpatch.cli.warmup import prepare
from lmpatch.data import load_dataset
from lmpatch.eval.runner import run_independent
from lmpatch.methods.hparams import with_overrides
from lmpatch.methods.registry import get_method

DEFAULT_METHODS = ("mend", "ke", "rome")
DATA = ("counterfact-edit", "zsre")
METRICS = ("reliability", "generalization", "locality", "counterfact", "wild")
COLUMNS = (
    ("efficacy_score", "eff"), ("paraphrase_score", "para"), ("neighborhood_score", "neigh"),
    ("reliability", "rel"), ("generalization", "gen"), ("locality", "loc"),
    ("reliability_wild", "rel wild"), ("generalization_wild", "gen wild"), ("locality_wild", "loc wild"),
)


def run(model, method: str, overrides: dict, requests, out: Path, batch: bool) -> dict:
    info = get_method(method)
    hp = with_overrides(info.hparams, overrides)
    prepare(model, info, hp, show=True)

    def edit_fn(m, r):
        return lmpatch.edit(m, r, info.name, hp)

    return run_independent(model, requests, edit_fn, out, batch_size=len(requests) if batch else 1, method=method,
                           metrics=METRICS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help=f"repeatable; default {', '.join(DEFAULT_METHODS)}")
    ap.add_argument("--data", action="append", help=f"repeatable; default {', '.join(DATA)}")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0, help="first record (5100 with counterfact-train: tuning records)")
    ap.add_argument("--batch", action="store_true", help="also edit all n requests in one call (not ROME)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("runs/learned-editors"))
    args = ap.parse_args()
    console = Console()
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model()
    for data in args.data or DATA:
        requests = load_dataset(data, n=args.n, offset=args.offset)
        where = data + (f"-{args.offset}" if args.offset else "")
        table = Table(title=f"{model.name}: {len(requests)} {data} records from {args.offset}")
        table.add_column("method (regime)")
        for _, label in COLUMNS:
            table.add_column(label, justify="right")
        table.add_column("edit s (median)", justify="right")
        pre = None
        for method in args.method or DEFAULT_METHODS:
            mine = [s.split(".", 1)[1] for s in args.set if s.split(".", 1)[0] == method]
            overrides = parse_sets(mine, get_method(method).hparams)
            regimes = [False] + ([True] if args.batch and method != "rome" else [])
            for batch in regimes:
                t0 = time.perf_counter()
                summary = run(model, method, overrides, requests, args.out / where / (method + ("-batch" if batch else "")),
                              batch)
                post, pre = summary["metrics"], pre or summary.get("metrics_pre", {})
                seconds = summary.get("edit_seconds", {}).get("median")
                regime = f"one call of {len(requests)}" if batch else "single"
                table.add_row(f"{method} ({regime})", *[_fmt(post.get(k)) for k, _ in COLUMNS],
                              "-" if seconds is None else f"{seconds:.3f}")
                console.print(f"{data} {method} {regime}: {time.perf_counter() - t0:.0f} s wall")
        if pre:
            table.add_row("unedited", *[_fmt(pre.get(k)) for k, _ in COLUMNS], "-")
        console.print(table)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
