"""``lmpatch methods`` and ``lmpatch datasets``: what can be used, and how to set it."""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import out, print_json


def methods(
    name: Optional[str] = typer.Argument(None, help="Show this method's hyperparameters (for --set)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List editing methods, or one method's hyperparameters and their defaults."""
    from lmpatch.methods.registry import all_methods, get_method

    if name is None:
        infos = all_methods()
        if as_json:
            # "hparams" has one shape whether one method or all are listed: the rows of its settings.
            print_json(json.dumps([{**i.capabilities(), "hparams": hparam_rows(i.hparams)} for i in infos],
                                  default=str))
            return
        table = Table(title="Editing methods", title_justify="left")
        table.add_column("method", style="bold cyan")
        table.add_column("what it does")
        table.add_column("regimes")
        table.add_column("patch holds")
        table.add_column("T5")
        for info in infos:
            caps = info.capabilities()
            table.add_row(info.name, info.summary, ", ".join(caps["regimes"]), ", ".join(caps["produces"]),
                          "yes" if caps["encoder_decoder"] else "-")
        out().print(table)
        out().print("T5: also edits encoder-decoder (T5-style) models; the others edit decoder-only models.")
        out().print("Hyperparameters: [bold]lmpatch methods NAME[/]; override with [bold]--set key=value[/].")
        return
    info = get_method(name)
    rows = hparam_rows(info.hparams)
    if as_json:
        print_json(json.dumps({**info.capabilities(), "hparams": rows}, default=str))
        return
    table = Table(title=f"{info.name}: {info.summary}", title_justify="left")
    table.add_column("hyperparameter", style="bold cyan")
    table.add_column("type")
    table.add_column("default")
    for row in rows:
        table.add_row(row["name"], row["type"], "derived from the model" if row["default"] is None else repr(row["default"]))
    out().print(table)


def hparam_rows(cls: type) -> list[dict]:
    """Name, readable type and default of each field of a hyperparameter dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append({"name": f.name, "type": _type_name(hints.get(f.name)), "default": default})
    return rows


def _type_name(hint) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    plain = isinstance(hint, type) and typing.get_origin(hint) is None
    return hint.__name__ if plain else text


def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the datasets shipped with lmpatch (usable as --data / --requests by name)."""
    from lmpatch.data import dataset_descriptions

    described = dataset_descriptions()
    if as_json:
        print_json(json.dumps([{"name": k, "description": v} for k, v in described.items()]))
        return
    table = Table(title="Shipped datasets", title_justify="left")
    table.add_column("name", style="bold cyan")
    table.add_column("description")
    for key, text in described.items():
        table.add_row(key, text)
    out().print(table)
    out().print("Any JSON/JSONL file of edit records works too (ROME, EasyEdit, zsRE/MEND or lmpatch format).")
