"""``lmpatch edit``: compute one patch from the command line or a requests file, and save it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import out, print_json, spinner
from lmpatch.cli.jobs import check_out_path, save_or_rescue
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, check_file, default_patch_path, parse_sets
from lmpatch.cli.patches import parts_tables
from lmpatch.cli.warmup import prepare
from lmpatch.errors import LmpatchError
from lmpatch.request import EditRequest

ANSWER_TOKENS = 8


def edit(
    ctx: typer.Context,
    method: str = typer.Option("rome", "--method", help="Editing method (see `lmpatch methods`)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt the new target should follow."),
    subject: Optional[str] = typer.Option(None, "--subject", help="Subject, exactly as written in the prompt."),
    target: Optional[str] = typer.Option(None, "--target", help="New answer (target_new)."),
    target_true: Optional[str] = typer.Option(None, "--target-true", help="Current answer, if known."),
    rephrase: Optional[list[str]] = typer.Option(None, "--rephrase", help="Paraphrase of the prompt (repeatable)."),
    requests_file: Optional[Path] = typer.Option(
        None, "--requests", help="JSON/JSONL file of edit requests (or a dataset file) instead of --prompt etc."
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap prompts in the model's chat template."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Patch file to write (default: from the subject)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
    show: bool = typer.Option(True, "--show/--no-show", help="Generate greedy answers before and after the edit."),
) -> None:
    """Compute an edit as a patch file; the model on disk is never changed."""
    from lmpatch.api import edit as compute_edit
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    settings: Settings = ctx.obj
    info = get_method(method)
    overrides = parse_sets(sets, info.hparams)
    hparams = with_overrides(info.hparams, overrides)  # bad names/values fail before loading a model
    requests = _requests(prompt, subject, target, target_true, rephrase, requests_file)
    check_out_path(out_path)
    loaded, load_seconds = load(settings, model, chat=chat)
    prepare(loaded, info, hparams, show=True)
    prompts = _answer_prompts(requests) if show else []
    before = {p: loaded.generate_text(p, ANSWER_TOKENS) for p in prompts}

    t0 = time.perf_counter()
    with spinner(f"Computing {info.name} edit for {len(requests)} request(s) ..."):
        patch = compute_edit(loaded, requests, info.name, hparams)
    seconds = time.perf_counter() - t0
    after = {}
    if prompts:
        with patch.applied(loaded):
            after = {p: loaded.generate_text(p, ANSWER_TOKENS) for p in prompts}
    path = save_or_rescue(patch, out_path or default_patch_path([r.subject for r in requests], info.name,
                                                                 patch.patch_id))
    summary = patch.summary()
    result = {
        "patch_id": patch.patch_id,
        "path": str(path),
        "method": info.name,
        "model": loaded.name,
        "fingerprint": loaded.fingerprint,
        "n_requests": len(requests),
        "edit_seconds": seconds,
        "load_seconds": load_seconds,
        "deltas": [{k: d[k] for k in ("param", "kind", "shape", "rank", "norm", "stored_values")} for d in summary["deltas"]],
        "modules": [{k: m[k] for k in ("place", "type", "norm", "stored_values")} for m in summary.get("modules", [])],
        "memories": [{"type": m["type"], "entries": m["entries"], "stored_values": m["stored_values"]}
                     for m in summary.get("memories", [])],
        "metrics": summary.get("metrics", {}),
        "answers": [{"prompt": p, "before": before[p], "after": after[p]} for p in prompts],
    }
    if as_json:
        print_json(json.dumps(result, default=str))
    else:
        _print_result(result)


def _requests(prompt, subject, target, target_true, rephrase, requests_file) -> list[EditRequest]:
    inline = any(v is not None for v in (prompt, subject, target, target_true)) or bool(rephrase)
    if requests_file is not None:
        if inline:
            raise LmpatchError("Give either --requests FILE or --prompt/--subject/--target, not both.")
        from lmpatch.data.loaders import read_dataset

        # The user's own file: a bad record is a mistake to fix, not one to skip (``eval``
        # skips them in the large shipped datasets), or the patch holds fewer edits than asked.
        result = read_dataset(check_file(requests_file, "Requests file"))
        if result.skipped:
            position, reason = result.skipped[0]
            raise LmpatchError(f"{len(result.skipped)} of {result.total} records in {result.source} are not valid "
                               f"edit requests; first, record {position + 1}: {reason}")
        return list(result.requests)
    missing = [flag for flag, v in (("--prompt", prompt), ("--subject", subject), ("--target", target)) if v is None]
    if missing:
        raise LmpatchError(f"Missing {', '.join(missing)}: an edit needs --prompt, --subject and --target (or --requests FILE).")
    return [EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=target_true,
                        rephrase=tuple(rephrase or ()))]


def _answer_prompts(requests: list[EditRequest], limit: int = 6) -> list[str]:
    prompts: list[str] = []
    for r in requests:
        for p in (r.prompt, *r.rephrase):
            if p not in prompts:
                prompts.append(p)
    return prompts[:limit]


def _print_result(result: dict) -> None:
    console = out()
    console.print(
        f"[bold green]Edit computed[/] with [bold]{result['method']}[/] in [bold]{result['edit_seconds']:.1f} s[/] "
        f"for {result['n_requests']} request(s) on {result['model']}."
    )
    console.print(f"Patch [bold]{result['patch_id']}[/] saved to [bold]{result['path']}[/]")
    for table in parts_tables(result):
        console.print(table)
    if result["answers"]:
        table = Table(title="Greedy answers", title_justify="left")
        table.add_column("prompt")
        table.add_column("before")
        table.add_column("after (patched)", style="bold")
        for a in result["answers"]:
            table.add_row(a["prompt"], _one_line(a["before"]), _one_line(a["after"]))
        console.print(table)
    console.print(f"Apply it: [bold]Patch.load('{result['path']}').apply(model)[/]; inspect it: "
                  f"[bold]lmpatch inspect {result['path']}[/]")


def _one_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""

