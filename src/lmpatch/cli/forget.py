"""``lmpatch forget``: a patch that makes a model stop completing private strings."""
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


def forget(
    ctx: typer.Context,
    secrets_file: Optional[Path] = typer.Option(
        None, "--secrets", help='JSONL file of {"context": ..., "secret": ..., "subject": ...} records.'),
    context: Optional[str] = typer.Option(None, "--context", help="Text that leads to the secret (with --secret)."),
    secret: Optional[str] = typer.Option(None, "--secret", help="The private string to forget."),
    keep_file: Optional[Path] = typer.Option(
        None, "--keep", help="JSONL file of records (same fields) the model must go on completing (ft-generic)."),
    method: str = typer.Option("depn", "--method", help="depn (default), rome, memit, ft-ga or ft-generic."),
    refusal: str = typer.Option("private", "--refusal", help="What rome/memit write instead of the secret."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    exposure: int = typer.Option(0, "--exposure", min=0, help="Also measure exposure among this many same-format strings."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Patch file to write (default: forget-METHOD-N.lmpatch)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
) -> None:
    """Compute a patch that stops the model from giving away the secrets, and measure it."""
    from lmpatch.jobs.forget import FORGET_METHODS, KEEPING_METHODS
    from lmpatch.jobs.forget import forget as run_forget
    from lmpatch.jobs.secrets import Secret, read_secrets
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    if method not in FORGET_METHODS:
        raise LmpatchError(f"Unknown forget method {method!r}; choose one of {', '.join(FORGET_METHODS)}.")
    if keep_file is not None and method not in KEEPING_METHODS:
        raise LmpatchError(f"--keep needs a method that trains to keep records ({', '.join(KEEPING_METHODS)}), "
                           f"not {method}.")
    if (secrets_file is None) == (context is None and secret is None):
        raise LmpatchError("Give either --secrets FILE.jsonl or --context and --secret, not both or neither.")
    if secrets_file is not None:
        secrets = read_secrets(check_file(secrets_file, "Secrets file"))
    elif context is None or secret is None:
        raise LmpatchError("--context and --secret go together: give both.")
    elif not context.strip() or not secret.strip():
        raise LmpatchError(f"--{'context' if not context.strip() else 'secret'} is empty: give the text.")
    else:
        secrets = [Secret(context, secret)]
    keep = read_secrets(check_file(keep_file, "Keep file")) if keep_file is not None else []
    info = get_method(method)
    overrides = parse_sets(sets, info.hparams)
    with_overrides(info.hparams, overrides)  # bad names/values fail before loading a model
    settings: Settings = ctx.obj
    check_out_path(out_path)
    loaded, _ = load(settings, model, show=not as_json)
    with spinner(f"Forgetting {len(secrets)} secret(s) with {method} ...", enabled=not as_json):
        patch = run_forget(loaded, secrets, method=method, refusal=refusal, exposure_candidates=exposure, keep=keep,
                           **overrides)
    report = save_job_patch(patch, "forget", method, len(secrets), out_path, loaded, as_json)
    if as_json:
        return
    path = report["path"]
    table = Table(title=f"{method} on {loaded.name}: {len(secrets)} secret(s)", title_justify="left")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("extraction (greedy completion contains the secret)",
                  f"{report['extraction_before']:.3f}", f"{report['extraction_after']:.3f}")
    if report["kept_before"] is not None:
        table.add_row(f"extraction of the {report['n_kept']} record(s) to keep",
                      f"{report['kept_before']:.3f}", f"{report['kept_after']:.3f}")
    if report["exposure_before"] is not None:
        table.add_row(f"mean exposure among {exposure} same-format strings (bits)",
                      f"{report['exposure_before']:.2f}", f"{report['exposure_after']:.2f}")
    console = out()
    console.print(table)
    console.print(f"Edit time {report['edit_seconds']:.1f} s. Patch: [bold]{path}[/] "
                  f"(apply with `lmpatch generate --patch {path} ...` or Patch.load(...).apply(model)).")
