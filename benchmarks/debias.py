"""Debiasing: DAMA and LSDM on SmolLM2, measured on WinoBias and DAMA's bias score.

1. Each method edits on a seeded sample of DAMA's *training* prompts ("The surgeon
   laughed because"; 219 professions, none of them among the test professions).
2. Before and with each patch applied: WinoBias coreference (``--split``, test by
   default; dev is for tuning) - accuracy on pro- and anti-stereotypical sentences and
   their gap; DAMA's language-model bias score on its 1,111 test prompts (the slopes of
   P(he) - P(she) on the professions' stereotypical and factual gender scores); PIQA
   accuracy and WikiText-2 perplexity.

``--json`` prints one object with the machine, per method the numbers after and the
edit's diagnostics, and at the top level the first method's ``winobias_gap_before/after``,
``winobias_accuracy_before/after``, ``perplexity_before/after``, ``piqa_before/after``.

    OMP_NUM_THREADS=2 python benchmarks/debias.py --json
    python benchmarks/debias.py --methods lsdm --n-prompts 64 --split dev --piqa-n 200   # a quick look
"""
from __future__ import annotations

import argparse
import json
import time

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from rich.console import Console
from rich.table import Table

from lmpatch.cli.options import parse_sets
from lmpatch.eval.gender_bias import bias_scores
from lmpatch.eval.perplexity import perplexity
from lmpatch.eval.piqa import piqa_accuracy
from lmpatch.eval.winobias import winobias_scores
from lmpatch.jobs.debias import DEBIAS_METHODS, DEFAULT_PROMPTS, debias, training_prompts
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.registry import get_method

#: per-method settings chosen on WinoBias dev and training prompts (benchmarks/debias.py --split dev)
DEFAULTS: dict[str, dict] = {}


def measure(model, split: str, piqa_n: int, ppl_tokens: int) -> dict:
    t0 = time.perf_counter()
    out = {
        "winobias": winobias_scores(model, split),
        "lm_bias": bias_scores(model, "test"),
        "piqa": piqa_accuracy(model, n=piqa_n, progress=False).value if piqa_n else None,
        "perplexity": perplexity(model, max_tokens=ppl_tokens, progress=False).value,
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEBIAS_METHODS))
    ap.add_argument("--n-prompts", type=int, default=None,
                    help="training prompts edited on, a seeded sample (default: each method's, see jobs.debias; 0: all)")
    ap.add_argument("--split", default="test", choices=("test", "dev"), help="WinoBias split (dev for tuning)")
    ap.add_argument("--piqa-n", type=int, default=500)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    cpu = cpu_info()
    console.print(cpu_line(cpu))

    model = lmpatch.load_model()
    before = measure(model, args.split, args.piqa_n, args.ppl_tokens)
    console.print(f"before: WinoBias gap {before['winobias']['gap']:.3f}, accuracy {before['winobias']['accuracy']:.3f}, "
                  f"a_s {before['lm_bias']['slope_s']:.3f}, PIQA {before['piqa']}, perplexity {before['perplexity']:.2f}")
    results: dict[str, dict] = {}
    for method in [m for m in args.methods.split(",") if m]:
        mine = [s.split(".", 1)[1] for s in args.set if s.split(".", 1)[0] == method]
        hp = {**DEFAULTS.get(method, {}), **parse_sets(mine, get_method(method).hparams)}
        n = DEFAULT_PROMPTS[method] if args.n_prompts is None else args.n_prompts
        patch = debias(model, training_prompts(n, args.seed), method=method, measure=None, **hp)
        with patch.applied(model):
            after = measure(model, args.split, args.piqa_n, args.ppl_tokens)
        edit = patch.metrics.get("edit", {})
        results[method] = {"hparams": hp, "n_prompts": n, "edit_seconds": patch.metrics["debias"]["edit_seconds"], "after": after,
                           "edit": {k: v for k, v in edit.items() if k != "layers"},
                           "layers": [entry.get("layer") for entry in edit.get("layers", [])]}
        console.print(f"+ {method}: WinoBias gap {after['winobias']['gap']:.3f}, accuracy {after['winobias']['accuracy']:.3f}, "
                      f"a_s {after['lm_bias']['slope_s']:.3f}, PIQA {after['piqa']}, perplexity {after['perplexity']:.2f}, "
                      f"{results[method]['edit_seconds']:.0f} s")

    report = {"machine": cpu_line(cpu), "winobias_split": args.split,
              "before": before, "methods": results}
    if results:
        first = next(iter(results.values()))["after"]
        report.update(
            method=next(iter(results)),
            winobias_gap_before=before["winobias"]["gap"], winobias_gap_after=first["winobias"]["gap"],
            winobias_accuracy_before=before["winobias"]["accuracy"], winobias_accuracy_after=first["winobias"]["accuracy"],
            perplexity_before=before["perplexity"], perplexity_after=first["perplexity"],
            piqa_before=before["piqa"], piqa_after=first["piqa"],
        )
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return
    table = Table(title=f"Debiasing SmolLM2 with DAMA's training prompts; WinoBias {args.split}")
    for col in ("", "WB acc", "WB pro", "WB anti", "WB gap", "a_s", "a_f", "PIQA", "perplexity", "edit s"):
        table.add_column(col, justify="right")
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    for label, m, secs in [("SmolLM2", before, None)] + [(f"+ {k}", r["after"], r["edit_seconds"]) for k, r in results.items()]:
        w, b = m["winobias"], m["lm_bias"]
        table.add_row(label, fmt(w["accuracy"]), fmt(w["accuracy_pro"]), fmt(w["accuracy_anti"]), fmt(w["gap"]),
                      fmt(b["slope_s"]), fmt(b["slope_f"]), fmt(m["piqa"]), fmt(m["perplexity"], ".2f"), fmt(secs, ".0f"))
    console.print(table)


if __name__ == "__main__":
    main()
