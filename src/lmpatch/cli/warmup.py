"""Computing a method's one-off cached assets up front, where the user can see them.

Locate-and-edit methods need sampled context templates and key statistics (C0), learned
editors a trained network: each computed once per model and cached. Inside
``lmpatch.edit`` that cost would appear as an unexplained first edit taking a minute, and
its progress bar would fight with the CLI's spinner for the terminal. Each method
declares its one-off work (``Method.prepare``); doing it here first lets the CLI say what
is happening, that it is one-off, and where the result is cached.
"""
from __future__ import annotations

import time
from typing import Any

from lmpatch.cli.console import notice, spinner
from lmpatch.methods.registry import Method
from lmpatch.model.context import memories_paused
from lmpatch.model.loading import LoadedModel


def prepare(model: LoadedModel, method: Method, hparams: Any, show: bool = True) -> list[str]:
    """Run whatever one-off work ``method`` needs on ``model`` that is not cached yet; say what was done."""
    done: list[str] = []
    for job in method.one_offs(model, hparams):
        if job.done():
            continue
        if show:
            notice(f"One-off: {job.what} (cached in {job.where}; later runs skip this).")
        t0 = time.perf_counter()
        with spinner(f"{job.what[0].upper()}{job.what[1:]} ...", enabled=show and not job.draws_progress):
            with memories_paused():  # one-off statistics read the model itself
                job.run(show)
        done.append(f"{job.what}: {time.perf_counter() - t0:.1f} s")
    if show and done:
        notice("One-off work done: " + "; ".join(done) + ".")
    return done
