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
def edit_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's first positional input ``x`` by ``fn(x)``."""

    def hook(_mod, args):
        if not args:
            return None
        return (fn(args[0]),) + tuple(args[1:])

    handle = module.register_forward_pre_hook(hook)
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


def run_until(run: Callable[..., object], module: nn.Module, **inputs) -> None:
    """Call ``run(**inputs)`` (a model's forward) only as far as ``module``; hooks placed by the caller collect."""
    with stop_after(module):
        try:
            run(**inputs)
        except StopForward:
            pass


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return type(out)(_detached(x) for x in out) if not hasattr(out, "_fields") else type(out)(*map(_detached, out))
    return out


@contextmanager
def record_outputs(modules: list[nn.Module], store: list) -> Iterator[list]:
    """Append each module's whole (detached) output to ``store``, in call order, so that
    :func:`replay_outputs` can stand in for the modules later. The hooks run before any
    other forward hook of the module, so what is recorded is the module's own output,
    not one an :func:`edit_output` hook has already changed."""

    def hook(_mod, _args, out):
        store.append(_detached(out))

    handles = [m.register_forward_hook(hook, prepend=True) for m in modules]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_outputs(modules: list[nn.Module], outputs: list) -> Iterator[None]:
    """Make each module return its recorded output without computing anything.

    Only valid while the modules' inputs are exactly what they were when recorded: the
    value optimisation uses it for the layers below the edit, which the edit cannot
    reach, so each step skips them. The module's own ``forward`` is shadowed by an
    instance attribute and restored on exit.
    """
    if len(outputs) != len(modules):
        raise ValueError(f"{len(outputs)} recorded outputs for {len(modules)} modules")
    for module, out in zip(modules, outputs):
        module.forward = lambda *_a, _out=out, **_k: _out
    try:
        yield
    finally:
        for module in modules:
            del module.forward
