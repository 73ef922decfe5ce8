"""``lmpatch inspect`` and ``lmpatch merge``: looking at and baking in saved patches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from lmpatch.cli.console import out, print_json
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings


def inspect(
    patch_file: Path = typer.Argument(..., help="A .lmpatch file written by `lmpatch edit` or Patch.save."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest (plus delta norms) as JSON."),
) -> None:
    """Show what a patch file holds: method, base model, requests and its parts (weight deltas,
    added modules, retrieval memories)."""
    from lmpatch.patch import Patch

    summary = Patch.load(patch_file).summary()
    if as_json:
        print_json(json.dumps(summary, default=str))
        return
    console = out()
    console.print(f"[bold]Patch {summary['patch_id']}[/]  ({patch_file})")
    meta = Table.grid(padding=(0, 2))
    meta.add_column(style="dim")
    meta.add_column()
    for key in ("method", "model_name", "model_fingerprint", "created_at", "lmpatch_version"):
        meta.add_row(key, str(summary.get(key)))
    console.print(meta)
    console.print(requests_table(summary.get("requests", [])))
    for table in parts_tables(summary):
        console.print(table)
    hparams = summary.get("hparams") or {}
    if hparams:
        console.print(Text("hparams ", style="dim") + Text(json.dumps(hparams, default=str)), soft_wrap=True)


def requests_table(requests: list[dict]) -> Table:
    table = Table(title=f"{len(requests)} edit request(s)", title_justify="left")
    for col in ("prompt", "subject", "target_new", "target_true"):
        table.add_column(col)
    for r in requests:
        table.add_row(*(str(r.get(k) or "") for k in ("prompt", "subject", "target_new", "target_true")))
    return table


def deltas_table(deltas: list[dict]) -> Table:
    table = Table(title=f"{len(deltas)} weight delta(s)", title_justify="left")
    table.add_column("parameter", overflow="fold")
    for col in ("kind", "shape", "rank", "norm", "stored values"):
        table.add_column(col, justify="right" if col in ("rank", "norm", "stored values") else "left")
    for d in deltas:
        norm = d.get("norm")
        table.add_row(
            d["param"], d["kind"], "x".join(map(str, d["shape"])), "" if d.get("rank") is None else str(d["rank"]),
            "" if norm is None else f"{norm:.4g}", f"{d.get('stored_values', 0):,}",
        )
    return table


def parts_tables(summary: dict) -> list[Table]:
    """One table per part kind the patch holds (the weight-delta table also when it holds nothing)."""
    tables = []
    if summary.get("deltas") or not (summary.get("modules") or summary.get("memories")):
        tables.append(deltas_table(summary.get("deltas", [])))
    if summary.get("modules"):
        tables.append(modules_table(summary["modules"]))
    if summary.get("memories"):
        tables.append(memories_table(summary["memories"]))
    return tables


def modules_table(modules: list[dict]) -> Table:
    table = Table(title=f"{len(modules)} added module(s)", title_justify="left")
    table.add_column("place", overflow="fold")
    for col in ("type", "norm", "stored values"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for m in modules:
        norm = m.get("norm")
        table.add_row(m["place"], m["type"], "" if norm is None else f"{norm:.4g}", f"{m.get('stored_values', 0):,}")
    return table


def memories_table(memories: list[dict]) -> Table:
    table = Table(title=f"{len(memories)} retrieval memory(ies)", title_justify="left")
    for col in ("type", "facts", "first fact", "stored values"):
        table.add_column(col, justify="right" if col in ("facts", "stored values") else "left", overflow="fold")
    for m in memories:
        entries = m.get("entries") or []
        first = str(entries[0].get("fact", "")) if entries else ""
        table.add_row(m["type"], str(len(entries)), first, f"{m.get('stored_values', 0):,}")
    return table


def merge(
    ctx: typer.Context,
    patch_file: Path = typer.Argument(..., help="The .lmpatch file to bake in."),
    out_dir: Path = typer.Argument(..., help="New directory for the merged Hugging Face checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the one the patch records)."),
) -> None:
    """Write the base model with the patch applied as a plain Hugging Face checkpoint."""
    from lmpatch.errors import ModelLoadError
    from lmpatch.patch import Patch
    from lmpatch.progress import quiet_transformers

    settings: Settings = ctx.obj
    patch = Patch.load(patch_file)
    try:
        loaded, _ = load(settings, model or patch.model_name)
    except ModelLoadError as exc:
        if model:
            raise
        # The patch records the name the model was given by, often a path relative to
        # wherever the edit ran: from here it may name nothing.
        raise ModelLoadError(f"The patch was made on '{patch.model_name}', which cannot be loaded from here; pass "
                             f"--model with that model's directory, .gguf file or hub id. ({exc})") from exc
    with quiet_transformers(show=settings.verbosity > 1):  # "Writing model shards" bar
        path = patch.merge(loaded, out_dir)
    out().print(
        f"Merged patch [bold]{patch.patch_id}[/] into [bold]{path}[/]; it loads with "
        f"lmpatch.load_model('{path}') or transformers' from_pretrained, without lmpatch."
    )
