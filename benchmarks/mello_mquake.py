"""MeLLo next to weight editors on MQuAKE: multi-hop accuracy on the same cases, with times.

Each case's edits are made together from the unedited model and kept only while that
case's three questions are asked (MQuAKE's protocol, :mod:`lmpatch.eval.multihop`). ROME
and MEMIT answer after the official few-shot prompt; MeLLo answers with its own
decomposition loop over the retrieved edits. The unedited model is scored against the
original answers, as the ceiling an edit could keep. Per case: the time to make the edits
and the time to answer the questions. MeLLo's failed loops (no subquestion written, or
out of rounds) count as wrong answers and are reported separately.

MeLLo costs ~45 s per case on one core, so the full subset takes hours. The run is
therefore saved in chunks of ``--chunk`` cases (``<out>/<method>/cases-<first>-<last>.json``,
each written atomically when done): a killed run resumes where it stopped, and
``--shard 1/2`` and ``--shard 2/2`` in two processes split the chunks between two cores.
Each chunk is run by every method before the next begins, so a partial run compares
the methods on the same cases. The table is built from the chunks every method has
finished and says how many cases that is.

    OMP_NUM_THREADS=1 python benchmarks/mello_mquake.py --n 20
    OMP_NUM_THREADS=1 python benchmarks/mello_mquake.py --shard 1/2 &   # all 254 cases,
    OMP_NUM_THREADS=1 python benchmarks/mello_mquake.py --shard 2/2     # two cores
    python benchmarks/mello_mquake.py --table-only                      # the table so far
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
UNEDITED = "unedited"


def shard(text: str) -> tuple[int, int]:
    """``"2/3"`` -> (1, 3): this process takes every third chunk, starting with the second."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 1/2; got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N; got {text!r}")
    return k - 1, n


def chunk_path(out: Path, method: str, first: int, last: int) -> Path:
    return out / method / f"cases-{first:04d}-{last:04d}.json"


def edit_function(model, method: str):
    """``lmpatch.edit`` with ``method``'s defaults, its one-off work done first; None unedited."""
    if method == UNEDITED:
        return None
    info = get_method(method)
    hp = with_overrides(info.hparams, {})
    prepare(model, info, hp, show=True)
    return lambda m, reqs: lmpatch.edit(m, reqs, info.name, hp)


def run_chunks(model, cases, methods: list[str], out: Path, chunk: int, mine: tuple[int, int],
               console: Console) -> None:
    """Evaluate every method on this shard's chunks of ``cases`` that are not on disk yet.

    Chunks are the outer loop, so a run stopped early has every method on the same cases.
    """
    edit_fns = {method: edit_function(model, method) for method in methods}
    for number, start in enumerate(range(0, len(cases), chunk)):
        if number % mine[1] != mine[0]:
            continue
        part = cases[start : start + chunk]
        for method in methods:
            path = chunk_path(out, method, part[0].case_id, part[-1].case_id)
            if path.is_file():
                continue
            console.print(f"{method}: cases {part[0].case_id}-{part[-1].case_id}")
            result = multihop_accuracy(model, part, edit_fns[method])
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, result.to_dict(), indent=1, default=str)


def chunk_names(out: Path, method: str) -> set[str]:
    return {p.name for p in (out / method).glob("cases-*.json")}


def summary_row(out: Path, method: str, n_cases: int, names: set[str]) -> list[str] | None:
    """One table row from ``method``'s chunks called ``names``, or None when there is none."""
    chunks = [json.loads((out / method / name).read_text()) for name in sorted(names)]
    if not chunks:
        return None
    records = [r for c in chunks for r in c["records"]]
    questions = sum(len(r["questions"]) for r in records)
    failed = sum(a == "" for r in records for a in r["answers"])
    cases = f"{len(records)}" + ("" if len(records) == n_cases else f" of {n_cases}")
    return [
        method, cases,
        f"{sum(r['case_correct'] for r in records) / len(records):.3f}",
        f"{sum(sum(r['correct']) for r in records) / questions:.3f}",
        "-" if method == UNEDITED else f"{sum(any(r['matches_other']) for r in records) / len(records):.3f}",
        f"{failed}/{questions}" if method == "mello" else "-",
        "-" if method == UNEDITED else f"{statistics.median(r['edit_seconds'] for r in records):.2f}",
        # the unedited model's questions are pooled across cases, so only its total is per-case
        f"{sum(c['seconds'] for c in chunks) / len(records):.1f}" if method == UNEDITED
        else f"{statistics.median(r['answer_seconds'] for r in records):.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help=f"repeatable; default {', '.join(DEFAULT_METHODS)}")
    ap.add_argument("--n", type=int, default=None, help="first N cases of the shipped subset (default: all 254)")
    ap.add_argument("--data", default=None, help="an MQuAKE-format file (default: the shipped subset)")
    ap.add_argument("--out", type=Path, default=Path("runs/mello-mquake"))
    ap.add_argument("--chunk", type=int, default=10, help="cases per saved chunk (default 10)")
    ap.add_argument("--shard", type=shard, default=(0, 1), help="K/N: run only every N-th chunk, from the K-th")
    ap.add_argument("--table-only", action="store_true", help="print the table from the chunks on disk")
    args = ap.parse_args()
    if args.chunk < 1:
        ap.error("--chunk must be at least 1")
    console = Console()
    console.print(cpu_line(cpu_info()))
    cases = load_mquake(args.data, n=args.n)
    methods = [UNEDITED, *(args.method or DEFAULT_METHODS)]
    if not args.table_only:
        model = lmpatch.load_model()
        run_chunks(model, cases, methods, args.out, args.chunk, args.shard, console)
    table = Table(title=f"MQuAKE ({len(cases)} cases asked), exact match; the unedited model against the original answers")
    for col in ("method", "cases", "multi-hop acc.", "question acc.", "still original", "failed loops",
                "edit s / case", "answer s / case"):
        table.add_column(col, justify="right")
    # a partial run is compared on the chunks every method has finished
    done = [chunk_names(args.out, m) for m in methods]
    common = set.intersection(*done) if done else set()
    for method in methods:
        row = summary_row(args.out, method, len(cases), common)
        if row is not None:
            table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
