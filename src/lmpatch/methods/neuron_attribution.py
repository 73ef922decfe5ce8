"""Integrated-gradients attribution of MLP neurons: which hidden units make a model say a token.

The attribution of neuron i of layer ℓ for predicted tokens (t_j at positions p_j) is
w̄_i times the gradient of Σ_j P(t_j | position p_j), averaged over the path α·w̄ for
α ∈ (0, 1] (``steps`` Riemann points, one batch per layer), where w̄ is the neuron's
activation at those positions - the input of the MLP output projection. All positions
are scaled together: for one position this is exactly KN's attribution (Dai et al.), for
several it attributes the joint prediction of a whole string (DEPN's private tokens).
By the completeness of integrated gradients, a layer's attributions add up to the change
of the summed probability when that layer's activations at those positions go from zero
to their value.

The blocks below layer ℓ see the same input for every α, so one no-grad pass records
every block's output and each layer's pass replays the blocks below it.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch

from lmpatch.model.hooks import edit_input, record_outputs, replay_outputs
from lmpatch.model.loading import LoadedModel


def neuron_attributions(
    model: LoadedModel, ids: Sequence[int], positions: Sequence[int], tokens: Sequence[int], layers: Sequence[int],
    steps: int,
) -> torch.Tensor:
    """(len(layers), d_ff) float32 attributions for predicting ``tokens[j]`` at ``positions[j]`` of ``ids``."""
    spec = model.spec
    net = model.model
    dev = model.input_device
    batch = torch.tensor([list(ids)] * steps, device=dev)
    pos = torch.tensor(list(positions), device=dev)
    tok = torch.tensor(list(tokens), device=dev)
    alphas = torch.arange(1, steps + 1, device=dev, dtype=torch.float32) / steps
    blocks = [spec.block(net, i) for i in range(spec.n_layers)]
    recorded: list = []
    baselines: dict[int, torch.Tensor] = {}

    def keep_baseline(layer):
        def fn(x):  # (OPT feeds its MLP flattened tokens: reshape to rows first)
            baselines[layer] = x.reshape(steps, -1, x.shape[-1])[0, pos].detach().clone()
            return x
        return fn

    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(record_outputs(blocks, recorded))
        for layer in layers:
            stack.enter_context(edit_input(spec.mlp_out(net, layer), keep_baseline(layer)))
        model.forward(body_only=True, input_ids=batch, use_cache=False)
    out = torch.zeros(len(layers), spec.mlp_size)
    for row, layer in enumerate(layers):
        w = baselines[layer].float()                                           # (positions, d_ff)
        scaled = (alphas[:, None, None] * w[None]).requires_grad_(True)       # (steps, positions, d_ff)

        def swap(x, scaled=scaled):
            x3 = x.reshape(steps, -1, x.shape[-1])
            keep = torch.ones(x3.shape[1], device=x.device, dtype=x.dtype)
            keep[pos] = 0
            placed = torch.zeros_like(x3).index_copy(1, pos, scaled.to(x.dtype))
            return (x3 * keep[None, :, None] + placed).reshape(x.shape)

        with replay_outputs(blocks[:layer], recorded[:layer]), edit_input(spec.mlp_out(net, layer), swap):
            hidden = model.forward(body_only=True, input_ids=batch, use_cache=False).last_hidden_state[:, pos]
            prob = torch.softmax(model.logits(hidden).float(), dim=-1)          # (steps, positions, vocab)
            picked = prob.gather(-1, tok[None, :, None].expand(steps, -1, 1))
            (grad,) = torch.autograd.grad(picked.sum(), scaled)
        out[row] = (w * grad.mean(0)).sum(0).detach().cpu()
    return out
