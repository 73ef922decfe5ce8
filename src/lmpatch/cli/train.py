"""``lmpatch train``: fit the learned part of a method on its training split, once, and cache it."""
from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import out, print_json
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, parse_sets
from lmpatch.errors import LmpatchError


def train(
    ctx: typer.Context,
    method: str = typer.Argument(..., help="Method with a learned part (see `lmpatch methods`), e.g. serac."),
    data: Optional[str] = typer.Option(None, "--data", help="Training split; each method trains on its own (see its docs)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
) -> None:
    """Train (again) and cache what a method learns, and say how long it took and how well it does."""
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import all_methods, get_method

    info = get_method(method)
    if info.train is None:
        trainable = ", ".join(m.name for m in all_methods() if m.train is not None) or "none"
        raise LmpatchError(f"{info.name} has nothing to train; methods with a learned part: {trainable}.")
    if data is not None and data not in info.training_data:
        raise LmpatchError(
            f"{info.name} trains on {' and '.join(info.training_data)} (their training records; the rest are kept "
            f"for tuning and validation); got --data {data}."
        )
    hparams = with_overrides(info.hparams, parse_sets(sets, info.hparams))
    settings: Settings = ctx.obj
    loaded, _ = load(settings, model)
    info.check_model(loaded)
    t0 = time.perf_counter()
    report = info.train(loaded, hparams, show=not as_json)
    report = {"method": info.name, "model": loaded.name, "fingerprint": loaded.fingerprint, "data": " + ".join(info.training_data),
              "wall_seconds": round(time.perf_counter() - t0, 1), **report}
    if as_json:
        print_json(json.dumps(report, default=str))
        return
    table = Table(title=f"Trained {info.name} for {loaded.name} on {report['data']}", title_justify="left", show_header=False)
    for key, value in report.items():
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            key, value = f"{key} (last of {len(value)})", value[-1]  # a validation history: its end
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key.replace("_", " "), str(value))
    out().print(table)
