"""The survey's main comparison (Yao et al. 2023, "Editing Large Language Models: Problems,
Methods, and Opportunities", Tables 1-3) on the embedded model, for every method lmpatch has.

One command, fixed records, fixed seeds:

* CounterFact: the first ``--n-cf`` ROME-schema cases that are *not* in
  ``counterfact-train`` (hyperparameters were tuned on that split only), with their
  portability (subject alias, one hop) and side-effect probes (other attribution,
  distracting neighbourhood) and generation prompts for fluency.
* zsRE: the first ``--n-zsre`` records of the MEND eval split, with one-hop, subject-replace
  and inverse-relation portability where the Yao et al. files annotate them.

Both datasets are also scored "in the wild" (QAEdit's protocol: the prompt alone, greedy,
the answer cut at the first "." or newline and exact-matched after SQuAD normalisation;
``reliability_wild``, ``generalization_wild``, ``locality_wild``), next to the survey's
teacher-forced numbers that it shows to be optimistic.

Each (dataset, method) pair is one resumable single-regime run directory under ``--out``;
PIQA (first ``--piqa-n`` items) is measured before editing and with the first
``--piqa-updates`` edits applied. Fluency (100 greedy tokens per generation prompt, pre and
post) is the slowest metric, so it is its own run over the first ``--fluency-n``
CounterFact records. The table
is rendered by ``lmpatch report`` (markdown to stdout; report.md/.html and plots under
``--out/report``).

    python benchmarks/survey_table.py --n-cf 100 --n-zsre 100
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from rich.console import Console

import lmpatch
from lmpatch.data import case_ids, drop_cases, load_dataset
from lmpatch.eval.runner import run_independent
from lmpatch.eval.tasks import TaskConfig, build_tasks
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.registry import method_names
from lmpatch.report import write_report

CF_METRICS = ("reliability", "generalization", "locality", "portability", "side_effects", "counterfact", "wild")
ZSRE_METRICS = ("reliability", "generalization", "locality", "portability", "side_effects", "wild")


def counterfact_records(n: int) -> list[lmpatch.EditRequest]:
    """Held-out CounterFact: never seen by benchmarks/tune_rome.py."""
    return drop_cases(load_dataset("counterfact"), case_ids(load_dataset("counterfact-train")))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help=f"repeatable; default: all ({', '.join(method_names())})")
    ap.add_argument("--n-cf", type=int, default=100)
    ap.add_argument("--n-zsre", type=int, default=100)
    ap.add_argument("--piqa-n", type=int, default=100, help="PIQA validation items per measurement")
    ap.add_argument("--piqa-updates", type=int, default=1, help="edits after which PIQA is measured (averaged)")
    ap.add_argument("--fluency-n", type=int, default=20,
                    help="CounterFact records whose generations are scored for fluency (100 tokens each, pre and "
                    "post: the slowest metric, so measured on the first records only; 0 = skip)")
    ap.add_argument("--out", type=Path, default=Path("runs/survey"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    torch.manual_seed(0)
    model = lmpatch.load_model()
    tasks = build_tasks(["piqa"], TaskConfig(piqa_n=args.piqa_n))
    cf = counterfact_records(args.n_cf)
    datasets = [
        ("counterfact", cf, CF_METRICS, "counterfact"),
        ("zsre", load_dataset("zsre", n=args.n_zsre), ZSRE_METRICS, "zsre"),
    ]
    if args.fluency_n:
        datasets.append(("counterfact", cf[: args.fluency_n], ("fluency",), "counterfact-fluency"))
    run_dirs = []
    for data, requests, metrics, label in datasets:
        for method in args.method or method_names():
            run_dir = args.out / f"{label}-{method}"
            t0 = time.perf_counter()
            console.print(f"[bold]{method}[/] on {len(requests)} {data} records -> {run_dir}")
            summary = run_independent(
                model, requests, lambda m, r, method=method: lmpatch.edit(m, r, method), run_dir,
                method=method, metrics=metrics, tasks=None if label.endswith("fluency") else tasks,
                task_updates=args.piqa_updates,
            )
            _stamp_data(run_dir, summary, data)
            console.print(f"  done in {time.perf_counter() - t0:.0f} s")
            run_dirs.append(run_dir)
    files = write_report(run_dirs, args.out / "report")
    Console().print(files.table_markdown, markup=False, highlight=False, soft_wrap=True)
    console.print(f"Report: {files.markdown} and {files.html}")


def _stamp_data(run_dir: Path, summary: dict, data: str) -> None:
    """Name the dataset in summary.json so the report's column headers say which it is."""
    from lmpatch.eval.records import SUMMARY_FILE
    from lmpatch.fileio import atomic_write_json

    atomic_write_json(run_dir / SUMMARY_FILE, {**summary, "data": data})


if __name__ == "__main__":
    main()
