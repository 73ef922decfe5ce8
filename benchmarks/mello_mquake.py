"""MeLLo next to weight editors on MQuAKE: multi-hop accuracy on the same cases, with times.

Each case's edits are made together from the unedited model and kept only while that
case's three questions are asked (MQuAKE's protocol, :mod:`lmpatch.eval.multihop`). ROME
and MEMIT answer after the official few-shot prompt; MeLLo answers with its own
decomposition loop over the retrieved edits. The unedited model is scored against the
original answers, as the ceiling an edit could keep. Per case: the time to make the edits
and the time to answer the questions. MeLLo's failed loops (no subquestion written, or
out of rounds) count as wrong answers and are reported separately.

    OMP_NUM_THREADS=1 python benchmarks/mello_mquake.py --n 20
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.cli.warmup import prepare
from lmpatch.data.mquake import load_mquake
from lmpatch.eval.multihop import multihop_accuracy
from lmpatch.fileio import atomic_write_json
from lmpatch.methods.hparams import with_overrides
from lmpatch.methods.registry import get_method

DEFAULT_METHODS = ("mello", "rome", "memit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help=f"repeatable; default {', '.join(DEFAULT_METHODS)}")
    ap.add_argument("--n", type=int, default=None, help="first N cases of the shipped subset (default: all 254)")
    ap.add_argument("--data", default=None, help="an MQuAKE-format file (default: the shipped subset)")
    ap.add_argument("--out", type=Path, default=Path("runs/mello-mquake"))
    args = ap.parse_args()
    console = Console()
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model()
    cases = load_mquake(args.data, n=args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"{model.name}: MQuAKE, {len(cases)} cases, exact match")
    for col in ("method", "multi-hop acc.", "question acc.", "still original", "failed loops",
                "edit s / case", "answer s / case"):
        table.add_column(col, justify="right")
    pre = multihop_accuracy(model, cases)
    table.add_row("unedited (original answers)", f"{pre.accuracy:.3f}", f"{pre.question_accuracy:.3f}", "-", "-",
                  "-", f"{pre.seconds_per_case:.1f}")
    for name in args.method or DEFAULT_METHODS:
        info = get_method(name)
        hp = with_overrides(info.hparams, {})
        prepare(model, info, hp, show=True)
        result = multihop_accuracy(model, cases, lambda m, reqs, info=info, hp=hp: lmpatch.edit(m, reqs, info.name, hp))
        atomic_write_json(args.out / f"{name}.json", result.to_dict(), indent=1, default=str)
        failed = sum(a == "" for r in result.records for a in r.answers) if name == "mello" else None
        table.add_row(
            name, f"{result.accuracy:.3f}", f"{result.question_accuracy:.3f}", f"{result.other_accuracy:.3f}",
            "-" if failed is None else f"{failed}/{result.n_questions}",
            f"{statistics.median(r.edit_seconds for r in result.records):.2f}",
            f"{statistics.median(r.answer_seconds for r in result.records):.1f}",
        )
    console.print(table)
    console.print(json.dumps({"protocol_pre": pre.protocol}))


if __name__ == "__main__":
    main()
