"""Grid-search ROME hyperparameters on CounterFact *training* records only.

The defaults shipped in ``ROMEHparams`` come from this script; evaluation records
(``counterfact``, the ROME-schema set) are never used here, so the quality numbers
reported by ``benchmarks/edit_quality.py`` are not tuned on their own test data.

    python benchmarks/tune_rome.py --n 20 --grid v_lr=0.5,1,2 --grid stop_prob=none,0.9 --grid "template_lengths=[[5,10],[10,10]];[[10,5]]"
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

import lmpatch
from lmpatch.data import case_ids, load_dataset
from lmpatch.eval.metrics import evaluate_request, summarize
from lmpatch.machine import cpu_info, cpu_line

METRICS = ("reliability", "generalization", "locality", "counterfact")


def tuning_records() -> list[lmpatch.EditRequest]:
    """Training cases in the full ROME schema (10 neighbourhood prompts each): the
    ``counterfact`` cases that are also in ``counterfact-train``, then the rest of the
    training split. ``benchmarks/edit_quality.py`` excludes all of them."""
    train = load_dataset("counterfact-train")
    ids = case_ids(train)
    rich = [r for r in load_dataset("counterfact") if r.case_id in ids]
    seen = case_ids(rich)
    return rich + [r for r in train if r.case_id not in seen]


def parse_grid(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        key, values = item.split("=", 1)
        parts = values.split(";") if ";" in values or values[:1] in "[{" else values.split(",")
        grid[key] = [None if v.lower() == "none" else json.loads(v) if v[:1] in "[{" else _num(v) for v in parts]
    return grid


def _num(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--grid", action="append", default=[], help="name=v1,v2 or name=v1;v2 for JSON values (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="fixed name=value")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    torch.set_num_threads(args.threads)
    model = lmpatch.load_model()
    requests = tuning_records()[args.offset : args.offset + args.n]
    fixed = {k: v[0] for k, v in parse_grid(args.set).items()}
    grid = parse_grid(args.grid)
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        hp = {**fixed, **dict(zip(keys, combo))}
        records, times, steps = [], [], []
        for req in requests:
            t0 = time.perf_counter()
            patch = lmpatch.edit(model, req, args.method, **hp)
            times.append(time.perf_counter() - t0)
            steps.append((patch.metrics.get("edit") or {}).get("steps", 0))
            records.append(evaluate_request(model, req, patch, metrics=METRICS))
        s = summarize(records)
        m, pre = s["metrics"], s["metrics_pre"]
        print(
            f"{hp}  eff={m['efficacy_score']:.3f} para={m['paraphrase_score']:.3f} "
            f"nbhd={m['neighborhood_score']:.3f} (pre {pre['neighborhood_score']:.3f}) "
            f"rel={m['reliability']:.3f} gen={m['generalization']:.3f} loc={m['locality']:.3f} "
            f"median_s={statistics.median(times):.2f} steps={statistics.mean(steps):.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
