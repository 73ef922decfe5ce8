"""Tune the similarity thresholds of the retrieval editors on the tuning split only.

A memory of ``--stored`` edits is built from ``counterfact-train`` records 5000+ (the
records no default was ever reported on; ``counterfact-edit`` is for reporting). For
each threshold the script counts, with the memory's own matching rule:

* ``prompt hit``     - an edit prompt finds its own stored edit;
* ``paraphrase hit`` - a paraphrase of an edit prompt finds its own stored edit
  (what generalization needs);
* ``neighbour miss`` - a neighbourhood probe (same relation and object, other subject)
  matches nothing (what locality needs).

The chosen threshold maximises paraphrase hit + neighbour miss, among thresholds
that keep every edit prompt's own hit (reliability is not traded away). Only the
retriever runs, so this takes seconds.

    python benchmarks/tune_memory.py --method memprompt
"""
from __future__ import annotations

import argparse

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import torch
from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.data import load_dataset
from lmpatch.memory.embedder import embedder_for
from lmpatch.methods.memprompt import pattern
from lmpatch.methods.negatives import NEGATIVE_DATA, NEGATIVE_RECORDS

QUERY_TEXT = {"memprompt": pattern}
KEY_TEXT = {"memprompt": lambda r: pattern(r.prompt)}


def sweep(method: str, stored: int, offset: int, grid: list[float]) -> list[dict]:
    records = load_dataset(NEGATIVE_DATA, n=stored, offset=offset)
    embed = embedder_for("minilm").embed
    keys = embed([KEY_TEXT[method](r) for r in records])
    q = QUERY_TEXT[method]

    def nearest(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = embed([q(t) for t in texts]) @ keys.T
        return scores.max(dim=1)

    own_prompt = nearest([r.prompt for r in records])
    para = [(i, t) for i, r in enumerate(records) for t in r.rephrase]
    own_para = nearest([t for _, t in para])
    probes = [p.prompt for r in records for p in r.locality if p.kind == "neighborhood"]
    probe_best, _ = nearest(probes)
    prompt_ok = own_prompt[1] == torch.arange(len(records))
    para_ok = own_para[1] == torch.tensor([i for i, _ in para])
    rows = []
    for t in grid:
        rows.append({
            "threshold": t,
            "prompt_hit": float(((own_prompt[0] >= t) & prompt_ok).float().mean()),
            "paraphrase_hit": float(((own_para[0] >= t) & para_ok).float().mean()),
            "neighbour_miss": float((probe_best < t).float().mean()),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=sorted(QUERY_TEXT), default="memprompt")
    ap.add_argument("--stored", type=int, default=100, help="edits in the memory (the T = 100 benchmark's size)")
    ap.add_argument("--offset", type=int, default=NEGATIVE_RECORDS, help="first tuning record")
    args = ap.parse_args()
    console = Console()
    console.print(cpu_line(cpu_info()))
    grid = [round(0.40 + 0.025 * i, 3) for i in range(23)]
    rows = sweep(args.method, args.stored, args.offset, grid)
    table = Table(title=f"{args.method}: {args.stored} stored edits, {NEGATIVE_DATA} records {args.offset}+")
    for col in ("threshold", "prompt hit", "paraphrase hit", "neighbour miss"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(f"{r[k]:.3f}" for k in ("threshold", "prompt_hit", "paraphrase_hit", "neighbour_miss")))
    console.print(table)
    keep = [r for r in rows if r["prompt_hit"] >= max(x["prompt_hit"] for x in rows)]
    best = max(keep, key=lambda r: (r["paraphrase_hit"] + r["neighbour_miss"], r["threshold"]))
    console.print(f"chosen threshold: {best['threshold']} (paraphrase hit {best['paraphrase_hit']:.3f}, "
                  f"neighbour miss {best['neighbour_miss']:.3f})")


if __name__ == "__main__":
    main()
