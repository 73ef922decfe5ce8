"""Closed-form weight updates of the linear-associative-memory view (ROME, MEMIT).

The MLP output projection W is read as a key->value store. Each locate-and-edit
method is one choice of least-squares problem over it; they share this module so the
numerics (float64 solves, Cholesky with jitter, rank checks) are written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from lmpatch.model.loading import LoadedModel
    from lmpatch.stats.covariance import StatsConfig


@dataclass
class KeyCovariance:
    """The preserved-key second moment C0 of one layer and its cached factorisation."""

    matrix: torch.Tensor  # d_ff x d_ff, float32 or float64
    _chol: torch.Tensor | None = None
    _eig: tuple[torch.Tensor, torch.Tensor] | None = None
    # the explicit inverse (float64), when the caller keeps one up to date (see added_rows_inverse)
    _inverse: torch.Tensor | None = None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of C0 in float64, computed once."""
        if self._eig is None:
            c = self.matrix.double()
            self._eig = torch.linalg.eigh((c + c.T) / 2)
        return self._eig

    def null_space(self, energy: float | None = None, threshold: float | None = None) -> tuple[torch.Tensor, dict]:
        """The projector P = U0 U0ᵀ onto the directions preserved keys barely use (AlphaEdit).

        ``threshold`` is AlphaEdit's rule: eigenvalues below it, absolute. Its 2e-2 was set
        for LLaMA-3's activation scale and is not portable (on SmolLM2 it selects ~2/3 of
        all directions, holding 20-40% of the keys' energy). ``energy`` is scale-free: the
        smallest eigen-directions that together hold at most this fraction of E‖k‖².
        """
        if (energy is None) == (threshold is None):
            raise ValueError("give exactly one of energy and threshold")
        values, vectors = self.eigh()
        values = values.clamp_min(0)
        if threshold is not None:
            keep = int((values < threshold).sum())
        else:
            cumulative = torch.cumsum(values, 0) / values.sum().clamp_min(1e-30)
            keep = int((cumulative <= energy).sum())
        basis = vectors[:, :keep]
        held = float(values[:keep].sum() / values.sum().clamp_min(1e-30))
        info = {"rank": keep, "energy": held, "null_key_energy": float(values[:keep].sum())}
        return basis @ basis.T, info

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
        if self._inverse is not None:
            return self._inverse @ rhs.to(self._inverse.device, torch.float64)
        chol = self.cholesky()
        b = rhs.to(chol.device, torch.float64)
        vec = b.dim() == 1
        x = torch.cholesky_solve(b[:, None] if vec else b, chol)
        return x[:, 0] if vec else x


