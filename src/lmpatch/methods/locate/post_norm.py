"""Through an MLP post-norm: the output-projection change that makes a wanted residual change.

MEMIT's layer loop asks each MLP for a share ``r`` of the missing residual and solves
for a weight change that adds ``r`` to the output projection's output. That is right when
the projection's output joins the residual stream as it is (GPT-J, Llama, SmolLM2). Some
blocks normalise the MLP output first (Gemma 2/3, OLMo 2: ``h + N(W k)``, see
:attr:`~lmpatch.model.spec.LayerSpec.mlp_post_norm`). The norm discards the scale of its
input and multiplies by per-channel gains, so adding ``r`` to ``y = W k`` changes the
residual by ``N(y + r) - N(y)``, which can be anything but ``r``. On Gemma-3-270M, whose
post-norm gains are ~60x the inverse RMS of the projection's output at MEMIT's layers,
the residual changed by 2-22x what was asked, at cosine 0.5-0.9 to it.

:func:`input_change` asks the norm itself instead: it finds ``Δy`` with
``N(y + Δy) = N(y) + r`` (or as close as the norm can get; a norm's outputs lie on a
fixed surface) by Gauss-Newton on the module, so no formula of any particular norm is
assumed. Each Gauss-Newton step is the least-norm step (the direction the norm ignores,
the input's own scale, is left alone), so ``Δy`` is the smallest change found along the
way, of the order of ``y`` rather than of ``r``.
"""
from __future__ import annotations

import torch
from torch import nn


def input_change(
    norm: nn.Module,
    inputs: torch.Tensor,
    wanted: torch.Tensor,
    steps: int = 20,
    tol: float = 1e-4,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row, ``Δy`` such that ``norm(y + Δy) - norm(y) ≈ wanted``.

    ``inputs`` (n × d) are the norm's inputs y, ``wanted`` (n × d) the wanted changes of
    its outputs. Returns ``(Δy, achieved)``, float64, ``achieved`` being the change of the
    norm's output that ``Δy`` really makes. Stops when every row is within ``tol`` (relative
    to ‖wanted‖) or after ``steps`` Gauss-Newton steps. Cost: one d × d Jacobian and solve
    per row and step (``chunk`` rows at a time).
    """
    y = inputs.double()
    r = wanted.double().to(y.device)
    if y.shape != r.shape or y.dim() != 2:
        raise ValueError(f"inputs and wanted must both be n x d, got {tuple(y.shape)} and {tuple(r.shape)}")
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else y.device

    def f(x: torch.Tensor) -> torch.Tensor:
        return norm(x.to(device, dtype)).double().to(y.device)

    moves, achieved = [], []
    with torch.no_grad():
        for s in range(0, y.shape[0], chunk):
            move, got = _gauss_newton(f, y[s : s + chunk], r[s : s + chunk], steps, tol)
            moves.append(move)
            achieved.append(got)
    return torch.cat(moves), torch.cat(achieved)


def _gauss_newton(f, y: torch.Tensor, r: torch.Tensor, steps: int, tol: float):
    base = f(y)
    goal = base + r
    x = y.clone()
    err = r.norm(dim=-1)
    live = err > tol * err
    for _ in range(steps):
        if not bool(live.any()):
            break
        xs, old = x[live], err[live]
        e = goal[live] - f(xs)
        jac = _jacobian(f, xs)                                        # rows × d × d
        jt = jac.transpose(1, 2)
        a = jt @ jac
        # Levenberg damping: the directions the norm ignores (its input's scale, for a
        # LayerNorm also its mean) and the ones it all but ignores get no step, so rounding
        # noise never turns into a large move of y.
        damp = 1e-4 * a.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        a = a + damp[:, None, None] * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        step = torch.linalg.solve(a, jt @ e[..., None])[..., 0]
        # Backtracking: the longest of step, step/2, ... that lowers each row's error.
        best, best_err = xs, old
        scale = 1.0
        for _ in range(12):
            trial = xs + scale * step
            trial_err = (goal[live] - f(trial)).norm(dim=-1)
            better = trial_err < best_err
            best = torch.where(better[:, None], trial, best)
            best_err = torch.where(better, trial_err, best_err)
            if bool((best_err < old).all()):
                break
            scale /= 2
        index = live.nonzero().flatten()
        x[index] = best
        err[index] = best_err
        moved = best_err < old * (1 - 1e-4)
        live[index] = moved & (best_err > tol * r[index].norm(dim=-1))
    x = _back_to_scale(f, y, x)
    return x - y, f(x) - base


def _back_to_scale(f, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x rescaled to ‖y‖ where that leaves the norm's output as it is.

    Each least-norm step is orthogonal to the current input, so chasing a target the norm
    cannot fully reach makes ‖x‖ grow (to tens of ‖y‖ on Gemma-3-270M), although only
    x's direction matters to a scale-invariant norm. A change that large moves the outputs
    of other keys in proportion. ‖y‖·x/‖x‖ is the smallest change along x's ray that
    keeps at least y's scale; it is taken only where the norm's output stays the same
    (checked, so a norm that does depend on scale keeps x).
    """
    grown = x.norm(dim=-1) > y.norm(dim=-1)
    if not bool(grown.any()):
        return x
    scaled = x * (y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30))[:, None]
    out, back = f(x), f(scaled)
    same = (back - out).norm(dim=-1) <= 1e-4 * out.norm(dim=-1)
    return torch.where((grown & same)[:, None], scaled, x)


def _jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """∂f(x_i)/∂x_i for every row (f acts row by row), rows × d × d."""
    def row(v: torch.Tensor) -> torch.Tensor:
        return f(v[None])[0]

    with torch.enable_grad():
        try:
            return torch.func.vmap(torch.func.jacrev(row))(x)
        except Exception:  # noqa: BLE001 - a norm vmap cannot trace: one row at a time
            return torch.stack([torch.autograd.functional.jacobian(row, v) for v in x])
