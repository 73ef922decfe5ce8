"""Lifelong editing at scale: 10,000 ``counterfact-edit`` edits, sequentially in batches of 100.

For each method one ``lmpatch eval --mode sequential`` run in its own process (resumable:
rerun the same command after an interruption). At each checkpoint (default 1k, 5k, 10k
edits) the scored sample of the edits made so far (``--score-n`` evenly spaced over all
edits) is re-scored on the current model, with WikiText-2 perplexity and PIQA. The table
gives, per method and checkpoint: efficacy, paraphrase, neighbourhood (ROME's probability
comparisons), perplexity, PIQA, cumulative edit time and peak RSS. ``lmpatch report``
then draws the curves.

    python benchmarks/scale.py                                  # ultraedit, alphaedit (β = 3), memit
    python benchmarks/scale.py --method ultraedit --n 10000 --score-n 1000
    python benchmarks/scale.py --method "alphaedit:preserve_weight=3" --n 1000 --checkpoints 1000

A method may carry hyperparameters after a colon (``name:key=value,key=value``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from mass_editing import fmt, lmpatch_cmd, run_child, warm_statistics
from rich.console import Console
from rich.table import Table

from lmpatch.machine import cpu_info, cpu_line

DEFAULT_METHODS = ("ultraedit", "alphaedit:preserve_weight=3", "memit")
SCORES = (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"), ("neighborhood_score", "neighbourhood"))


def split_method(spec: str) -> tuple[str, list[str]]:
    """``"alphaedit:preserve_weight=3"`` -> ``("alphaedit", ["preserve_weight=3"])``."""
    name, _, sets = spec.partition(":")
    return name, [s for s in sets.split(",") if s]


def run(spec: str, args, console: Console) -> dict:
    method, sets = split_method(spec)
    label = method + "".join(f"-{s.replace('=', '')}" for s in sets)
    out = args.out / f"{label}-b{args.batch_size}-{args.n}"
    cmd = lmpatch_cmd() + [
        "eval", "--method", method, "--data", args.data, "--n", str(args.n), "--mode", "sequential",
        "--batch-size", str(args.batch_size), "--checkpoints", args.checkpoints, "--score-n", str(args.score_n),
        "--metrics", "counterfact,piqa,perplexity", "--piqa-n", str(args.piqa_n),
        "--ppl-tokens", str(args.ppl_tokens), "--out", str(out), "--json",
    ]
    for s in sets:
        cmd += ["--set", s]
    console.print(f"[bold]{label}[/bold]: lmpatch {' '.join(cmd[1:])}")
    done = run_child(cmd, stdout=subprocess.PIPE, text=True)
    summary = json.loads(done.stdout)
    summary["run"], summary["dir"] = label, str(out)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help="repeatable, name[:key=value,...]; default: " + ", ".join(DEFAULT_METHODS))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--checkpoints", default="1000,5000,10000")
    ap.add_argument("--score-n", type=int, default=1000)
    ap.add_argument("--data", default="counterfact-edit")
    ap.add_argument("--piqa-n", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    console = Console()
    specs = args.method or list(DEFAULT_METHODS)
    for spec in specs:
        warm_statistics(split_method(spec)[0], console)
    summaries = [run(spec, args, console) for spec in specs]

    table = Table(title=f"{args.n} sequential edits in batches of {args.batch_size}, {args.data} "
                        f"({args.score_n} scored)")
    for col in ("method", "edits", "scored", *(c[1] for c in SCORES), "perplexity", "PIQA", "edit s", "peak RSS MB"):
        table.add_column(col)
    for s in summaries:
        before = s.get("metrics", {})
        for point in s.get("curve", []):
            m, pre = point.get("metrics", {}), point.get("metrics_pre", {})
            table.add_row(
                s["run"], str(point.get("edits")), str(round(args.score_n * point.get("edits", 0) / args.n)),
                *(f"{fmt(m.get(k))} (pre {fmt(pre.get(k))})" for k, _ in SCORES),
                f"{fmt(before.get('perplexity_before'), 2)} → {fmt(m.get('perplexity_after'), 2)}",
                f"{fmt(before.get('piqa_before'))} → {fmt(m.get('piqa_after'))}",
                fmt(point.get("edit_seconds"), 0), fmt(point.get("peak_rss_mb"), 0),
            )
    console.print(table)
    report = args.out / "report"
    subprocess.run(lmpatch_cmd() + ["report", *(s["dir"] for s in summaries), "--out", str(report)], check=True,
                   stdout=subprocess.DEVNULL)
    console.print(f"report and curves: {report}")


if __name__ == "__main__":
    main()
