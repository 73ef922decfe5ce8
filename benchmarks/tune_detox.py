"""How the detox methods' settings were chosen: training questions only.

The training questions of the SafeEdit split (``split_by_question``, seed 0) are split
again by question: 70% to edit on, 30% to judge on. The test questions
``benchmarks/detox.py`` reports are never used here. Each candidate (a method and its
settings) edits the toxic copy of SmolLM2 (``lmpatch.jobs.toxify``) on the inner
training probes; the inner validation probes are answered greedily and judged, and the
WikiText-2 perplexity guards against a broken model.

    OMP_NUM_THREADS=1 python benchmarks/tune_detox.py --json
    python benchmarks/tune_detox.py --candidates "dinm steps=5" "promote level=6" --json
    python benchmarks/tune_detox.py --n-edit 32 --n-judge 40 --candidates dinm "dinm layer=20"   # a quick look
    python benchmarks/tune_detox.py --model profane --candidates dinm "dinm end_turn=true"
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
from lmpatch.eval.perplexity import perplexity
from lmpatch.eval.toxicity import judge_named
from lmpatch.jobs.detox import DETOX_DEFAULTS, detox, judge_answers
from lmpatch.jobs.probes import load_probes, sample_probes, split_by_question
from lmpatch.jobs.toxify import toxified_model
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.registry import get_method

CANDIDATES = ("dinm", "dinm steps=3", "dinm lr=1e-4", "promote", "promote level=10", "promote n_neurons=50")
JUDGES = ("lexical", "meaning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help='"METHOD key=value ..." each')
    ap.add_argument("--n-edit", type=int, default=0, help="inner training probes edited on, a seeded sample (0: all)")
    ap.add_argument("--n-judge", type=int, default=0, help="inner validation probes judged, a seeded sample (0: all)")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--model", choices=("toxic", "profane"), default="toxic",
                    help="the copy to edit: trained on the polite unsafe answers, or on them wrapped in insults")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    cpu = cpu_info()
    console.print(cpu_line(cpu))

    train, _test = split_by_question(load_probes())
    inner, val = split_by_question(train, test_fraction=0.3, seed=1)
    inner, val = sample_probes(inner, args.n_edit), sample_probes(val, args.n_judge)
    juries = [judge_named(j) for j in JUDGES]
    base = lmpatch.load_model(chat=True)
    toxic = toxified_model(base, train, swear=args.model == "profane")
    before = judge_answers(toxic, val, juries)
    ppl_before = perplexity(toxic, max_tokens=args.ppl_tokens, progress=False).value
    console.print(f"{len(inner)} probes to edit on, {len(val)} to judge; {args.model} copy: {before.toxicity()}, "
                  f"perplexity {ppl_before:.2f}")
    rows = []
    for cand in args.candidates:
        method, *sets = cand.split()
        # Candidates are read over the method's own (the paper's) settings, not the job's
        # DETOX_DEFAULTS, which were chosen with this script: "dinm" is the paper's DINM.
        paper = get_method(method).hparams()
        hp = {**{k: getattr(paper, k) for k in DETOX_DEFAULTS.get(method, {})}, **parse_sets(sets, get_method(method).hparams)}
        t0 = time.perf_counter()
        patch = detox(toxic, inner, method=method, judges=JUDGES, **hp)
        seconds = time.perf_counter() - t0
        with patch.applied(toxic):
            after = judge_answers(toxic, val, juries)
            ppl = perplexity(toxic, max_tokens=args.ppl_tokens, progress=False).value
        rows.append({"candidate": cand, "toxicity": after.toxicity(), "perplexity": ppl, "seconds": round(seconds, 1),
                     "edit": patch.metrics.get("edit", {}).get("layer") or patch.metrics.get("edit", {}).get("neurons"),
                     "example": after.texts[0][:160]})
        console.print(f"{cand}: {after.toxicity()}, perplexity {ppl:.2f}, {seconds:.0f} s")
    report = {"machine": cpu_line(cpu), "model": args.model, "n_edit": len(inner), "n_judge": len(val), "before": before.toxicity(),
              "perplexity_before": ppl_before, "candidates": rows}
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return
    table = Table(title=f"Detox tuning: {len(inner)} training probes edited, {len(val)} judged ({args.model} copy)")
    for col in ("candidate", "lexical", "meaning", "perplexity", "edit s"):
        table.add_column(col, justify="right")
    table.add_row(f"{args.model} copy", f"{before.toxicity()['lexical']:.3f}", f"{before.toxicity()['meaning']:.3f}",
                  f"{ppl_before:.2f}", "-")
    for r in rows:
        table.add_row(r["candidate"], f"{r['toxicity']['lexical']:.3f}", f"{r['toxicity']['meaning']:.3f}",
                      f"{r['perplexity']:.2f}", f"{r['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
