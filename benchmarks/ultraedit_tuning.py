"""Tune UltraEdit on training records: sequential batches, then score the edits on the final model.

One run per ``--set`` group: ``--batches`` batches of ``--batch-size`` ``counterfact-train``
edits from ``--offset`` (default 5000: past the 0-4999 the warm-up reads, never evaluated),
each applied before the next is computed, as ``lmpatch eval --mode sequential`` does. Then
``--score`` of the edits, evenly spaced, are scored by probability comparison on the final
model, and WikiText-2 perplexity is read. docs/ultraedit.md's tuning table came from here.

    python benchmarks/ultraedit_tuning.py                                  # the defaults
    python benchmarks/ultraedit_tuning.py --set lr=5e-4 --set preserve=0.3
    python benchmarks/ultraedit_tuning.py --set covariance=false --batches 5
"""
from __future__ import annotations

import argparse
import time

import lmpatch  # first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from rich.console import Console
from rich.table import Table

from lmpatch.cli.options import parse_sets
from lmpatch.data import load_dataset
from lmpatch.eval.metrics import evaluate_records, summarize
from lmpatch.eval.perplexity import perplexity
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.hparams import with_overrides
from lmpatch.methods.ultraedit import UltraEditHparams, apply_ultraedit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], help="hyperparameter name=value (repeatable)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--offset", type=int, default=5000)
    ap.add_argument("--score", type=int, default=200, help="edits scored after the last batch")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    console = Console()
    hp = with_overrides(UltraEditHparams, parse_sets(args.set))
    model = lmpatch.load_model()
    requests = load_dataset("counterfact-train", offset=args.offset, n=args.batches * args.batch_size)
    seconds = []
    for start in range(0, len(requests), args.batch_size):
        t0 = time.perf_counter()
        patch = apply_ultraedit(model, requests[start : start + args.batch_size], hp)
        patch.apply(model)
        seconds.append(time.perf_counter() - t0)
        console.print(f"batch {len(seconds)}: {seconds[-1]:.2f} s", highlight=False)
    sample = requests[:: max(1, len(requests) // args.score)][: args.score]
    scores = summarize(evaluate_records(model, sample, None, metrics=("counterfact",)))["metrics_pre"]
    ppl = perplexity(model, max_tokens=args.ppl_tokens, progress=False)

    table = Table(title=f"UltraEdit, {len(requests)} sequential counterfact-train edits from {args.offset}, "
                        f"{len(sample)} scored on the final model")
    for col in ("settings", "efficacy", "paraphrase", "neighbourhood", "perplexity", "edit s", "s / batch"):
        table.add_column(col)
    table.add_row(
        ", ".join(args.set) or "defaults",
        *(f"{scores[k]:.3f}" for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")),
        f"{ppl.value:.2f}", f"{sum(seconds):.1f}", f"{sum(seconds) / len(seconds):.2f}",
    )
    console.print(table)


if __name__ == "__main__":
    main()
