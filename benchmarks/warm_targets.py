"""Optimise the value targets of many facts ahead of a big MEMIT-family batch, in parallel
worker processes, into the on-disk target cache.

A batch of thousands of facts spends nearly all its time in the per-fact target
optimisation, and each fact's target depends only on the unedited model, the settings
and the fact (:mod:`lmpatch.methods.locate.target_cache`). On a small CPU one process
with two threads uses the cores poorly (a step is a chain of small matrix products), so
this script splits the facts over ``--workers`` single-threaded processes. The batch
that follows (``lmpatch eval --mode batch`` or ``lmpatch edit``) finds every target in
the cache and only solves; the wall and CPU time spent here is printed so a report can
add it to the batch's own edit time.

    python benchmarks/warm_targets.py --method memit --data counterfact-edit --n 10000 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from lmpatch.machine import cpu_info, cpu_line


def shard(args) -> None:
    """Worker: optimise (or find cached) the targets of every ``workers``-th fact."""
    import torch

    import lmpatch
    from lmpatch.data import load_dataset
    from lmpatch.methods.locate.batch import optimize_targets
    from lmpatch.methods.locate.templates import context_templates
    from lmpatch.methods.memit import edit_layers
    from lmpatch.methods.registry import get_method

    torch.set_num_threads(1)
    model = lmpatch.load_model(args.model) if args.model else lmpatch.load_model()
    info = get_method(args.method)
    hp = info.hparams()
    if not hasattr(hp, "value_config") or not hasattr(hp, "z_group_size"):
        raise SystemExit(f"{args.method} has no batched target optimisation (MEMIT, PMET, AlphaEdit, EMMET do).")
    requests = load_dataset(args.data, n=args.n, offset=args.offset)[args.shard :: args.workers]
    layers = edit_layers(model, hp)
    templates = context_templates(model, hp.template_config())
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    targets = optimize_targets(model, requests, layers[-1], templates, hp.value_config(), hp.z_group_size,
                               progress=args.shard == 0, cache=True)
    print(json.dumps({
        "shard": args.shard, "facts": len(requests), "cached_before": targets.cached,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
        "steps_mean": sum(targets.steps) / max(len(targets.steps), 1),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--data", default="counterfact-edit")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--model", default=None, help="hub id or local directory (default: embedded SmolLM2)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.shard is not None:
        shard(args)
        return

    from rich.console import Console

    console = Console()
    t0 = time.perf_counter()
    base = [sys.executable, __file__, "--method", args.method, "--data", args.data, "--n", str(args.n),
            "--offset", str(args.offset), "--workers", str(args.workers)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(base + ["--shard", str(i)], stdout=subprocess.PIPE, text=True, env=env)
             for i in range(args.workers)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}); rerun to resume from the cache")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    facts = sum(r["facts"] for r in results)
    cached = sum(r["cached_before"] for r in results)
    cpu = sum(r["cpu_seconds"] for r in results)
    console.print(
        f"{args.method} targets for {facts} {args.data} facts ({cached} already cached): "
        f"{wall:.1f} s wall with {args.workers} workers, {cpu:.1f} s CPU, "
        f"{max(r['seconds'] for r in results):.1f} s in the slowest worker's optimisation"
    )
    print(json.dumps({"facts": facts, "cached_before": cached, "wall_seconds": wall, "cpu_seconds": cpu,
                      "workers": results}))


if __name__ == "__main__":
    main()
