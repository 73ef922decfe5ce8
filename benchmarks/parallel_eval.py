"""Serial against sharded evaluation: the same ROME single edits, once in one process and
once on Ray workers, compared record for record, with both wall times.

Every run is the ``lmpatch eval`` command a user would type, started as a subprocess, so
the wall times include everything a user waits for: loading the model, starting Ray and
its workers (each loads the model once), editing, scoring and writing the run directory.

    python benchmarks/parallel_eval.py                 # 20 counterfact-edit records, 2 Ray workers
    python benchmarks/parallel_eval.py --n 4 --backend local

Equality. torch's CPU kernels split their sums between threads, so the same edit computed
with 2 threads and with 1 rounds differently, and ROME's optimisation carries that into
the edit (enough, on SmolLM2, to flip a greedy generation now and then). A serial run
uses all cores while each of two workers on them uses half, so the sharded records are
checked against a third, serial run with the workers' thread count (``OMP_NUM_THREADS``),
and must equal it exactly (exit code 1 otherwise). How far the all-cores serial run is
from that reference is printed too: that is the thread count's doing, not sharding's.
The reference run is skipped when the workers already use as many threads as a serial run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import lmpatch  # noqa: F401  first: it sets lmpatch's OpenMP wait policy, which the runs inherit

# isort: split

import torch

from lmpatch.eval.parallel import threads_per_worker
from lmpatch.eval.records import key_of, read_records
from lmpatch.machine import cpu_info, cpu_line

TIMING = ("edit_seconds", "edit_parts")


def run_eval(args: argparse.Namespace, out: Path, backend: list[str], threads: int | None = None) -> tuple[float, dict]:
    """Wall seconds and summary of one ``lmpatch eval`` run (started afresh in ``out``),
    with ``threads`` torch threads if given."""
    cmd = [sys.executable, "-m", "lmpatch.cli", "eval", "--method", "rome", "--data", args.data, "--n", str(args.n),
           "--offset", str(args.offset), "--out", str(out), "--no-resume", "--json", *backend]
    if args.model:
        cmd += ["--model", args.model]
    if args.metrics:
        cmd += ["--metrics", args.metrics]
    for pair in args.set or ():
        cmd += ["--set", pair]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    print(f"$ {'OMP_NUM_THREADS=%d ' % threads if threads else ''}lmpatch " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return time.perf_counter() - t0, json.loads(proc.stdout)


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar in a record, by its path (``post.reliability``, ``pre.wild_generations.rephrase[0]``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def compare(serial: list[dict], sharded: list[dict], rel_tol: float, abs_tol: float) -> tuple[list[str], float]:
    """Differences beyond float noise, and the largest absolute difference between floats."""
    problems: list[str] = []
    worst = 0.0
    by_key = {key_of(r): r for r in sharded}
    if len(by_key) != len(serial):
        problems.append(f"{len(serial)} serial records against {len(by_key)} sharded ones")
    for rec in serial:
        key = key_of(rec)
        other = by_key.get(key)
        if other is None:
            problems.append(f"record {key!r} missing from the sharded run")
            continue
        a = dict(leaves({k: v for k, v in rec.items() if k not in TIMING}))
        b = dict(leaves({k: v for k, v in other.items() if k not in TIMING}))
        for path in sorted(set(a) | set(b)):
            x, y = a.get(path), b.get(path)
            if isinstance(x, float) and isinstance(y, float):
                worst = max(worst, abs(x - y))
                if not math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol):
                    problems.append(f"{key}: {path} {x!r} != {y!r}")
            elif x != y:
                problems.append(f"{key}: {path} {x!r} != {y!r}")
    return problems, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="records to edit (default 20)")
    ap.add_argument("--data", default="counterfact-edit")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--metrics", default=None, help="as lmpatch eval --metrics (default: its default groups)")
    ap.add_argument("--set", action="append", help="ROME hyperparameter key=value (repeatable)")
    ap.add_argument("--backend", default="ray", choices=("ray", "local"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/parallel-eval-bench"),
                    help="where the run directories go (serial/, <backend>/, serial-<k>-thread/)")
    ap.add_argument("--rel-tol", type=float, default=1e-4, help="for the all-cores serial run's report only")
    ap.add_argument("--abs-tol", type=float, default=1e-6, help="for the all-cores serial run's report only")
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine

    worker_threads = threads_per_worker(args.workers)
    serial_s, serial_summary = run_eval(args, args.out / "serial", [])
    sharded_s, sharded_summary = run_eval(args, args.out / args.backend,
                                          ["--backend", args.backend, "--workers", str(args.workers)])
    reference_dir, reference_s = args.out / "serial", None
    if worker_threads != torch.get_num_threads():
        reference_dir = args.out / f"serial-{worker_threads}-thread"
        reference_s, _ = run_eval(args, reference_dir, [], threads=worker_threads)

    sharded = read_records(args.out / args.backend / "records.jsonl")
    problems, _ = compare(read_records(reference_dir / "records.jsonl"), sharded, 0.0, 0.0)
    n = serial_summary["n"]
    print(f"\n{n} ROME single edits of {args.data} on {serial_summary['model']}")
    threads = torch.get_num_threads()
    print(f"{f'serial, {threads} threads':36} {serial_s:8.1f} s wall  ({serial_s / n:.2f} s per record)")
    print(f"{f'{args.backend}, {args.workers} workers x {worker_threads} thread(s)':36} {sharded_s:8.1f} s wall  "
          f"({sharded_s / n:.2f} s per record; speed-up {serial_s / sharded_s:.2f}x)")
    if reference_s is not None:
        print(f"{f'serial, {worker_threads} thread(s) (reference)':36} {reference_s:8.1f} s wall")
    print(f"edit time summed over records: serial {serial_summary['edit_seconds']['total']:.1f} s, "
          f"{args.backend} {sharded_summary['edit_seconds']['total']:.1f} s")
    if problems:
        print(f"\nNOT EQUAL to the serial run with {worker_threads} thread(s): {len(problems)} difference(s):")
        for line in problems[:20]:
            print("  " + line)
        return 1
    print(f"\n{args.backend} records equal the serial run with {worker_threads} thread(s) bit for bit ({n} of {n}).")
    if reference_s is not None:
        noise, worst = compare(read_records(args.out / "serial" / "records.jsonl"), sharded, args.rel_tol, args.abs_tol)
        print(f"Against the serial run with {threads} threads (different rounding, not sharding): "
              f"largest float difference {worst:.3g}; {len(noise)} value(s) beyond rel {args.rel_tol:g} / "
              f"abs {args.abs_tol:g}" + (":" if noise else "."))
        for line in noise[:10]:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
