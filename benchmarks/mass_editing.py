"""Mass and lifelong editing on the embedded model: batch and sequential regimes at scale.

For every method and edit count, one ``lmpatch eval`` run in its own process (so its peak
memory is its own), on ``counterfact-edit`` records (the evaluation split; ``counterfact-train``
is for tuning). Each run directory is resumable. The table printed at the end has, per
run: edit wall time (edits alone, statistics cached beforehand), peak RSS, efficacy /
paraphrase / neighbourhood scores (ROME's probability comparisons) after all edits and
before, and WikiText-2 perplexity and PIQA accuracy before and after (the collapse
detectors). ``lmpatch report`` then renders the runs side by side with their plots.

    # batch: all n edits in one update
    python benchmarks/mass_editing.py --method memit --method alphaedit --n 10 --n 100 --n 1000
    # sequential: batches of 100 accumulate; all earlier edits re-scored at checkpoints
    python benchmarks/mass_editing.py --mode sequential --batch-size 100 --method alphaedit --n 1000

The key statistics for the edited layers are computed once (``lmpatch stats``) before the
first run; that one-off cost is printed separately. The table splits each run's edit time
into the target optimisation (with how many targets the cache already held: MEMIT,
AlphaEdit and EMMET on the same facts share them) and the layer solves. For 10,000 edits,
warm the cache first with ``benchmarks/warm_targets.py`` and score a sample with
``--score-n``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lifelong import forwarding_sigterm  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.machine import cpu_info, cpu_line

COLUMNS = (
    ("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"), ("neighborhood_score", "neighbourhood"),
)


def lmpatch_cmd() -> list[str]:
    """The ``lmpatch`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("lmpatch")
    return [str(script) if script.exists() else "lmpatch"]


def run_child(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, check=True, ...)`` whose child stops when this script is killed
    (:func:`lifelong.forwarding_sigterm`)."""
    proc = subprocess.Popen(cmd, **kwargs)
    with forwarding_sigterm(proc):
        stdout, stderr = proc.communicate()
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    done.check_returncode()
    return done


def warm_statistics(method: str, console: Console) -> None:
    """Pay the one-off costs (key statistics, templates) with a one-edit run we throw away."""
    t0 = time.perf_counter()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmpatch-warm-{method}-{os.getpid()}"
    subprocess.run(
        lmpatch_cmd() + ["eval", "--method", method, "--data", "counterfact-train", "--n", "1",
                         "--metrics", "reliability", "--out", str(out), "--no-resume", "--json"],
        check=True, stdout=subprocess.DEVNULL,
    )
    console.print(f"{method}: one-off statistics + templates (if not cached yet): {time.perf_counter() - t0:.1f} s")


def run(method: str, n: int, args, console: Console) -> dict:
    name = f"{method}-{args.mode}{'-b' + str(args.batch_size) if args.mode == 'sequential' else ''}-{n}"
    out = args.out / name
    cmd = lmpatch_cmd() + [
        "eval", "--method", method, "--data", args.data, "--n", str(n), "--mode", args.mode,
        "--metrics", "counterfact,piqa,perplexity", "--piqa-n", str(args.piqa_n),
        "--ppl-tokens", str(args.ppl_tokens), "--out", str(out), "--json",
    ]
    if args.score_n:
        cmd += ["--score-n", str(args.score_n)]
    if args.mode == "sequential":
        cmd += ["--batch-size", str(args.batch_size)]
    else:
        cmd += ["--batch-size", str(n)]
    console.print(f"[bold]{name}[/bold]: lmpatch {' '.join(cmd[1:])}")
    done = run_child(cmd, stdout=subprocess.PIPE, text=True)
    summary = json.loads(done.stdout)
    summary["run"] = name
    summary["dir"] = str(out)
    return summary


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help="repeatable; default memit and alphaedit")
    ap.add_argument("--n", type=int, action="append", help="edit counts (repeatable); default 10, 100, 1000")
    ap.add_argument("--mode", choices=("batch", "sequential"), default="batch")
    ap.add_argument("--batch-size", type=int, default=100, help="sequential: edits per update")
    ap.add_argument("--data", default="counterfact-edit")
    ap.add_argument("--piqa-n", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--score-n", type=int, default=None, help="score an evenly spaced sample of this many edits")
    ap.add_argument("--out", type=Path, default=Path("runs/mass"))
    args = ap.parse_args()
    print(cpu_line(cpu_info()))  # every number below was measured on this machine
    console = Console()
    methods = args.method or ["memit", "alphaedit"]
    counts = args.n or [10, 100, 1000]
    for method in methods:
        warm_statistics(method, console)
    summaries = [run(method, n, args, console) for method in methods for n in counts]

    table = Table(title=f"{args.mode} editing on the embedded SmolLM2, {args.data}")
    for col in ("run", "n", "edit s (total)", "targets s (cached)", "solve s", "peak RSS MB", *(c[1] for c in COLUMNS),
                "perplexity", "PIQA"):
        table.add_column(col)
    for s in summaries:
        m, pre, parts = s.get("metrics", {}), s.get("metrics_pre", {}), s.get("edit_parts") or {}
        n_label = str(s.get("n")) + (f" ({s['scored']} scored)" if s.get("scored") not in (None, s.get("n")) else "")
        table.add_row(
            s["run"], n_label, fmt((s.get("edit_seconds") or {}).get("total"), 1),
            f"{fmt(parts.get('z_seconds'), 1)} ({parts.get('z_cached', 0)})", fmt(parts.get("spread_seconds"), 1),
            fmt(s.get("peak_rss_mb"), 0),
            *(f"{fmt(m.get(k))} (pre {fmt(pre.get(k))})" for k, _ in COLUMNS),
            f"{fmt(m.get('perplexity_before'), 2)} → {fmt(m.get('perplexity_after'), 2)}",
            f"{fmt(m.get('piqa_before'))} → {fmt(m.get('piqa_after'))}",
        )
    console.print(table)
    report = args.out / f"report-{args.mode}"
    subprocess.run(lmpatch_cmd() + ["report", *(s["dir"] for s in summaries), "--out", str(report)], check=True,
                   stdout=subprocess.DEVNULL)
    console.print(f"report and plots: {report}")


if __name__ == "__main__":
    main()
