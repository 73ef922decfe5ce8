"""Where the CLI's output goes: results on stdout, everything else on stderr.

Machine-readable output (``--json``) must be the only thing on stdout, so progress bars,
spinners, notices, log lines and error messages all go to stderr. The consoles are made
per call instead of kept in globals so that they follow ``sys.stdout``/``sys.stderr``
when those are swapped (pytest, typer's CliRunner).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from rich.console import Console
from rich.text import Text

_HANDLER_MARK = "_lmpatch_cli_handler"


def out() -> Console:
    """The console for results (tables, answers, JSON)."""
    return Console(file=sys.stdout, highlight=False)


def err() -> Console:
    """The console for progress, notices and errors."""
    return Console(file=sys.stderr, highlight=False)


def print_json(text: str) -> None:
    """Write a JSON document to stdout verbatim: no wrapping, no markup, no colour."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """One red line on stderr; soft-wrapped so narrow terminals do not split it into several."""
    first = " ".join(str(message).split()) or "error"
    err().print(Text("error: ", style="bold red") + Text(first, style="red"), soft_wrap=True)


def notice(message: str) -> None:
    """A dim informational line on stderr (one-off costs, where files went)."""
    err().print(Text(message, style="dim"), soft_wrap=True)


@contextlib.contextmanager
def spinner(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner on stderr while a long step without its own progress bar runs."""
    if not enabled:
        yield
        return
    with err().status(message, spinner="dots"):
        yield


def setup_logging(verbosity: int) -> None:
    """Route lmpatch's log records to stderr: warnings by default, ``-v`` info, ``-vv`` debug.

    Installed on the ``lmpatch`` logger (replacing the handler of an earlier invocation in
    the same process) rather than on the root logger, so embedding applications and
    pytest keep their own logging setup.
    """
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("lmpatch")
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = RichHandler(console=err(), show_time=verbosity > 1, show_path=verbosity > 1, markup=False)
    setattr(handler, _HANDLER_MARK, True)
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    _quiet_third_party(verbosity)


def _quiet_third_party(verbosity: int) -> None:
    """Keep transformers' own bars and chatter out of the CLI's layout unless asked for (-vv)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if verbosity > 1:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_info()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
