"""``lmpatch detox``: a patch that makes a chat model answer adversarial prompts safely."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import out, spinner
from lmpatch.cli.jobs import check_out_path, save_job_patch
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, parse_sets
from lmpatch.errors import LmpatchError


def detox(
    ctx: typer.Context,
    data: str = typer.Option("safeedit-detox", "--data",
                             help='Probes: "safeedit-detox" (shipped) or a JSON/JSONL file of {"input", "question", "category"} records.'),
    method: str = typer.Option("dinm", "--method", help="dinm (default; this job tunes 3 layers at lr 2e-3 - --set n_layers=1 --set lr=5e-4 gives the paper's settings) or promote."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2, chat template on)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    test_fraction: float = typer.Option(0.5, "--test-fraction", min=0.0, max=0.95,
                                        help="Share of questions held out to measure on (0: edit on all, measure nothing)."),
    n_test: int = typer.Option(0, "--n-test", min=0, help="Measure on a seeded sample of this many test probes (0: all)."),
    judges: str = typer.Option("lexical,meaning", "--judges", help="Comma-separated toxicity judges: lexical, meaning."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split by question."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Patch file to write (default: detox-METHOD-N.lmpatch)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
) -> None:
    """Edit the model towards safe answers on training probes; measure toxicity on held-out ones."""
    from lmpatch.eval.toxicity import JUDGES
    from lmpatch.jobs.detox import DETOX_METHODS
    from lmpatch.jobs.detox import detox as run_detox
    from lmpatch.jobs.probes import load_probes, sample_probes, split_by_question
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    if method not in DETOX_METHODS:
        raise LmpatchError(f"Unknown detox method {method!r}; choose one of {', '.join(DETOX_METHODS)}.")
    names = [j.strip() for j in judges.split(",") if j.strip()]
    bad = [j for j in names if j not in JUDGES]
    if bad or not names:
        raise LmpatchError(f"Unknown toxicity judge {bad[0] if bad else judges!r}; choose from {', '.join(JUDGES)}.")
    info = get_method(method)
    overrides = parse_sets(sets, info.hparams)
    with_overrides(info.hparams, overrides)  # bad names/values fail before loading a model
    probes = load_probes(data)
    if test_fraction > 0:
        train, test = split_by_question(probes, test_fraction, seed)
    else:
        train, test = list(probes), []
    if not train:
        raise LmpatchError("No training probes left after the split; lower --test-fraction.")
    test = sample_probes(test, n_test, seed)
    settings: Settings = ctx.obj
    check_out_path(out_path)
    loaded, _ = load(settings, model, chat=True, show=not as_json)
    with spinner(f"Detoxifying with {method} on {len(train)} probes, measuring on {len(test)} ...", enabled=not as_json):
        patch = run_detox(loaded, train, method=method, test_probes=test, judges=names, **overrides)
    report = save_job_patch(patch, "detox", method, len(train), out_path, loaded, as_json)
    if as_json:
        return
    path = report["path"]
    console = out()
    if test:
        table = Table(title=f"{method} on {loaded.name}: toxicity on {len(test)} held-out probes", title_justify="left")
        table.add_column("judge")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for name in names:
            table.add_row(name, f"{report['toxicity_before'][name]:.3f}", f"{report['toxicity_after'][name]:.3f}")
        console.print(table)
    console.print(f"Edited on {report['n_train']} probes in {report['edit_seconds']:.1f} s. Patch: [bold]{path}[/] "
                  f"(apply with `lmpatch generate --chat --patch {path} ...` or Patch.load(...).apply(model)).")
