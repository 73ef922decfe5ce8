"""Progress bars for long loops, all drawn the same way and always on stderr.

Stdout may carry ``--json`` output, so every bar goes to stderr; a disabled bar is a
no-op, so library callers that run quietly pay nothing. transformers draws tqdm bars of
its own ("Loading weights", GGUF de-quantisation, "Writing model shards") that ignore
both rules; :func:`quiet_transformers` hides them unless progress was asked for.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger(__name__)


def run_progress(enabled: bool) -> Progress:
    """A multi-task bar with elapsed time and ETA, for runners that add their own tasks."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
        console=Console(stderr=True),
    )


@contextmanager
def progress_bar(enabled: bool, label: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)`` for one counted loop (``unit`` names what is counted), or a no-op."""
    if not enabled:
        yield lambda k: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda k: bar.advance(task, k)


# What the innermost explicit quiet_transformers(show=...) asked for; None outside any.
_SHOW_TRANSFORMERS: ContextVar[bool | None] = ContextVar("lmpatch_show_transformers_bars", default=None)


@contextmanager
def quiet_transformers(show: bool | None = None) -> Iterator[None]:
    """Hide transformers' own progress bars inside the block (``show=True`` leaves them on).

    ``show=None`` follows an enclosing call (the CLI decides from ``-vv`` around a load,
    and the loader's own call must not override it) and hides the bars outside any. The
    bars are a process-wide switch in ``transformers.utils.logging``; the state found on
    entry is restored on exit, so an application that turned the bars on or off for itself
    keeps its choice after an lmpatch call.
    """
    if show is None:
        show = bool(_SHOW_TRANSFORMERS.get())
    token = _SHOW_TRANSFORMERS.set(show)
    try:
        with _transformers_bars(show):
            yield
    finally:
        _SHOW_TRANSFORMERS.reset(token)


@contextmanager
def _transformers_bars(show: bool) -> Iterator[None]:
    try:
        from huggingface_hub import utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    # transformers' switch also flips huggingface_hub's (download bars): restore both.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    if show:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        log.debug("Restoring transformers progress bars to %s", "on" if was_enabled else "off")
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        if hub_was_disabled:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()
