"""MEND's gradient network: it rewrites each token's (input, output-gradient) pair.

Mitchell et al. (ICLR 2022) observe that a fine-tuning gradient of a linear map is a sum
of one outer product per token (:mod:`lmpatch.methods.token_grads`), and learn a small
network g that maps each pair (x_t, delta_t) to (x~_t, delta~_t); the edit is then
ΔW = -lr_m * sum_t delta~_t x~_t^T, with a learned step size lr_m per edited matrix.

The network here follows the paper's choices, with two of our own:

* its input is the concatenation [x; delta], standardised with running statistics kept
  per edited matrix (gradients of different layers differ by orders of magnitude);
* one network is shared by all matrices of the same shape (the paper's "shared"
  setting), told apart by a learned per-matrix scale and shift of its input;
* two low-rank residual layers, h + f(V U h + b), whose V starts at zero, so the network
  starts as the identity and the first edits are plain (normalised) fine-tuning steps;
* f is SiLU for the hidden layer (ours: ReLU's derivative at exactly zero is zero, so a
  zero-initialised V would never receive a gradient through it) and the identity for
  the output layer.

The output stays in standardised units: the learned step sizes absorb the scale.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["GradientNet", "RunningNorm"]


class RunningNorm(nn.Module):
    """Per-mode running mean and variance of the pairs seen in training, then frozen."""

    def __init__(self, modes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(modes, dim))
        self.register_buffer("var", torch.ones(modes, dim))
        self.register_buffer("count", torch.zeros(modes))

    @torch.no_grad()
    def update(self, mode: int, x: torch.Tensor) -> None:
        """Fold a batch of rows (n, dim) into the statistics of ``mode`` (exact pooled moments)."""
        n = x.shape[0]
        if n == 0:
            return
        m0, v0, c0 = self.mean[mode], self.var[mode], self.count[mode]
        m1, v1 = x.mean(0), x.var(0, unbiased=False)
        c = c0 + n
        delta = m1 - m0
        mean = m0 + delta * (n / c)
        var = (v0 * c0 + v1 * n + delta.square() * (c0 * n / c)) / c
        self.mean[mode], self.var[mode], self.count[mode] = mean, var, c

    def forward(self, mode: int, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[mode]) / (self.var[mode].sqrt() + 1e-8)


class _LowRankResidual(nn.Module):
    def __init__(self, dim: int, rank: int, hidden: bool) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.hidden = hidden

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.up(self.down(h))
        return h + (nn.functional.silu(z) if self.hidden else z)


class GradientNet(nn.Module):
    """g for all edited matrices of one shape (``d_in`` inputs, ``d_out`` outputs)."""

    def __init__(self, d_in: int, d_out: int, modes: int, rank: int) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(modes, dim)
        self.scale = nn.Parameter(torch.ones(modes, dim))
        self.shift = nn.Parameter(torch.zeros(modes, dim))
        self.layers = nn.ModuleList([_LowRankResidual(dim, rank, hidden=True), _LowRankResidual(dim, rank, hidden=False)])

    def forward(self, mode: int, inputs: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x~, delta~) for token rows ``inputs`` (..., d_in) and ``grads`` (..., d_out)."""
        h = self.norm(mode, torch.cat([inputs, grads], dim=-1))
        h = h * self.scale[mode] + self.shift[mode]
        for layer in self.layers:
            h = layer(h)
        return h[..., : self.d_in], h[..., self.d_in :]