def added_rows_inverse(inverse: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """(A + scale·UᵀU)⁻¹ from A⁻¹ (Woodbury), U = ``rows`` (k × d), float64.

    Why: a stream of small edits adds a few preserved keys to the ridge per edit. Factorising
    the d × d ridge afresh costs O(d³) per edit (40 ms for d = 1536 here, nine matrices per
    UltraEdit edit); this costs O(d²k). Rounding accumulates with every update, so a caller
    that chains them starts afresh from a factorisation now and then."""
    u = rows.to(inverse.device, torch.float64)
    x = inverse @ u.T                                            # A⁻¹Uᵀ, d × k
    small = u @ x
    small = (small + small.T) / 2
    small.diagonal().add_(1.0 / scale)                           # I/scale + U A⁻¹ Uᵀ: SPD
    # one fused pass over the d × d inverse (symmetrising it again would cost more than the
    # update: its rounding asymmetry is what the caller's periodic restart bounds)
    return torch.addmm(inverse, x, torch.linalg.solve(small, x.T), alpha=-1.0)


def layer_covariances(model: LoadedModel, layers: Sequence[int], config: StatsConfig) -> dict[int, KeyCovariance]:
    """C0 of each layer as a :class:`KeyCovariance`, kept on ``model`` between edits.

    Why: every ROME edit needs C0⁻¹k. Reading the statistics file and factorising C0 cost
    ~0.06 s per layer, a few percent of an edit, paid again for every fact. The factor is
    remembered on the model (``model.stack.solves``) together with the statistics file it came
    from and that file's modification time, so a recomputed or deleted cache is noticed.
    Statistics computed with patches applied (never cached to disk) are not remembered.
    """
    from lmpatch.stats.covariance import second_moments

    out: dict[int, KeyCovariance] = {}
    missing: list[int] = []
    for layer in layers:
        found = model.stack.solves.get((model.fingerprint, layer, config))
        if found is not None and _file_stamp(found[0]) == found[1]:
            out[layer] = found[2]
        else:
            missing.append(layer)
    if missing:
        for layer, moment in second_moments(model, missing, config).items():
            cov = KeyCovariance(moment.matrix)
            out[layer] = cov
            stamp = _file_stamp(moment.path) if moment.path is not None else None
            if stamp is not None:
                model.stack.solves[(model.fingerprint, layer, config)] = (moment.path, stamp, cov)
    return {layer: out[layer] for layer in layers}


def _file_stamp(path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


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


SOLVE_FORMS = ("auto", "push_through", "direct")


def batch_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: KeyCovariance | None,
    weight: float,
    form: str = "auto",
    held: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's least-squares update ΔW = R Kᵀ (λC0 + K Kᵀ)⁻¹ as factors (left, right), float64.

    ``keys`` is n × d_ff and ``residuals`` n × d (one row per fact); ΔW = left @ right
    (d × n times n × d_ff, math layout out × in), so a batch of n facts is a change of
    rank ≤ n. It is the ΔW that makes the keys map to their residuals as closely as
    possible while moving the outputs of the preserved keys (C0 = E[k kᵀ], the identity
    when ``covariance`` is None) as little as possible, λ = ``weight`` trading one against
    the other.

    ``push_through`` uses (A + KᵀK)⁻¹Kᵀ = A⁻¹Kᵀ (I + K A⁻¹ Kᵀ)⁻¹ with A = λC0, so only
    C0's cached Cholesky factor and an n × n system are needed: O(d_ff²·n + n³) instead of
    the ``direct`` d_ff × d_ff factorisation, O(d_ff³), done afresh for every batch.
    ``auto`` takes push-through whenever n < d_ff.

    ``held`` (m × d_ff, optional) are keys whose outputs the update should leave where they
    are: rows of the least squares with a zero residual (scale them for their weight), so
    λC0 + KᵀK gains HᵀH. They only constrain: the change still has rank ≤ n, and its factors
    are n wide (ΔW = Rᵀ [(I + K_s A⁻¹ K_sᵀ)⁻¹ K_s A⁻¹]_{first n rows}, K_s = [K; H]).
    """
    if form not in SOLVE_FORMS:
        raise ValueError(f"unknown solve form {form!r}; choose one of {SOLVE_FORMS}")
    if not weight > 0:
        raise ValueError(f"the covariance weight must be > 0, got {weight!r}")
    k = keys.double()
    r = residuals.double().to(k.device)
    n, d_ff = k.shape
    h = held.double().to(k.device) if held is not None and held.shape[0] else None
    ks = k if h is None else torch.cat([k, h])                  # every row of the least squares
    if form == "auto":
        form = "push_through" if ks.shape[0] < d_ff else "direct"
    if form == "push_through":
        x = preserved_solve(covariance, ks.T) / weight           # A⁻¹K_sᵀ, d_ff × (n + m)
        x = x.to(k.device)
        gram = ks @ x
        gram = (gram + gram.T) / 2
        gram.diagonal().add_(1.0)                                # I + K_s A⁻¹ K_sᵀ: SPD
        if h is None:
            left = torch.linalg.solve(gram, r).T                 # R (I + K A⁻¹ Kᵀ)⁻¹ (gram symmetric)
            return left, x.T
        return r.T, torch.linalg.solve(gram, x.T)[:n]            # held rows' residuals are zero
    a = (covariance.matrix.to(k.device, torch.float64) if covariance is not None
         else torch.eye(d_ff, dtype=torch.float64, device=k.device))
    system = weight * a + ks.T @ ks
    system = (system + system.T) / 2
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        u = torch.cholesky_solve(k.T, chol)                      # (λC0 + KᵀK)⁻¹Kᵀ, d_ff × n
    else:  # C0 numerically singular in some direction no key reaches: a general solve still works
        u = torch.linalg.solve(system, k.T)
    return r.T, u.T


def preserved_solve(covariance: KeyCovariance | None, rhs: torch.Tensor) -> torch.Tensor:
    """C0⁻¹ rhs in float64 (rhs itself when there are no statistics, i.e. C0 = I)."""
    if covariance is None:
        return rhs.double()
    return covariance.solve(rhs)


def equality_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: KeyCovariance | None,
    weight: float = 1.0,
    ridge: float = 0.1,
    norm_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET's equality-constrained update ΔW = R (K C⁻¹ Kᵀ + λ_e I)⁻¹ K C⁻¹ as factors.

    It is ROME's problem for a batch: change the outputs of the preserved keys
    (C = λ_c C0 + μ I, λ_c = ``weight``, μ = ``norm_weight``) as little as possible
    *subject to* every key mapping exactly to its residual, where MEMIT only asks for it in
    least squares. With n = 1 it is ROME's rank-one update. The n × n system K C⁻¹ Kᵀ is
    ill-conditioned when two facts' keys are nearly parallel, so λ_e = ``ridge`` is added
    to its diagonal for batches (n > 1; the EMMET authors' rule), and a pseudo-inverse
    takes over if it is still singular. Note λ_c only rescales λ_e (the product is the
    effective ridge). ``keys`` n × d_ff, ``residuals`` n × d; returns (left d × n,
    right n × d_ff), float64.
    """
    if not weight > 0:
        raise ValueError(f"the covariance weight must be > 0, got {weight!r}")
    if ridge < 0 or norm_weight < 0:
        raise ValueError("ridge and norm_weight must be >= 0")
    k = keys.double()
    r = residuals.double().to(k.device)
    n = k.shape[0]
    if norm_weight > 0 and covariance is not None:
        values, vectors = covariance.eigh()          # C⁻¹ = U diag(1/(λ_c s + μ)) Uᵀ from C0's cached eigenbasis
        vectors = vectors.to(k.device)
        inv = 1.0 / (weight * values.clamp_min(0).to(k.device) + norm_weight)
        x = vectors @ (inv[:, None] * (vectors.T @ k.T))
    else:
        x = preserved_solve(covariance, k.T).to(k.device) / (weight + (norm_weight if covariance is None else 0.0))
    gram = k @ x                                     # K C⁻¹ Kᵀ, n × n
    gram = (gram + gram.T) / 2
    if n > 1:
        gram.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        left = torch.cholesky_solve(r, chol).T       # R (D + λ_e I)⁻¹, D symmetric
    else:
        left = (torch.linalg.pinv(gram, hermitian=True) @ r).T
    return left, x.T
