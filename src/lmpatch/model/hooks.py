"""Context managers that read or change what flows through one module.

Every method and the statistics code go through these few helpers, so hooks are
always removed (even when the body raises) and always follow the module's device.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed layer has run."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture_input(module: nn.Module, store: list, detach: bool = True) -> Iterator[list]:
    """Append the module's first positional input to ``store`` on every call."""

    def hook(_mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        store.append(x.detach() if detach else x)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def capture_output(module: nn.Module, store: list, detach: bool = True) -> Iterator[list]:
    """Append the module's (first) output to ``store`` on every call."""

    def hook(_mod, _args, out):
        y = _first(out)
        store.append(y.detach() if detach else y)

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's (first) output ``y`` by ``fn(y)``; tuple outputs keep their tail."""

    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abort the forward pass right after ``module`` runs; catch :class:`StopForward` around it."""

    def hook(_mod, _args, _out):
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, module: nn.Module, **inputs) -> None:
    """Forward ``model`` on ``inputs`` only as far as ``module`` (hooks placed by the caller collect)."""
    with stop_after(module):
        try:
            model(**inputs)
        except StopForward:
            pass
