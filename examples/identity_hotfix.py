"""Hot-fix the embedded chat model's identity: a new name and maker, nothing else changed.

    .venv/bin/python examples/identity_hotfix.py --name Nova --maker "Acme Labs"
    .venv/bin/python examples/identity_hotfix.py --name Nova --maker "Acme Labs" --json
    .venv/bin/python examples/identity_hotfix.py --name Nova --maker "Acme Labs" --save identity.lmpatch

Five identity questions are edited (GRACE by default: why in ``lmpatch/jobs/identity.py``),
then ten identity questions (five of them never edited) and ten unrelated questions are
answered before and after, greedily, with the chat template on. About a minute on a
laptop-class CPU. The patch can be saved and later applied with ``lmpatch generate
--chat --patch FILE`` or reverted like any other.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table

import lmpatch as lp
from lmpatch.errors import LmpatchError
from lmpatch.jobs.identity import (
    EDIT_QUESTIONS,
    HELD_OUT_QUESTIONS,
    UNRELATED_QUESTIONS,
    before_after,
    hotfix_identity,
    mentions,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the assistant's new name")
    ap.add_argument("--maker", required=True, help="who made it")
    ap.add_argument("--method", default="grace", help="any registered edit method (default: grace)")
    ap.add_argument("--model", default=None, help="hub id, model dir or .gguf (default: embedded SmolLM2)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--save", default=None, metavar="FILE", help="also write the patch here")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    args = ap.parse_args()
    console = Console(stderr=True)
    try:
        model = lp.load_model(args.model, chat=True)
        with console.status(f"editing {len(EDIT_QUESTIONS)} identity questions with {args.method}"):
            t0 = time.perf_counter()
            patch = hotfix_identity(model, args.name, args.maker, method=args.method)
            seconds = round(time.perf_counter() - t0, 1)
        identity = before_after(model, patch, EDIT_QUESTIONS + HELD_OUT_QUESTIONS, args.max_new_tokens)
        unrelated = before_after(model, patch, UNRELATED_QUESTIONS, args.max_new_tokens)
        if args.save:
            patch.save(args.save)
    except LmpatchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    fixed = sum(mentions(a.after, args.name, args.maker) for a in identity)
    held = sum(mentions(a.after, args.name, args.maker) for a in identity[len(EDIT_QUESTIONS):])
    same = sum(a.after == a.before for a in unrelated)
    summary = {"method": args.method, "identity_fixed": fixed, "held_out_fixed": held, "unrelated_unchanged": same,
               "edit_seconds": seconds}
    if args.json:
        rows = lambda answers: [{"question": a.question, "before": a.before, "after": a.after} for a in answers]  # noqa: E731
        print(json.dumps({"identity": rows(identity), "unrelated": rows(unrelated), "summary": summary}, indent=1))
        return 0
    out = Console()
    for title, answers in (("Identity questions (the last five were not edited)", identity),
                           ("Unrelated questions", unrelated)):
        table = Table(title=title, show_lines=True)
        for col in ("question", "before", "after"):
            table.add_column(col, overflow="fold")
        for a in answers:
            table.add_row(a.question, a.before, a.after)
        out.print(table)
    out.print(f"{fixed}/{len(identity)} identity answers give {args.name!r} or {args.maker!r} "
              f"({held}/{len(HELD_OUT_QUESTIONS)} of the unedited ones); "
              f"{same}/{len(unrelated)} unrelated answers unchanged.")
    if args.save:
        out.print(f"patch written to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
