"""PMET and EMMET on MEMIT's loop: EMMET's solve is the equality-constrained least-squares
update (ROME for one fact), PMET optimises one vector at the attention output and one at
the MLP output and writes only the MLP's, both run and revert exactly on every
architecture (the real-model batch test of the MEMIT family is in test_memit.py)."""
from __future__ import annotations

import pytest
import torch

import lmpatch
from facts import FAST, REQS
from facts import key_problem as _problem
from lmpatch.methods.locate.solve import equality_update, rank_one_update
from lmpatch.methods.locate.values import ValueConfig, build_rows, edit_point_state, optimize_value
from lmpatch.methods.memit import edit_layers
from lmpatch.methods.pmet import PMETHparams
from lmpatch.model.hooks import capture_output
from tiny import ARCHS, tiny_model

# ----------------------------------------------------------------------------- EMMET's solve


def test_equality_update_writes_every_key_exactly_and_matches_closed_form():
    cov, keys, residuals = _problem()
    left, right = equality_update(keys, residuals, cov, weight=3.0, ridge=0.0)
    delta = left @ right                                           # d × d_ff
    torch.testing.assert_close(delta @ keys.T, residuals.T, rtol=1e-9, atol=1e-9)
    c_inv = torch.linalg.inv(3.0 * cov.matrix.double())
    k = keys.T                                                     # d_ff × n, the paper's K_E
    reference = residuals.T @ torch.linalg.inv(k.T @ c_inv @ k) @ k.T @ c_inv
    torch.testing.assert_close(delta, reference, rtol=1e-8, atol=1e-10)
    assert left.shape == (5, 4) and right.shape == (4, 12)


def test_equality_update_is_the_least_disturbing_exact_update():
    """Among all ΔW with ΔW K = R, EMMET's moves the preserved keys least (tr ΔW C0 ΔWᵀ)."""
    cov, keys, residuals = _problem(seed=2, n=3, d_ff=10, d=4)
    left, right = equality_update(keys, residuals, cov, ridge=0.0)
    best = left @ right
    c0 = cov.matrix.double()
    cost = float(torch.trace(best @ c0 @ best.T))
    g = torch.Generator().manual_seed(5)
    null = torch.linalg.svd(keys, full_matrices=True).Vh[keys.shape[0]:]   # directions no key reaches
    for _ in range(5):
        other = best + torch.randn(4, null.shape[0], generator=g, dtype=torch.float64) @ null
        torch.testing.assert_close(other @ keys.T, residuals.T, rtol=1e-9, atol=1e-9)
        assert float(torch.trace(other @ c0 @ other.T)) > cost


def test_one_fact_equality_update_is_rome():
    cov, keys, residuals = _problem(seed=3, n=1)
    left, right = equality_update(keys, residuals, cov, ridge=0.1)  # no ridge for a single fact
    r, u = rank_one_update(keys[0], keys[0], residuals[0], cov)
    torch.testing.assert_close(left @ right, r[:, None] @ u[None, :], rtol=1e-9, atol=1e-12)


