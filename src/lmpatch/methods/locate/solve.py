"""Closed-form weight updates of the linear-associative-memory view (METHODS §1).

The MLP output projection W is read as a key->value store. Each locate-and-edit
method is one choice of least-squares problem over it; they share this module so the
numerics (float64 solves, Cholesky with jitter, rank checks) are written once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeyCovariance:
    """The preserved-key second moment C0 of one layer and its cached factorisation."""

    matrix: torch.Tensor  # d_ff x d_ff, float32 or float64
    _chol: torch.Tensor | None = None

    def cholesky(self) -> torch.Tensor:
        if self._chol is None:
            c = self.matrix.double()
            eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            jitter = 0.0
            scale = float(c.diagonal().mean()) or 1.0
            while True:  # a too-small corpus leaves C0 singular: add the least jitter that works
                chol, info = torch.linalg.cholesky_ex(c + jitter * scale * eye)
                if int(info) == 0:
                    break
                jitter = 1e-8 if jitter == 0.0 else jitter * 10
            self._chol = chol
        return self._chol

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C0^{-1} rhs in float64 (rhs: vector or d_ff x n)."""
        chol = self.cholesky()
        b = rhs.to(chol.device, torch.float64)
        vec = b.dim() == 1
        x = torch.cholesky_solve(b[:, None] if vec else b, chol)
        return x[:, 0] if vec else x


def rank_one_update(
    direction_key: torch.Tensor,
    denominator_key: torch.Tensor,
    residual: torch.Tensor,
    covariance: KeyCovariance | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's update ΔW = r uᵀ as the pair (r, u), in float64.

    u = C0⁻¹k / ‖C0⁻¹k‖ spreads the change along the key direction least used by other
    facts (plain k/‖k‖ without statistics); r = residual / (k_denᵀ u) makes the edited
    matrix map ``denominator_key`` exactly to its old value plus ``residual``. ROME
    uses the bare-prompt key as ``denominator_key`` and the template average for u;
    r-ROME uses the template average for both (consistent keys).
    """
    k = direction_key.double()
    u = covariance.solve(k) if covariance is not None else k.clone()
    u = u / u.norm()
    den = torch.dot(denominator_key.double().to(u.device), u)
    r = residual.double().to(u.device) / den
    return r, u
