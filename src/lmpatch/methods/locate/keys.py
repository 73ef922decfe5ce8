"""Reading keys: the one pass every locate-and-edit method uses to see the edit point.

A key is the input of an MLP's output projection at the subject's last token; the same
pass reads the outputs of the modules a target is solved for (an MLP output, a block
output, an attention output) at that token. ROME's value optimisation, MEMIT's layer
loop and AlphaEdit's memory of earlier edits all read them here, so they agree on which
token, which module and which precision, to the bit.
"""
from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Sequence

import torch
from torch import nn

from lmpatch.model.hooks import capture_input, capture_output, run_until
from lmpatch.model.loading import LoadedModel


def read_at(
    model: LoadedModel,
    last: torch.Tensor,
    key_module: nn.Module,
    out_modules: Sequence[nn.Module],
    stop: nn.Module,
    **inputs,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass over ``inputs`` (padded rows) that stops after ``stop``.

    Returns, at each row's position ``last[i]``: the input of ``key_module``, (rows, d_ff),
    and the output of every module in ``out_modules``, each (rows, d); float32 (exact for
    float32 and bfloat16 models), each on its module's own device (a model split over
    devices keeps layers on different ones). Runs through the model's forward entry
    point, so installed additions below the edit point are seen.
    """
    keys: list[torch.Tensor] = []
    outs: list[list[torch.Tensor]] = [[] for _ in out_modules]
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(capture_input(key_module, keys))
        for module, store in zip(out_modules, outs):
            stack.enter_context(capture_output(module, store))
        run_until(partial(model.forward, body_only=True), stop, **inputs)
    return _pick(keys[0], last), [_pick(store[0], last) for store in outs]


def _pick(states: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    rows = len(last)
    states = states.reshape(rows, -1, states.shape[-1])
    pick = torch.arange(rows, device=states.device)
    return states[pick, last.to(states.device)].float()
