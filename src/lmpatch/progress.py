"""Progress bars for long loops, all drawn the same way and always on stderr.

Stdout may carry ``--json`` output, so every bar goes to stderr; a disabled bar is a
no-op, so library callers that run quietly pay nothing. transformers draws tqdm bars of
its own ("Loading weights", GGUF de-quantisation, "Writing model shards") that ignore
both rules; :func:`quiet_transformers` hides them unless progress was asked for.
"""
from __future__ import annotations

import logging
import time
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


class _Progress(Progress):
    """Rich's bar on a terminal; elsewhere (CI, ``nohup``, ``2> log``) also one plain line per
    task every ``every`` seconds. Rich draws a bar on a non-terminal only once, when it
    stops, so an hour of training in a log file showed nothing until it was over."""

    def __init__(self, *columns, every: float = 60.0, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._plain = not self.disable and not self.console.is_terminal
        self._every = every
        self._said: dict = {}

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def _say(self, task_id) -> None:
        if not self._plain:
            return
        with self._lock:
            task = self._tasks[task_id]
            now = time.monotonic()
            if task.finished or now - self._said.get(task_id, task.start_time or now) < self._every:
                return
            self._said[task_id] = now
            total = f"/{task.total:g}" if task.total is not None else ""
            eta = f", eta {task.time_remaining:.0f} s" if task.time_remaining is not None else ""
            line = f"{task.description}: {task.completed:g}{total} after {task.elapsed or 0:.0f} s{eta}"
        self.console.print(line, markup=True, highlight=False, soft_wrap=True)


def run_progress(enabled: bool) -> Progress:
    """A multi-task bar with elapsed time and ETA, for runners that add their own tasks."""
    return _Progress(
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
    with _Progress(*columns, console=Console(stderr=True)) as bar:
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
