"""How the identity hot-fix's method and settings were chosen: tuning questions only.

Each candidate (a method and its settings) edits the five identity questions of
``lmpatch.jobs.identity.EDIT_QUESTIONS``; then the tuning questions are answered
greedily with the chat template on: eight other identity questions (does the answer
give the new name or maker?) and sixteen unrelated ones (is the answer unchanged?).
The questions the example reports are never used here.

    OMP_NUM_THREADS=1 python benchmarks/tune_identity.py
    python benchmarks/tune_identity.py --candidates "grace eps_init=10" "grace eps_init=15" --json
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
from lmpatch.jobs.identity import (
    EDIT_QUESTIONS,
    TUNING_IDENTITY,
    TUNING_UNRELATED,
    before_after,
    hotfix_identity,
    mentions,
)
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.registry import get_method

CANDIDATES = ("ft-m", "memit", "wise", "serac", "ike", "grace eps_init=1", "grace eps_init=10",
              "grace eps_init=15", "grace eps_init=20")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help='"METHOD key=value ..." each')
    ap.add_argument("--name", default="Nova")
    ap.add_argument("--maker", default="Acme Labs")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model(chat=True)
    rows = []
    for candidate in args.candidates:
        method, *sets = candidate.split()
        hp = parse_sets(sets, get_method(method).hparams)
        t0 = time.perf_counter()
        patch = hotfix_identity(model, args.name, args.maker, method=method, **hp)
        seconds = time.perf_counter() - t0
        edited = before_after(model, patch, EDIT_QUESTIONS, args.max_new_tokens)
        identity = before_after(model, patch, TUNING_IDENTITY, args.max_new_tokens)
        unrelated = before_after(model, patch, TUNING_UNRELATED, args.max_new_tokens)
        row = {"candidate": candidate, "edit_seconds": round(seconds, 1),
               "edited_fixed": sum(mentions(a.after, args.name, args.maker) for a in edited),
               "paraphrases_fixed": sum(mentions(a.after, args.name, args.maker) for a in identity),
               "unrelated_unchanged": sum(a.after == a.before for a in unrelated)}
        rows.append(row)
        console.print(row)
    if args.json:
        print(json.dumps({"machine": cpu_line(cpu_info()), "n_edited": len(EDIT_QUESTIONS),
                          "n_paraphrases": len(TUNING_IDENTITY), "n_unrelated": len(TUNING_UNRELATED),
                          "results": rows}, indent=1))
        return
    table = Table(title="Identity hot-fix candidates on the tuning questions")
    for col in ("candidate", f"edited /{len(EDIT_QUESTIONS)}", f"paraphrases /{len(TUNING_IDENTITY)}",
                f"unrelated unchanged /{len(TUNING_UNRELATED)}", "edit s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["candidate"], str(r["edited_fixed"]), str(r["paraphrases_fixed"]),
                      str(r["unrelated_unchanged"]), f"{r['edit_seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
