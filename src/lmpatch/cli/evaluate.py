"""``lmpatch eval``: edit and score many requests, each from the original model (single regime)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import notice, out, print_json
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, default_run_dir, parse_sets
from lmpatch.cli.warmup import prepare


def evaluate(
    ctx: typer.Context,
    method: str = typer.Option("rome", "--method", help="Editing method (see `lmpatch methods`)."),
    data: str = typer.Option("counterfact", "--data", help="Dataset name (see `lmpatch datasets`) or JSON/JSONL file."),
    n: int = typer.Option(10, "--n", min=1, help="Number of requests to edit."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many requests first."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap prompts in the model's chat template."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    metrics: Optional[str] = typer.Option(
        None, "--metrics", help="Comma-separated metric groups (default: all): reliability, generalization, "
        "locality, portability, counterfact, generation."
    ),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<method>-<data>-<time>)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip requests already in OUT/records.jsonl."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Run the single-edit regime and report every metric pre and post, with its protocol."""
    from lmpatch.api import edit as compute_edit
    from lmpatch.data import load_dataset
    from lmpatch.eval import DEFAULT_METRICS, run_single
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    settings: Settings = ctx.obj
    info = get_method(method)
    hparams = with_overrides(info.hparams_cls, parse_sets(sets, info.hparams_cls))
    chosen = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else DEFAULT_METRICS
    requests = load_dataset(data, n=n, offset=offset)
    if not requests:
        from lmpatch.errors import LmpatchError

        raise LmpatchError(f"No requests in {data!r} after skipping {offset}; lower --offset.")
    run_dir = out_dir or default_run_dir(info.name, data)
    loaded, _ = load(settings, model, chat=chat)
    prepare(loaded, hparams, show=True)

    def edit_fn(m, request):
        return compute_edit(m, request, info.name, hparams)

    try:
        summary = run_single(loaded, requests, edit_fn, run_dir, resume=resume, progress=True,
                             metrics=chosen, method=info.name)
    except KeyboardInterrupt:
        notice(f"Interrupted. Finished requests are kept in {run_dir}; rerun with --out {run_dir} to resume.")
        raise
    summary = {**summary, "data": data, "offset": offset, "out_dir": str(run_dir)}
    if as_json:
        print_json(json.dumps(summary, default=str))
        return
    _print_summary(summary)
    notice(f"Records: {Path(run_dir) / 'records.jsonl'}; summary: {Path(run_dir) / 'summary.json'}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_summary(summary: dict) -> None:
    console = out()
    post, pre = summary.get("metrics", {}), summary.get("metrics_pre", {})
    counts, protocols = summary.get("counts", {}), summary.get("protocols", {})
    table = Table(
        title=f"{summary['method']} on {summary['model']}: {summary['n']} single edits from {summary['data']}",
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    table.add_column("pre", justify="right")
    table.add_column("post", justify="right", style="bold")
    table.add_column("n", justify="right")
    table.add_column("protocol", style="dim")
    for key in protocols:
        table.add_row(key, _fmt(pre.get(key)), _fmt(post.get(key)), str(counts.get(key, "")), protocols[key])
    console.print(table)
    t = summary.get("edit_seconds", {})
    if t.get("median") is not None:
        console.print(f"Edit time: median {t['median']:.2f} s, p90 {t['p90']:.2f} s, total {t['total']:.1f} s.")
