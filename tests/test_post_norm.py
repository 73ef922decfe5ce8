"""MLP post-norms (Gemma 2/3): found by dataflow in the spec, and MEMIT's layer loop writes
through them, so the residual stream gets what each layer was asked for."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lmpatch
from facts import REQS
from lmpatch.methods.locate.batch import key_rows, read_state, spread_update, template_weights
from lmpatch.methods.locate.post_norm import input_change
from lmpatch.methods.locate.solve import batch_update
from lmpatch.model.hooks import capture_input, capture_output
from tiny import ARCHS, EXTRA_ARCHS, tiny_model


class GainRMSNorm(nn.Module):
    """An RMSNorm with large, uneven per-channel gains (as Gemma's post-norms have)."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.rand(d, generator=g) * 50 + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("arch", ARCHS + EXTRA_ARCHS)
def test_post_norm_is_found_where_the_mlp_output_is_normalised(arch):
    model = tiny_model(arch)
    spec = model.spec
    posts = [layer.mlp_post_norm for layer in spec.layers]
    if arch not in ("gemma2", "olmo2"):
        assert posts == [""] * spec.n_layers
        assert spec.mlp_post_norm(model.model, 0) is None
        return
    assert all(posts)
    for i in range(spec.n_layers):  # the module found really reads the projection's output
        norm = spec.mlp_post_norm(model.model, i)
        ins, outs = [], []
        ids = model.tokenizer("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture_input(norm, ins), capture_output(spec.mlp_out(model.model, i), outs):
            model.model(input_ids=ids)
        assert torch.equal(ins[0], outs[0])


@pytest.mark.parametrize("norm", [GainRMSNorm(48), nn.LayerNorm(48)], ids=["rms-gains", "layernorm"])
def test_input_change_reaches_a_reachable_output_change(norm):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(norm, nn.LayerNorm):
            norm.weight.copy_(torch.rand(48, generator=g) * 5 + 0.1)
            norm.bias.copy_(torch.randn(48, generator=g))
        y = 0.3 * torch.randn(5, 48, generator=g)
        wanted = (norm(y + 0.4 * y.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(
            torch.randn(5, 48, generator=g), dim=-1)) - norm(y)).double()
    change, achieved = input_change(norm, y, wanted)
    with torch.no_grad():
        real = norm((y.double() + change).float()).double() - norm(y).double()
    torch.testing.assert_close(achieved, real, rtol=1e-4, atol=1e-4)
    assert float(((achieved - wanted).norm(dim=-1) / wanted.norm(dim=-1)).max()) < 1e-3
    # Never a move larger than needed: at most twice the input's scale (a rotation).
    assert bool((change.norm(dim=-1) <= 2 * y.double().norm(dim=-1) + 1e-6).all())


def test_unreachable_change_stays_at_the_inputs_scale():
    """A target off the norm's output surface is approached without letting ‖y + Δy‖ grow."""
    norm = GainRMSNorm(32, seed=3)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(4, 32, generator=g)
    with torch.no_grad():
        wanted = 3.0 * norm(y).double()  # three times the output: no input gives that
    change, achieved = input_change(norm, y, wanted)
    torch.testing.assert_close((y.double() + change).norm(dim=-1), y.double().norm(dim=-1))
    assert bool((achieved.norm(dim=-1) < wanted.norm(dim=-1)).all())


def test_layer_loop_reaches_the_targets_through_post_norms():
    """With λ→0 and only the bare prompt, the top block's output after the patch is the
    target z on a model whose MLP outputs pass through post-norms. (Adding the share to
    the projection's output, as for Llama, misses it by far: the second half.)"""
    model = tiny_model("gemma2")
    templates = ["{}"]
    layers = [1, 2, 3]
    rows = key_rows(model, REQS, templates)
    weights = template_weights(templates)
    _, before = read_state(model, rows, weights, 0, layers[-1])
    norms = [model.spec.mlp_post_norm(model.model, i) for i in layers]
    with torch.no_grad():  # a change the MLPs can make: a tenth of each post-norm's output scale
        scale = min(float(n.weight.abs().mean() + 1) for n in norms) * model.spec.hidden_size ** 0.5
    deltas = 0.1 * scale * torch.nn.functional.normalize(
        torch.randn(len(REQS), model.spec.hidden_size, generator=torch.Generator().manual_seed(1)), dim=-1)

    def solve(layer, keys, residuals):
        return batch_update(keys, residuals, None, 1e-7)

    parts, infos = spread_update(model, REQS, deltas, templates, layers, solve)
    assert all(info["post_norm"] for info in infos)
    patch = lmpatch.Patch(parts=parts, method="memit", model_fingerprint=model.fingerprint, model_name=model.name)
    with patch.applied(model):
        _, after = read_state(model, rows, weights, 0, layers[-1])
    error = (after - before - deltas.double()).norm(dim=-1) / deltas.double().norm(dim=-1)
    assert float(error.max()) < 0.02

    # Without the mapping (the post-norms hidden from the loop), the same targets are missed.
    plain = type(model.spec)(**{**model.spec.__dict__, "layers": tuple(
        type(layer)(**{**layer.__dict__, "mlp_post_norm": ""}) for layer in model.spec.layers)})
    model.__dict__["spec"] = plain
    parts, _ = spread_update(model, REQS, deltas, templates, layers, solve)
    patch = lmpatch.Patch(parts=parts, method="memit", model_fingerprint=model.fingerprint, model_name=model.name)
    with patch.applied(model):
        _, linear = read_state(model, rows, weights, 0, layers[-1])
    missed = (linear - before - deltas.double()).norm(dim=-1) / deltas.double().norm(dim=-1)
    assert float(missed.mean()) > 10 * float(error.mean())
