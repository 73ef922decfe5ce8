"""The ``lmpatch`` command: a typer app whose commands live in one small module each.

Error policy: a user mistake (any :class:`~lmpatch.errors.LmpatchError`, or a usage
error such as an unknown option) is one red line on stderr and exit code 2, never a traceback; anything else is a bug and keeps its
traceback. The policy lives in :class:`_Group` so it also holds when the app is driven
by typer's test runner instead of :func:`main`.
"""
from __future__ import annotations

from typing import NoReturn

import typer
from typer.core import TyperGroup

try:  # typer vendors its own click from 0.2x on; its usage errors are that click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - an older typer on the system click
    from click.exceptions import NoArgsIsHelpError, UsageError

from lmpatch.cli import (
    debias,
    demo,
    detox,
    edit,
    evaluate,
    forget,
    generate,
    listing,
    patches,
    report,
    serve,
    stats,
    train,
)
from lmpatch.cli.console import error_line, setup_logging
from lmpatch.cli.options import Settings
from lmpatch.errors import LmpatchError

USER_ERROR = 2


class _Group(TyperGroup):
    def make_context(self, info_name, args, parent=None, **extra):
        # The group's own options are parsed here, before invoke: `lmpatch --bogus`.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmpatchError as exc:
            error_line(str(exc))
            raise typer.Exit(USER_ERROR) from None
        except UsageError as exc:
            _usage_error(exc)


def _usage_error(exc: UsageError) -> NoReturn:
    """A mistyped option or an out-of-range value is a user mistake like any other: the
    same one line, not typer's boxed panel under a usage block."""
    if isinstance(exc, NoArgsIsHelpError):
        raise exc  # `lmpatch CMD` with nothing: the help itself
    hint = f" (see `{exc.ctx.command_path} -h`)" if exc.ctx is not None else ""
    error_line(f"{exc.format_message().rstrip('.')}{hint}")
    raise typer.Exit(USER_ERROR) from None


app = typer.Typer(
    cls=_Group,
    name="lmpatch",
    help="Edit what a language model knows, as patches you can save, apply and revert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # bugs get a plain traceback (rich's would print tensors as locals)
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _global(
    ctx: typer.Context,
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-v info, -vv debug)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps, or auto (spread over GPUs)."),
) -> None:
    import rich

    setup_logging(verbose)
    # Progress bars drawn by the library on rich's global console must not end up on
    # stdout, which carries --json output.
    rich.reconfigure(stderr=True)
    ctx.obj = Settings(device=device, verbosity=verbose)


app.command("demo")(demo.demo)
app.command("edit")(edit.edit)
app.command("eval")(evaluate.evaluate)
app.command("generate")(generate.generate)
app.command("forget")(forget.forget)
app.command("detox")(detox.detox)
app.command("debias")(debias.debias)
app.command("stats")(stats.stats)
app.command("train")(train.train)
app.command("inspect")(patches.inspect)
app.command("merge")(patches.merge)
app.command("methods")(listing.methods)
app.command("datasets")(listing.datasets)
app.command("report")(report.report)
app.command("serve")(serve.serve)


def main() -> None:
    """Console-script entry point (``lmpatch = lmpatch.cli:main``)."""
    app()
