"""Single-regime editing quality on CounterFact records that were never used for tuning.

Hyperparameters were tuned on ``counterfact-train`` (benchmarks/tune_rome.py); this
script evaluates on the ROME-schema ``counterfact`` set minus every case that also
appears in ``counterfact-train``, so no evaluated record was seen during tuning.
Runs are resumable (``runs/quality-<method>/records.jsonl``).

    python benchmarks/edit_quality.py --method rome --method ft-l --method ft-m --n 50
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import lmpatch
from lmpatch.data import case_ids, drop_cases, load_dataset
from lmpatch.eval.runner import run_single

KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "reliability", "generalization", "locality")
METRICS = ("reliability", "generalization", "locality", "counterfact")


def evaluation_records(n: int) -> list[lmpatch.EditRequest]:
    held_out = drop_cases(load_dataset("counterfact"), case_ids(load_dataset("counterfact-train")))
    return held_out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help="repeatable; default rome, ft-l, ft-m")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    model = lmpatch.load_model()
    requests = evaluation_records(args.n)
    table = Table(title=f"{model.name}: single-regime edits, {len(requests)} held-out CounterFact records")
    table.add_column("method")
    for k in KEYS:
        table.add_column(k.replace("_score", ""))
    table.add_column("edit s (median/p90)")
    pre_row = None
    for method in args.method or ["rome", "ft-l", "ft-m"]:
        summary = run_single(
            model, requests, lambda m, r, method=method: lmpatch.edit(m, r, method),
            args.out / f"quality-{method}", method=method, metrics=METRICS,
        )
        post, pre = summary["metrics"], summary["metrics_pre"]
        pre_row = pre_row or ["unedited"] + [_fmt(pre.get(k)) for k in KEYS] + ["-"]
        t = summary["edit_seconds"]
        table.add_row(method, *[_fmt(post.get(k)) for k in KEYS], f"{t['median']:.2f} / {t['p90']:.2f}")
    if pre_row:
        table.add_row(*pre_row)
    console.print(table)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