def test_ridge_and_norm_penalty_and_singular_batches():
    cov, keys, residuals = _problem(seed=4)
    lam_c, lam_e, mu = 2.0, 0.5, 0.3
    left, right = equality_update(keys, residuals, cov, weight=lam_c, ridge=lam_e, norm_weight=mu)
    c_inv = torch.linalg.inv(lam_c * cov.matrix.double() + mu * torch.eye(12, dtype=torch.float64))
    k = keys.T
    reference = residuals.T @ torch.linalg.inv(k.T @ c_inv @ k + lam_e * torch.eye(4, dtype=torch.float64)) @ k.T @ c_inv
    torch.testing.assert_close(left @ right, reference, rtol=1e-8, atol=1e-10)
    # the same fact twice: K C⁻¹ Kᵀ is singular; without a ridge the pseudo-inverse still
    # gives a finite update that writes the (shared) residual
    twice = torch.cat([keys[:1], keys[:1]])
    same = torch.cat([residuals[:1], residuals[:1]])
    left, right = equality_update(twice, same, cov, ridge=0.0)
    delta = left @ right
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(delta @ keys[0], residuals[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        equality_update(keys, residuals, cov, weight=0.0)


# ----------------------------------------------------------------------------- PMET's targets


def test_attn_mlp_target_adds_one_vector_at_attention_and_one_at_mlp():
    """v_init is the MLP output at the subject's last token of the bare prompt; the result's
    delta is the MLP's, and the attention vector is optimised too (the loss moves with it)."""
    model = tiny_model("llama")
    templates = ["{}", "Hello there. {}"]
    req = REQS[0]
    spec = model.spec
    rows = build_rows(model, req, templates, ("{} is a",))
    keys, values = edit_point_state(model, rows, 1, "attn_mlp")
    assert values.shape == (1, 2, spec.hidden_size) and keys.shape == (1, 2, spec.mlp_size)
    attn_store, mlp_store = [], []
    ids = rows.prefix_ids[0].tolist() + rows.suffix_ids[0, :1].tolist()
    ids = [t for t, m in zip(ids, rows.prefix_mask[0].tolist() + [1]) if m]
    with torch.no_grad(), capture_output(spec.module(model.model, spec.layers[1].attn_out), attn_store), \
            capture_output(spec.mlp_out(model.model, 1), mlp_store):
        model.model(input_ids=torch.tensor([ids]))
    torch.testing.assert_close(values[0, 0], attn_store[0].reshape(len(ids), -1)[-1].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values[0, 1], mlp_store[0].reshape(len(ids), -1)[-1].float(), rtol=1e-4, atol=1e-5)

    cfg = ValueConfig(steps=3, target="attn_mlp", compute_dtype="float32", stop_prob=None, stop_loss=-1.0)
    both = optimize_value(model, req, 1, templates, cfg)
    mlp_only = optimize_value(model, req, 1, templates, ValueConfig(
        steps=3, target="mlp_out", compute_dtype="float32", stop_prob=None, stop_loss=-1.0))
    torch.testing.assert_close(both.v_init, values[0, 1])
    assert both.delta.shape == (spec.hidden_size,) and float(both.delta.norm()) > 0
    assert float(both.delta.norm()) <= cfg.clamp_norm_factor * float(values[0, 1].norm()) * (1 + 1e-5)
    # the attention vector is in play: the same first loss (both start at zero), then another path
    assert both.losses[0] == pytest.approx(mlp_only.losses[0]) and both.losses[1:] != mlp_only.losses[1:]


def test_pmet_spreads_the_mlp_target_with_square_root_shares(monkeypatch):
    import lmpatch.methods.locate.batch as batch

    seen = {}
    real = batch.spread_update

    def spy(*args, **kwargs):
        seen.update(target=kwargs["target"], spread=kwargs["spread"])
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "spread_update", spy)
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQS[:2], "pmet", **FAST)
    assert seen == {"target": "mlp_out", "spread": "sqrt"}
    assert PMETHparams().value_config().target == "attn_mlp"
    assert patch.method == "pmet"


# ----------------------------------------------------------------------------- both methods


@pytest.mark.parametrize("method", ["pmet", "emmet"])
@pytest.mark.parametrize("arch", ARCHS)
def test_runs_and_reverts_on_every_architecture(arch, method):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    patch = lmpatch.edit(model, REQS, method, **FAST)
    layers = edit_layers(model, PMETHparams())
    assert [d.param for d in patch.deltas] == [model.spec.layers[i].mlp_out + ".weight" for i in layers]
    params = dict(model.model.named_parameters())
    for d in patch.deltas:
        assert d.is_low_rank and d.rank <= len(REQS)
        assert d.shape == tuple(params[d.param].shape)
    for n, p in model.model.named_parameters():
        assert torch.equal(p, before[n]), n
    with patch.applied(model):
        assert all(not torch.equal(params[d.param], before[d.param]) for d in patch.deltas)
    for n, p in model.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert patch.method == method and len(patch.requests) == len(REQS)


def test_emmet_bad_settings_are_clear():
    model = tiny_model("llama")
    with pytest.raises(lmpatch.LmpatchError, match="emmet_lambda"):
        lmpatch.edit(model, REQS[:1], "emmet", emmet_lambda=-1.0, **FAST)
    with pytest.raises(lmpatch.LmpatchError, match="λ_c"):
        lmpatch.edit(model, REQS[:1], "emmet", **{**FAST, "mom2_update_weight": 0.0})
