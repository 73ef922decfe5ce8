"""A look at debias settings on tuning data only: WinoBias *dev* and perplexity.

The model is loaded and measured once; then each candidate (method, number of training
prompts, hyperparameters) edits on a seeded sample of DAMA's training prompts and is
measured with its patch applied: WinoBias dev accuracy and gap, DAMA's bias slopes on
held-apart *training* professions (the test professions are never looked at), and
WikiText-2 perplexity. The settings in ``benchmarks/debias.py`` and the methods'
defaults were chosen from this look; the reported numbers come from that benchmark, on
WinoBias test.

    OMP_NUM_THREADS=2 python benchmarks/tune_debias.py \\
        --candidates '[["lsdm", 64, {}], ["lsdm", 64, {"mom2_update_weight": 5000}]]'
"""
from __future__ import annotations

import argparse
import json
import time

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import numpy as np
from rich.console import Console

from lmpatch.eval.gender_bias import pronoun_probs, regress
from lmpatch.eval.perplexity import perplexity
from lmpatch.eval.winobias import winobias_scores
from lmpatch.jobs.debias import debias, training_prompts
from lmpatch.machine import cpu_info, cpu_line

HELD_APART = 400  # training prompts after the largest sample, for the slopes


def measure(model, held, ppl_tokens: int) -> dict:
    w = winobias_scores(model, "dev")
    probs = pronoun_probs(model, [p.prompt for p in held])
    slopes = regress(np.array([p.profession.stereotypical for p in held]),
                     np.array([p.profession.factual for p in held]), probs[:, 0] - probs[:, 1])
    return {"accuracy": w["accuracy"], "gap": w["gap"], "slope_s": slopes["slope_s"], "slope_f": slopes["slope_f"],
            "perplexity": perplexity(model, max_tokens=ppl_tokens, progress=False).value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", required=True, help='JSON list of [method, n_prompts, {hparams}]')
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    console = Console(stderr=True)
    console.print(cpu_line(cpu_info()))
    candidates = json.loads(args.candidates)
    largest = max(n for _, n, _ in candidates)
    pool = training_prompts(0, args.seed)
    held = pool[largest : largest + HELD_APART]
    model = lmpatch.load_model()
    before = measure(model, held, args.ppl_tokens)
    console.print(f"before: {before}")
    rows = [{"candidate": "before", **before}]
    for method, n, hp in candidates:
        t0 = time.perf_counter()
        patch = debias(model, pool[:n], method=method, measure=None, **hp)
        seconds = time.perf_counter() - t0
        with patch.applied(model):
            after = measure(model, held, args.ppl_tokens)
        row = {"candidate": [method, n, hp], "edit_seconds": round(seconds, 1), **after,
               "located": patch.metrics["edit"].get("located")}
        rows.append(row)
        console.print(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
