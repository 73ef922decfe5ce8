"""Measure ROME settings on CounterFact records with the project's own runner and metrics.

Each setting is one :func:`lmpatch.eval.runner.run_single` run (every record edited
from the original model, scored with the probability comparisons, reverted), so the
numbers are those of ``lmpatch eval``. Besides efficacy / paraphrase / neighbourhood it
prints the median edit time, the mean number of optimisation steps and how often δ
ended on the clamp sphere (‖δ‖ = clamp_norm_factor · ‖v_init‖). Tune on
``counterfact-train``; confirm once on ``counterfact-edit``.

    python benchmarks/rome_generalisation.py --data counterfact-train --n 30 \\
        --grid clamp_norm_factor=1.5,4 --set stop_prob=none --threads 1
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
from pathlib import Path

import torch

import lmpatch
from lmpatch.data import load_dataset
from lmpatch.eval.runner import run_single
from lmpatch.machine import cpu_info, cpu_line

METRICS = ("reliability", "generalization", "locality", "counterfact")


def _parse(items: list[str]) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        key, values = item.split("=", 1)
        parts = values.split(";") if ";" in values or values[:1] in "[{" else values.split(",")
        out[key] = [_value(v) for v in parts]
    return out


def _value(v: str):
    if v.lower() == "none":
        return None
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v[:1] in "[{":
        return json.loads(v)
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def run(model, requests, hp: dict, out: Path, method: str = "rome") -> dict:
    infos: list[dict] = []

    def edit(m, r):
        patch = lmpatch.edit(m, r, method, **hp)
        infos.append((patch.metrics or {}).get("edit") or {})
        return patch

    s = run_single(model, requests, edit, out, method=method, metrics=METRICS, resume=False, progress=False)
    clamp = hp.get("clamp_norm_factor", lmpatch.methods.rome.ROMEHparams().clamp_norm_factor)
    ratios = [i.get("delta_ratio", 0.0) for i in infos]
    s["diagnostics"] = {
        "steps_mean": statistics.mean(i.get("steps", 0) for i in infos),
        "on_clamp": sum(r >= clamp * 0.999 for r in ratios) / len(ratios),
        "delta_ratio_median": statistics.median(ratios),
    }
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="counterfact-train")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--method", default="rome")
    ap.add_argument("--set", action="append", default=[], help="fixed name=value (repeatable)")
    ap.add_argument("--grid", action="append", default=[], help="name=v1,v2 or name=v1;v2 for JSON values")
    ap.add_argument("--config", action="append", default=[], help='a whole setting as JSON, e.g. \'{"v_lr": 0.5}\' (repeatable; "{}" = defaults)')
    ap.add_argument("--out", type=Path, default=Path("runs/rome-generalisation"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    torch.set_num_threads(args.threads)
    import lmpatch.methods.rome  # noqa: F401  (for the default clamp)

    model = lmpatch.load_model()
    requests = load_dataset(args.data)[args.offset : args.offset + args.n]
    fixed = {k: v[0] for k, v in _parse(args.set).items()}
    grid = _parse(args.grid)
    settings = [{**fixed, **json.loads(c)} for c in args.config]
    if grid or not settings:
        settings += [{**fixed, **dict(zip(grid, combo))} for combo in itertools.product(*grid.values())]
    for hp in settings:
        tag = hashlib.sha256(json.dumps([args.data, args.offset, args.n, args.method, hp], sort_keys=True).encode()).hexdigest()[:10]
        s = run(model, requests, hp, args.out / f"{args.data}-{args.offset}-{args.n}-{tag}", args.method)
        m, pre, d = s["metrics"], s["metrics_pre"], s["diagnostics"]
        print(json.dumps({
            "data": args.data, "offset": args.offset, "n": s["n"], "method": args.method, "hp": hp,
            "efficacy": round(m["efficacy_score"], 3), "paraphrase": round(m["paraphrase_score"], 3),
            "neighbourhood": round(m["neighborhood_score"], 3), "neighbourhood_pre": round(pre["neighborhood_score"], 3),
            "para_mag": round(m["paraphrase_magnitude"], 3), "nbhd_mag": round(m["neighborhood_magnitude"], 3),
            "nbhd_mag_pre": round(pre["neighborhood_magnitude"], 3), "reliability": round(m["reliability"], 3), "generalization": round(m["generalization"], 3),
            "median_s": round(s["edit_seconds"]["median"], 2), "steps": round(d["steps_mean"], 1),
            "on_clamp": round(d["on_clamp"], 2), "delta_ratio": round(d["delta_ratio_median"], 2),
        }), flush=True)


if __name__ == "__main__":
    main()
