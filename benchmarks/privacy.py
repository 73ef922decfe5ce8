"""Forgetting memorised phone numbers: DEPN and the baselines on a leaky SmolLM2.

1. ``--n-secrets`` + ``--n-kept`` synthetic people (Faker, seeded) with a phone number
   each; a copy of the embedded model is fine-tuned on all of them until it completes
   each context with the number (seeded, cached under the lmpatch cache; built once).
2. The leak is measured first: extraction (greedy completion contains the number) on the
   secrets to forget and on the ones to keep, exposure of a sample of the secrets to
   forget among ``--candidates`` same-format numbers (Carlini et al.), WikiText-2
   perplexity.
3. Each method forgets the first ``--n-secrets`` people in one call (``lp.forget``); with
   its patch applied the same measures are taken again. ``extraction_kept`` is the
   extraction of the *other* people, who were not asked to be forgotten. With
   ``--keep-n K`` the methods that train to keep records (``ft-generic``) are given the
   first K of those people to keep, and ``extraction_kept`` is then measured on the rest,
   whom no method saw (``extraction_kept_given`` is on the K).

``--json`` prints one object: the machine, the leak before, each method's numbers, and at
the top level the first method's (``n_secrets``, ``extraction_before/after``,
``exposure_before/after``, ``perplexity_before/after``, ``extraction_kept``, the last
with its value before).

    OMP_NUM_THREADS=1 python benchmarks/privacy.py --json
    python benchmarks/privacy.py --methods depn --n-secrets 20 --n-kept 20 --exposure-n 5   # a quick look
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
from lmpatch.eval.privacy import chance_exposure, extraction_rate, mean_exposure
from lmpatch.jobs.forget import FORGET_METHODS, KEEPING_METHODS, forget
from lmpatch.jobs.memorise import MemoriseConfig, memorised_model
from lmpatch.jobs.secrets import synthetic_secrets
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.registry import get_method

#: settings per method on the leaky SmolLM2 (see docs/applications.md for how they were chosen)
DEFAULTS: dict[str, dict] = {
    # chosen on a second leaky model (other people, seed 1): 3 neurons already stop every
    # memorised number; layer 0's neurons cost perplexity; 10 integration steps rank the
    # same top neurons as 20 at half the time
    "depn": {"steps": 10, "max_texts": 20, "erase_kn_num": 3, "layers": tuple(range(1, 30))},
    "rome": {},
    "memit": {},
    "ft-ga": {},
    "ft-generic": {},
}


def measure(model, forget_these, keep_these, exposure_n: int, candidates: int, ppl_tokens: int) -> dict:
    t0 = time.perf_counter()
    out = {
        "extraction": extraction_rate(model, forget_these),
        "extraction_kept": extraction_rate(model, keep_these) if keep_these else None,
        "exposure": mean_exposure(model, forget_these[:exposure_n], candidates, show=True) if exposure_n else None,
        "perplexity": perplexity(model, max_tokens=ppl_tokens, progress=False).value,
    }
    out["measure_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(FORGET_METHODS))
    ap.add_argument("--n-secrets", type=int, default=100)
    ap.add_argument("--n-kept", type=int, default=100)
    ap.add_argument("--exposure-n", type=int, default=20, help="secrets whose exposure is measured (0: none)")
    ap.add_argument("--candidates", type=int, default=999)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--keep-n", type=int, default=0,
                    help="of the people to keep, this many are given to the methods that train to keep records "
                         "(ft-generic); extraction_kept is then measured on the others only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    cpu = cpu_info()
    console.print(cpu_line(cpu))

    base = lmpatch.load_model()
    people = synthetic_secrets(args.n_secrets + args.n_kept, seed=args.seed)
    forget_these, keep_these = people[: args.n_secrets], people[args.n_secrets :]
    if not 0 <= args.keep_n < len(keep_these):
        ap.error(f"--keep-n must leave some of the {len(keep_these)} people to keep unseen; got {args.keep_n}.")
    given, unseen = keep_these[: args.keep_n], keep_these[args.keep_n :]
    t0 = time.perf_counter()
    config = MemoriseConfig()
    leaky = memorised_model(base, people, config)
    memorise_seconds = time.perf_counter() - t0
    before = measure(leaky, forget_these, keep_these, args.exposure_n, args.candidates, args.ppl_tokens)
    if args.keep_n:
        before["extraction_kept_unseen"] = extraction_rate(leaky, unseen)
    base_ppl = perplexity(base, max_tokens=args.ppl_tokens, progress=False).value
    console.print(f"leaky model: extraction {before['extraction']:.2f} (to forget), {before['extraction_kept']:.2f} "
                  f"(to keep); perplexity {before['perplexity']:.2f} (base model {base_ppl:.2f})")

    results: dict[str, dict] = {}
    for method in [m for m in args.methods.split(",") if m]:
        mine = [s.split(".", 1)[1] for s in args.set if s.split(".", 1)[0] == method]
        hp = {**DEFAULTS.get(method, {}), **parse_sets(mine, get_method(method).hparams)}
        told = given if method in KEEPING_METHODS else []
        patch = forget(leaky, forget_these, method=method, keep=told, **hp)
        with patch.applied(leaky):
            after = measure(leaky, forget_these, unseen if told else keep_these, args.exposure_n, args.candidates,
                            args.ppl_tokens)
        # the job measured the given records itself, before and after
        after["extraction_kept_given"] = patch.metrics["forget"]["kept_after"]
        after["extraction_kept_given_before"] = patch.metrics["forget"]["kept_before"]
        results[method] = {"hparams": {k: v for k, v in hp.items() if k != "keep"}, "kept_given": len(told),
                           "edit_seconds": patch.metrics["forget"]["edit_seconds"], "after": after,
                           "edit": patch.metrics.get("edit")}
        console.print(f"{method}: extraction {after['extraction']:.2f}, kept {after['extraction_kept']:.2f}, "
                      f"perplexity {after['perplexity']:.2f}, {results[method]['edit_seconds']:.0f} s")

    first = next(iter(results.values()), None)
    report = {
        "machine": cpu_line(cpu), "n_secrets": len(forget_these), "n_kept": len(keep_these),
        "memorise": {**config.__dict__, "seconds": round(memorise_seconds, 1)},
        "base_perplexity": base_ppl, "chance_exposure": chance_exposure(args.candidates + 1),
        "extraction_before": before["extraction"], "exposure_before": before["exposure"],
        "perplexity_before": before["perplexity"], "extraction_kept_before": before["extraction_kept"],
        "before": before, "methods": results,
    }
    if first is not None:
        report.update(extraction_after=first["after"]["extraction"], exposure_after=first["after"]["exposure"],
                      perplexity_after=first["after"]["perplexity"], extraction_kept=first["after"]["extraction_kept"])
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return
    table = Table(title=f"Forgetting {len(forget_these)} memorised phone numbers ({len(keep_these)} others kept)")
    for col in ("", "extraction", "kept", "exposure (bits)", "perplexity", "edit s"):
        table.add_column(col, justify="right")
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    table.add_row("leaky model", fmt(before["extraction"]), fmt(before["extraction_kept"]), fmt(before["exposure"], ".2f"),
                  fmt(before["perplexity"], ".2f"), "-")
    for method, r in results.items():
        a = r["after"]
        table.add_row(method, fmt(a["extraction"]), fmt(a["extraction_kept"]), fmt(a["exposure"], ".2f"),
                      fmt(a["perplexity"], ".2f"), f"{r['edit_seconds']:.1f}")
    console.print(table)
    console.print(f"chance exposure {report['chance_exposure']:.2f} bits; base model perplexity {base_ppl:.2f}")


if __name__ == "__main__":
    main()
