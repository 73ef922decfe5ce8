"""``lmpatch debias``: a patch that weakens the profession-to-pronoun gender stereotype."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import out, spinner
from lmpatch.cli.jobs import check_out_path, save_job_patch
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, check_file, parse_sets
from lmpatch.errors import LmpatchError


def debias(
    ctx: typer.Context,
    data: str = typer.Option("dama-train", "--data",
                             help='Prompts: "dama-train" (shipped) or a JSON/JSONL file of {"prompt", "subject"} records.'),
    method: str = typer.Option("lsdm", "--method", help="lsdm (default) or dama."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", min=0,
                                            help="Seeded sample of the shipped prompts (default: dama 128, lsdm 64; 0: all 2,409)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt sample."),
    measure: str = typer.Option("test", "--measure", help="WinoBias split to score on before and after: test, dev or none."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Patch file to write (default: debias-METHOD-N.lmpatch)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
) -> None:
    """Edit the model so pronouns stop following profession stereotypes; measure WinoBias and DAMA's score."""
    from lmpatch.data.jsonio import read_records
    from lmpatch.eval.winobias import SPLITS
    from lmpatch.jobs.debias import DEBIAS_METHODS, DEFAULT_PROMPTS, debias_requests, training_prompts
    from lmpatch.jobs.debias import debias as run_debias
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    if method not in DEBIAS_METHODS:
        raise LmpatchError(f"Unknown debias method {method!r}; choose one of {', '.join(DEBIAS_METHODS)}.")
    if measure not in (*SPLITS, "none"):
        raise LmpatchError(f"Unknown --measure {measure!r}; choose test, dev or none.")
    info = get_method(method)
    overrides = parse_sets(sets, info.hparams)
    with_overrides(info.hparams, overrides)  # bad names/values fail before loading a model
    if data == "dama-train":
        requests = debias_requests(training_prompts(DEFAULT_PROMPTS[method] if n_prompts is None else n_prompts, seed))
    else:
        requests = debias_requests(read_records(check_file(Path(data), "Debias prompts file")))
        if not requests:
            raise LmpatchError(f"{data} holds no prompts.")
    settings: Settings = ctx.obj
    check_out_path(out_path)
    loaded, _ = load(settings, model, show=not as_json)
    patch = run_debias(loaded, requests, method=method, measure=None if measure == "none" else measure,
                       stage=lambda message: spinner(message, enabled=not as_json), **overrides)
    report = save_job_patch(patch, "debias", method, len(requests), out_path, loaded, as_json)
    if as_json:
        return
    path = report["path"]
    console = out()
    if "before" in report:
        before, after = report["before"], report["after"]
        table = Table(title=f"{method} on {loaded.name}, edited on {len(requests)} prompts", title_justify="left")
        table.add_column("measure")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        rows = [
            (f"WinoBias {measure}: accuracy", "winobias", "accuracy"),
            ("WinoBias gap (pro - anti; 0 = unbiased)", "winobias", "gap"),
            ("LM bias: stereotype slope a_s (0 = unbiased)", "lm_bias", "slope_s"),
            ("LM bias: factual slope a_f (keep)", "lm_bias", "slope_f"),
        ]
        for label, part, key in rows:
            table.add_row(label, f"{before[part][key]:.3f}", f"{after[part][key]:.3f}")
        console.print(table)
    console.print(f"Edit time {report['edit_seconds']:.1f} s. Patch: [bold]{path}[/] "
                  f"(apply with `lmpatch generate --patch {path} ...` or Patch.load(...).apply(model)).")
