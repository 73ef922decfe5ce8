"""AlphaEdit: the projector is a projector onto C0's low-energy directions, the update
never touches the preserved directions, edits already in the model keep their keys'
outputs, and the patch is low-rank and reverts exactly."""
from __future__ import annotations

import pytest
import torch

import lmpatch
from facts import REQS
from lmpatch.methods.alphaedit import AlphaEditHparams, earlier_key_moments
from lmpatch.methods.locate.solve import KeyCovariance
from lmpatch.methods.memit import edit_layers, memit_covariances
from tiny import tiny_model

FAST = dict(v_steps=3, template_lengths=((3, 2),), stats_tokens=3000, nullspace_energy=0.3)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))


def _matrix(delta) -> torch.Tensor:
    return delta.materialize(torch.float64, "cpu")


def test_null_space_projector_selects_low_energy_directions():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 0, 20, dtype=torch.float64)
    x = torch.randn(500, 20, generator=g, dtype=torch.float64) * scales
    cov = KeyCovariance(x.T @ x / 500)
    p, info = cov.null_space(energy=0.05)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    assert 0 < info["rank"] < 20 and info["energy"] <= 0.05
    assert round(float(torch.trace(p))) == info["rank"]
    values = torch.linalg.eigvalsh(cov.matrix)
    p_abs, info_abs = cov.null_space(threshold=float(values[3]) * 1.0001)
    assert info_abs["rank"] == 4
    # keys drawn like the preserved ones have little energy in P's range
    assert float((x @ p).norm() ** 2) <= 0.06 * float(x.norm() ** 2)


def test_update_never_touches_preserved_directions_and_reverts():
    model = tiny_model("llama")
    hp = AlphaEditHparams(**FAST)
    before = {n: t.detach().clone() for n, t in model.model.named_parameters()}
    patch = lmpatch.edit(model, REQS, "alphaedit", **FAST)
    layers = edit_layers(model, hp)
    covs = memit_covariances(model, layers, hp)
    assert [d.param for d in patch.deltas] == [model.spec.layers[i].mlp_out + ".weight" for i in layers]
    for layer, delta in zip(layers, patch.deltas):
        assert delta.is_low_rank and delta.rank <= len(REQS)
        p, _ = covs[layer].null_space(hp.nullspace_energy)
        dw = _matrix(delta)
        assert float(dw.norm()) > 0
        outside = dw @ (torch.eye(p.shape[0], dtype=torch.float64) - p)
        assert float(outside.norm()) <= 1e-6 * float(dw.norm())
    with patch.applied(model):
        pass
    for n, t in model.model.named_parameters():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("preserve_weight, most", [(0.0, 0.5), (1.0, 0.8)])
def test_edits_in_the_model_keep_their_keys(preserve_weight, most):
    """A second batch computed on top of the first moves the first batch's keys' outputs
    much less than the same batch computed on the bare model; reading the keys again from
    the applied patch's requests works like the remembered ones. With the C0 penalty
    (β = 1) the earlier keys weigh less in the solve, so they are protected less."""
    model = tiny_model("llama")
    fast = {**FAST, "preserve_weight": preserve_weight}
    hp = AlphaEditHparams(**fast)
    layers = edit_layers(model, hp)
    first = lmpatch.edit(model, REQS[:2], "alphaedit", **fast)
    remembered = model.stack.edit_keys[first.patch_id]
    assert set(remembered) == set(layers) and remembered[layers[0]].shape[0] == 2
    alone = lmpatch.edit(model, REQS[2:], "alphaedit", **fast)
    with first.applied(model):
        stacked = lmpatch.edit(model, REQS[2:], "alphaedit", **fast)
        assert stacked.metrics["edit"]["earlier_edits"] == 2
        recorded = earlier_key_moments(model, layers, hp)
        del model.stack.edit_keys[first.patch_id]
        reread = earlier_key_moments(model, layers, hp)
        assert set(model.stack.edit_keys[first.patch_id]) == set(layers)  # read once, then remembered
    for layer, d_alone, d_stacked in zip(layers, alone.deltas, stacked.deltas):
        old_keys = remembered[layer].double()
        moved_alone = float((old_keys @ _matrix(d_alone).T).norm())
        moved_stacked = float((old_keys @ _matrix(d_stacked).T).norm())
        assert moved_stacked < most * moved_alone, (layer, moved_stacked, moved_alone)
        assert recorded[layer].shape == reread[layer].shape
        assert float(reread[layer].norm()) > 0


@pytest.mark.parametrize("bad", [
    dict(nullspace_energy=None), dict(nullspace_threshold=0.1), dict(nullspace_energy=1.5),
    dict(l2=0.0), dict(mom2_adjustment=False), dict(preserve_weight=-1.0),
])
def test_bad_settings_are_clear_errors(bad):
    model = tiny_model("llama")
    with pytest.raises(lmpatch.LmpatchError):
        lmpatch.edit(model, REQS[:1], "alphaedit", **{**FAST, **bad})


def test_preserve_weight_penalises_moving_preserved_keys_inside_the_null_space():
    """With β > 0 the update still lies in P's range and moves the preserved keys (C0)
    less per unit of change than the paper's form."""
    model = tiny_model("llama")
    hp = AlphaEditHparams(**FAST)
    layers = edit_layers(model, hp)
    covs = memit_covariances(model, layers, hp)
    paper = lmpatch.edit(model, REQS, "alphaedit", **{**FAST, "preserve_weight": 0.0})
    pw = lmpatch.edit(model, REQS, "alphaedit", **FAST)  # default β = 1
    assert pw.metrics["edit"]["preserve_weight"] > 0 and paper.metrics["edit"]["preserve_weight"] == 0
    layer, d_paper, d_pw = layers[0], paper.deltas[0], pw.deltas[0]
    c0 = covs[layer].matrix.double()
    p, _ = covs[layer].null_space(hp.nullspace_energy)
    for dw in (_matrix(d_paper), _matrix(d_pw)):
        assert float((dw @ (torch.eye(p.shape[0], dtype=torch.float64) - p)).norm()) <= 1e-6 * float(dw.norm())

    def disturbance(dw):  # E‖ΔW k0‖² over preserved keys, per unit of update
        return float(torch.trace(dw @ c0 @ dw.T)) / float(dw.norm() ** 2)

    assert disturbance(_matrix(d_pw)) < disturbance(_matrix(d_paper))
