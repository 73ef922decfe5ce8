"""How long one edit takes on the embedded SmolLM2 (edit alone, no evaluation).

One-off costs (statistics, context templates) are paid and reported first, so the
per-edit numbers are what a user sees once the caches are warm.

    python benchmarks/edit_speed.py --method rome --n 50
    python benchmarks/edit_speed.py --method rome --n 50 --isa avx2   # as on an AVX2-only CPU

``--isa avx2`` restarts the script with torch's kernels held to AVX2
(``lmpatch.machine.AVX2_ONLY``), so an AVX-512 or AMX machine times what a float32-only
AVX2 machine runs; the first line printed says which limits were in force.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import lmpatch  # first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import torch
from rich.console import Console
from rich.table import Table

from lmpatch.cli.options import parse_sets
from lmpatch.data import load_dataset
from lmpatch.machine import AVX2_ONLY, cpu_info, cpu_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help="repeatable; default: rome")
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--set", action="append", default=[], help="hyperparameter name=value (repeatable)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: time with torch's kernels held to AVX2 (an AVX2-only machine)")
    args = ap.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        # the limits only act if set before torch starts: run again in a fresh interpreter
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    t0 = time.perf_counter()
    model = lmpatch.load_model()
    console.print(f"model load: {time.perf_counter() - t0:.2f} s  (threads: {torch.get_num_threads()})")
    # import lmpatch makes idle OpenMP threads spin ~30 us, then sleep (docs/speed.md): the
    # policy changes edit times by 10-15% either way, so it is printed with them.
    console.print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}")
    hparams = parse_sets(args.set)
    requests = load_dataset(args.data, n=args.n)
    table = Table(title=f"Edit time on {model.name}, {len(requests)} {args.data} records")
    for col in ("method", "warm-up (one-off)", "median s", "p90 s", "min s", "max s", "mean steps"):
        table.add_column(col)
    for method in args.method or ["rome"]:
        t0 = time.perf_counter()
        lmpatch.edit(model, requests[0], method, **hparams)  # pays statistics + templates once
        warm = time.perf_counter() - t0
        times, steps = [], []
        for req in requests:
            t0 = time.perf_counter()
            patch = lmpatch.edit(model, req, method, **hparams)
            times.append(time.perf_counter() - t0)
            steps.append((patch.metrics.get("edit") or {}).get("steps", float("nan")))
        times.sort()
        p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        table.add_row(
            method, f"{warm:.2f}", f"{statistics.median(times):.2f}", f"{p90:.2f}",
            f"{times[0]:.2f}", f"{times[-1]:.2f}", f"{statistics.mean(steps):.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
