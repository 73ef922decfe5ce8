"""MEMIT and the shared batch core: the closed-form solve is the least-squares update the
paper derives (push-through and direct forms agree), the layer loop reads each layer with
the updates below it in place and spreads the residual as specified, patches are rank ≤ n
and revert exactly on every architecture, and on the real model a batch of edits works."""
from __future__ import annotations

import math

import pytest
import torch

import lmpatch
from facts import FAST, REQS
from facts import key_problem as _problem
from lmpatch import WeightDelta
from lmpatch.methods.locate.batch import FrozenBelow, key_rows, read_state, spread_update, template_weights
from lmpatch.methods.locate.solve import KeyCovariance, batch_update
from lmpatch.methods.locate.templates import context_templates
from lmpatch.methods.locate.values import ValueConfig, build_rows, optimize_value
from lmpatch.methods.memit import MEMITHparams, covariance_weight, edit_layers
from lmpatch.model.hooks import capture_input, capture_output
from lmpatch.tokens import subject_last_index
from tiny import ARCHS, tiny_model

# ----------------------------------------------------------------------------- the solve


@pytest.mark.parametrize("form", ["push_through", "direct"])
def test_batch_update_is_memit_least_squares(form):
    """ΔW = R Kᵀ (λC0 + KKᵀ)⁻¹ exactly (math layout, keys as rows), whatever the form."""
    cov, keys, residuals = _problem()
    lam = 3.0
    left, right = batch_update(keys, residuals, cov, lam, form)
    k, r = keys.T, residuals.T
    reference = r @ k.T @ torch.linalg.inv(lam * cov.matrix.double() + k @ k.T)
    torch.testing.assert_close(left @ right, reference, rtol=1e-9, atol=1e-10)


def test_push_through_equals_direct_and_auto_picks_by_size():
    cov, keys, residuals = _problem(seed=1, n=5, d_ff=16)
    pt = batch_update(keys, residuals, cov, 0.7, "push_through")
    direct = batch_update(keys, residuals, cov, 0.7, "direct")
    torch.testing.assert_close(pt[0] @ pt[1], direct[0] @ direct[1], rtol=1e-9, atol=1e-10)
    auto = batch_update(keys, residuals, cov, 0.7)
    assert auto[0].shape == pt[0].shape and torch.equal(auto[0] @ auto[1], pt[0] @ pt[1])
    # More facts than key dimensions: the direct d_ff × d_ff solve is the cheaper one.
    cov, keys, residuals = _problem(seed=2, n=20, d_ff=8)
    auto = batch_update(keys, residuals, cov, 0.7)
    direct = batch_update(keys, residuals, cov, 0.7, "direct")
    assert torch.equal(auto[0] @ auto[1], direct[0] @ direct[1])


@pytest.mark.parametrize("form", ["push_through", "direct"])
def test_held_keys_are_zero_residual_rows_with_factors_as_narrow_as_the_fitted_keys(form):
    """``held`` keys enter the least squares as rows with a zero residual (UltraEdit's later
    turns hold its earlier turns' keys so), and the change keeps rank n: its factors are n wide."""
    cov, keys, residuals = _problem(seed=6, n=4, d_ff=16)
    held = torch.randn(5, keys.shape[1], dtype=keys.dtype, generator=torch.Generator().manual_seed(7))
    left, right = batch_update(keys, residuals, cov, 0.7, form, held=held)
    assert left.shape[1] == right.shape[0] == keys.shape[0]
    rows = torch.cat([keys, held])
    padded = torch.cat([residuals, residuals.new_zeros(held.shape[0], residuals.shape[1])])
    reference = batch_update(rows, padded, cov, 0.7, form)
    torch.testing.assert_close(left @ right, reference[0] @ reference[1], rtol=1e-9, atol=1e-10)
    plain = batch_update(keys, residuals, cov, 0.7, form)
    assert not torch.allclose(left @ right, plain[0] @ plain[1])  # the held rows change the update


def test_small_lambda_maps_every_key_to_its_residual():
    """In the λ→0 limit (n ≤ d_ff, independent keys) the update writes each fact exactly;
    with a large λ it writes almost nothing (preservation wins)."""
    cov, keys, residuals = _problem(seed=3, n=6, d_ff=12)
    left, right = batch_update(keys, residuals, cov, 1e-9)
    torch.testing.assert_close((left @ right @ keys.T).T, residuals, rtol=1e-6, atol=1e-6)
    left, right = batch_update(keys, residuals, cov, 1e9)
    assert float((left @ right @ keys.T).norm()) < 1e-6 * float(residuals.norm())


def test_update_rank_is_at_most_batch_size():
    cov, keys, residuals = _problem(seed=4, n=3, d_ff=40, d=30)
    left, right = batch_update(keys, residuals, cov, 1.0)
    assert left.shape == (30, 3) and right.shape == (3, 40)
    assert int(torch.linalg.matrix_rank(left @ right)) == 3


def test_no_statistics_means_identity_covariance():
    _, keys, residuals = _problem(seed=5)
    eye = KeyCovariance(torch.eye(keys.shape[1]))
    a = batch_update(keys, residuals, None, 2.0)
    b = batch_update(keys, residuals, eye, 2.0)
    torch.testing.assert_close(a[0] @ a[1], b[0] @ b[1], rtol=1e-10, atol=1e-12)


def test_template_weights_give_bare_prompt_half():
    w = template_weights(["{}", "a. {}", "b. {}", "c. {}"])
    assert w.tolist() == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert template_weights(["x. {}", "{}"]).tolist() == [0.5, 0.5]
    assert template_weights(["{}"]).tolist() == [1.0]


# ----------------------------------------------------------------------------- the layer loop


def _solver(weight, record=None):
    def solve(layer, keys, residuals):
        if record is not None:
            record.append((layer, keys.clone(), residuals.clone()))
        return batch_update(keys, residuals, None, weight)
    return solve


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("target", ["block", "mlp_out"])
def test_read_state_matches_one_prompt_at_a_time(arch, target):
    """The batched, right-padded pass gives each fact's template-weighted key and its
    bare-prompt value exactly as separate unpadded forwards of each prompt do."""
    model = tiny_model(arch)
    templates = ["Hello there, my friend. {}", "{}", "A. {}"]
    rows = key_rows(model, REQS, templates)
    weights = template_weights(templates)
    keys, values = read_state(model, rows, weights, 1, 2, target, chunk_rows=4)  # chunks split requests
    tok = model.tokenizer
    key_module = model.spec.mlp_out(model.model, 1)
    value_module = model.spec.block(model.model, 2) if target == "block" else model.spec.mlp_out(model.model, 2)
    for i, req in enumerate(REQS):
        want_key = torch.zeros(model.spec.mlp_size, dtype=torch.float64)
        for t, template in enumerate(templates):
            text = template.format(req.prompt)
            s = subject_last_index(tok, text, req.subject, start=text.find(req.prompt))
            ids = torch.tensor([tok(text)["input_ids"]])
            ks, vs = [], []
            with torch.no_grad(), capture_input(key_module, ks), capture_output(value_module, vs):
                model.model(input_ids=ids)
            want_key += weights[t] * ks[0].reshape(1, ids.shape[1], -1)[0, s].double()
            if template == "{}":
                want_value = vs[0].reshape(1, ids.shape[1], -1)[0, s].double()
        torch.testing.assert_close(keys[i], want_key, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[i], want_value, rtol=1e-4, atol=1e-5)


def test_blocks_below_the_edit_are_replayed_not_rerun():
    """After the first pass, blocks below the lowest edited layer are replayed from the
    recorded output, and the keys/values are the same as a full pass (here with an update
    at layer 2 applied in between, which the replay must not hide)."""
    model = tiny_model("llama")
    templates = ["{}", "Hello there. {}"]
    rows = key_rows(model, REQS, templates)
    weights = template_weights(templates)
    frozen = FrozenBelow(model, rows, 2, chunk_rows=4)
    assert frozen.enabled and len(frozen.blocks) == 2
    calls = []
    # A replayed block never calls its submodules.
    handle = model.spec.mlp_out(model.model, 0).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        first = read_state(model, rows, weights, 2, 3, chunk_rows=4, frozen=frozen)
        n_chunks = len(calls)
        assert n_chunks == len(rows.chunks(4)) == 2
        torch.testing.assert_close(first[0], read_state(model, rows, weights, 2, 3, chunk_rows=4)[0])
        g = torch.Generator().manual_seed(0)
        bump = WeightDelta(model.spec.layers[2].mlp_out + ".weight",
                           left=torch.randn(model.spec.hidden_size, 1, generator=g),
                           right=torch.randn(1, model.spec.mlp_size, generator=g))
        patch = lmpatch.Patch(parts=[bump], method="x", model_fingerprint=model.fingerprint, model_name=model.name)
        with patch.applied(model):
            calls.clear()
            replayed = read_state(model, rows, weights, 3, 3, chunk_rows=4, frozen=frozen)
            assert calls == []  # block 0 did not run
            calls.append(0)
            full = read_state(model, rows, weights, 3, 3, chunk_rows=4)
    finally:
        handle.remove()
    torch.testing.assert_close(replayed[0], full[0])
    torch.testing.assert_close(replayed[1], full[1])
    assert not torch.allclose(replayed[1], first[1])  # the update at layer 2 is seen
    assert FrozenBelow(model, rows, 2, 4, max_bytes=10).enabled is False  # too big to keep: rerun


@pytest.mark.parametrize("spread", ["linear", "sqrt"])
def test_residual_is_spread_over_remaining_layers(spread):
    """With a solver that writes nothing, nothing changes between layers, so layer i
    (of L) must be handed exactly target/(L-i) (MEMIT) or target/√(L-i) (PMET)."""
    model = tiny_model("llama")
    deltas = torch.randn(2, model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    seen = []

    def nothing(layer, keys, residuals):
        seen.append((layer, residuals.clone()))
        return torch.zeros(residuals.shape[1], 1, dtype=torch.float64), torch.zeros(1, keys.shape[1], dtype=torch.float64)

    spread_update(model, REQS[:2], deltas, ["{}", "Hello. {}"], [0, 1, 2], nothing, spread=spread)
    assert [layer for layer, _ in seen] == [0, 1, 2]
    for i, (_, residual) in enumerate(seen):
        share = (3 - i) if spread == "linear" else math.sqrt(3 - i)
        torch.testing.assert_close(residual, deltas.double() / share, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_layer_loop_reaches_the_targets_with_small_lambda(arch):
    """Each layer is solved on the model with the updates below it applied: with λ→0 and
    the bare prompt as the only template, the top block's output after the patch is
    exactly the target z = (unedited output) + delta, for every fact at once. (If keys or
    outputs were read from the unedited model, the layers would overshoot.)"""
    model = tiny_model(arch)
    templates = ["{}"]
    layers = [1, 2, 3]  # block 0 is replayed after the first pass
    rows = key_rows(model, REQS, templates)
    weights = template_weights(templates)
    _, before = read_state(model, rows, weights, 0, layers[-1])
    deltas = 0.3 * before.norm(dim=-1, keepdim=True).float() * torch.nn.functional.normalize(
        torch.randn(len(REQS), model.spec.hidden_size, generator=torch.Generator().manual_seed(1)), dim=-1)
    record = []
    parts, infos = spread_update(model, REQS, deltas, templates, layers, _solver(1e-7, record))
    assert [d.param for d in parts] == [model.spec.layers[i].mlp_out + ".weight" for i in layers]
    assert all(info["written"] == pytest.approx(1.0, abs=1e-3) for info in infos)
    patch = lmpatch.Patch(parts=parts, method="memit", model_fingerprint=model.fingerprint, model_name=model.name)
    with patch.applied(model):
        _, after = read_state(model, rows, weights, 0, layers[-1])
    torch.testing.assert_close(after, before + deltas.double(), rtol=2e-3, atol=2e-3 * float(deltas.norm(dim=-1).min()))
    # The second layer saw the first one's update: its residual is not the plain half of delta.
    assert not torch.allclose(record[1][2], deltas.double() / 2, atol=1e-3)


def test_value_at_block_output():
    """MEMIT's z lives in the residual stream: with target="block", v_init is the block's
    output at the subject's last token of the bare prompt, and the delta moves the output."""
    model = tiny_model("llama")
    templates = ["{}", "Hello there. {}"]
    req = REQS[0]
    result = optimize_value(model, req, 1, templates, ValueConfig(steps=2, target="block", compute_dtype="float32"))
    rows = key_rows(model, [req], ["{}"])
    store = []
    with torch.no_grad(), capture_output(model.spec.block(model.model, 1), store):
        model.model(input_ids=rows.ids, attention_mask=rows.mask)
    torch.testing.assert_close(result.v_init, store[0][0, int(rows.last[0])].float(), rtol=1e-4, atol=1e-4)
    assert float(result.delta.norm()) > 0
    built = build_rows(model, req, templates, ("{} is a",))
    assert result.key_mean.shape == (model.spec.mlp_size,) and built.n_rewrite == 2
    with pytest.raises(lmpatch.LmpatchError, match="Unknown value target"):
        ValueConfig(target="attention")


# ----------------------------------------------------------------------------- the method


@pytest.mark.parametrize("arch", ARCHS)
def test_memit_runs_and_reverts_on_every_architecture(arch):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    patch = lmpatch.edit(model, REQS, "memit", **FAST)
    layers = edit_layers(model, MEMITHparams())
    assert layers == [0, 1]  # 0.125-0.25 of 4 layers
    assert [d.param for d in patch.deltas] == [model.spec.layers[i].mlp_out + ".weight" for i in layers]
    params = dict(model.model.named_parameters())
    for d in patch.deltas:
        assert d.is_low_rank and d.rank <= len(REQS)
        assert d.shape == tuple(params[d.param].shape)
    for n, p in model.model.named_parameters():  # edit() left the model alone, bit for bit
        assert torch.equal(p, before[n]), n
    assert model.applied == []
    with patch.applied(model):
        assert all(not torch.equal(params[d.param], before[d.param]) for d in patch.deltas)
    for n, p in model.model.named_parameters():
        assert torch.equal(p, before[n]), n
    info = patch.metrics["edit"]
    assert [i["layer"] for i in info["layers"]] == layers and len(patch.requests) == len(REQS)


def test_memit_restores_model_when_the_solve_fails(monkeypatch):
    """A failure half-way through the layers must not leave earlier layers' updates behind."""
    from lmpatch.methods import memit

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    calls = []

    def failing(keys, residuals, covariance, weight, form):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return batch_update(keys, residuals, covariance, weight, form)

    monkeypatch.setattr(memit, "batch_update", failing)
    with pytest.raises(RuntimeError, match="boom"):
        lmpatch.edit(model, REQS[:2], "memit", **FAST)
    assert model.applied == []
    for n, p in model.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_large_batch_stores_dense_when_smaller():
    """Rank-n factors of a d × d_ff update take n·(d + d_ff) numbers; past d·d_ff/(d + d_ff)
    facts the dense matrix is smaller, and is what the patch keeps."""
    from lmpatch.methods.locate.batch import weight_delta

    model = tiny_model("gpt2")  # Conv1D: stored transposed, d_ff x d
    d, d_ff = model.spec.hidden_size, model.spec.mlp_size
    g = torch.Generator().manual_seed(0)
    for n, low in ((4, True), (50, False)):
        left, right = torch.randn(d, n, generator=g, dtype=torch.float64), torch.randn(n, d_ff, generator=g, dtype=torch.float64)
        delta = weight_delta(model, 0, left, right)
        assert delta.is_low_rank is low and delta.shape == (d_ff, d)
        torch.testing.assert_close(delta.materialize(torch.float64), (left @ right).T, rtol=1e-5, atol=1e-5)


def test_default_lambda_keeps_gptj_ratio_and_bad_settings_are_clear():
    model = tiny_model("llama")
    assert covariance_weight(model, MEMITHparams()) == pytest.approx(15000 * model.spec.mlp_size / 16384)
    assert covariance_weight(model, MEMITHparams(mom2_update_weight=7.0)) == 7.0
    with pytest.raises(lmpatch.LmpatchError, match="mom2_update_weight must be > 0"):
        lmpatch.edit(model, REQS[0], "memit", **{**FAST, "mom2_update_weight": 0})
    with pytest.raises(lmpatch.LmpatchError, match="layer_range"):
        lmpatch.edit(model, REQS[0], "memit", **{**FAST, "layer_range": (0.5, 0.2)})
    with pytest.raises(lmpatch.LmpatchError, match="Layer 9 does not exist"):
        lmpatch.edit(model, REQS[0], "memit", **{**FAST, "layers": (1, 9)})
    with pytest.raises(lmpatch.LmpatchError, match="solve_form"):
        lmpatch.edit(model, REQS[0], "memit", **{**FAST, "solve_form": "magic"})
    assert edit_layers(model, MEMITHparams(layers=(3, 1, 1))) == [1, 3]


def test_context_templates_follow_memit_setting():
    model = tiny_model("llama")
    templates = context_templates(model, MEMITHparams(template_lengths=((3, 2),)).template_config())
    assert templates[0] == "{}" and len(templates) == 3


# ----------------------------------------------------------------------------- real model


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("method", ["memit", "pmet", "emmet", "alphaedit"])
def test_batch_on_real_model(real_model, method):
    """Five CounterFact facts in one update: the new targets win, unrelated facts hold."""
    model = real_model
    from lmpatch.data import load_dataset

    reqs = load_dataset("counterfact-train", n=5)
    snapshot = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    patch = lmpatch.edit(model, reqs, method)
    assert len(patch.deltas) == 5 and all(d.rank == 5 for d in patch.deltas)
    report = lmpatch.evaluate(model, reqs, patch=patch, metrics=["counterfact"])
    pre, post = report.pre, report.post
    assert post["efficacy_score"].value >= 0.8 > pre["efficacy_score"].value
    assert post["paraphrase_score"].value >= pre["paraphrase_score"].value + 0.2
    assert post["neighborhood_score"].value >= pre["neighborhood_score"].value - 0.1
    for n, p in model.model.named_parameters():
        assert torch.equal(p, snapshot[n]), n


# ----------------------------------------------------------------------------- target cache


def test_targets_are_cached_per_model_state_setting_and_fact(tmp_path):
    """A rerun reuses every target and gives the same patch; another setting, another fact
    or a patch applied to the model gives other keys; a damaged entry is recomputed."""
    model = tiny_model("llama")
    first = lmpatch.edit(model, REQS, "memit", **FAST)
    assert first.metrics["edit"]["z_cached"] == 0
    again = lmpatch.edit(model, REQS, "memit", **FAST)
    assert again.metrics["edit"]["z_cached"] == len(REQS) and again.patch_id == first.patch_id
    # AlphaEdit and EMMET optimise the same targets: served from the cache too
    emmet = lmpatch.edit(model, REQS, "emmet", **FAST)
    assert emmet.metrics["edit"]["z_cached"] == len(REQS)
    other = lmpatch.edit(model, REQS, "memit", **{**FAST, "v_steps": 2})
    assert other.metrics["edit"]["z_cached"] == 0
    changed = lmpatch.EditRequest(prompt=REQS[1].prompt, subject=REQS[1].subject, target_new="Chile",
                                  target_true="Japan")
    mixed = lmpatch.edit(model, [REQS[0], changed], "memit", **FAST)
    assert mixed.metrics["edit"]["z_cached"] == 1
    with first.applied(model):
        on_top = lmpatch.edit(model, REQS, "memit", **FAST)
    assert on_top.metrics["edit"]["z_cached"] == 0
    files = sorted((tmp_path / "lmpatch-cache" / "targets").rglob("*.safetensors"))
    assert files
    for f in files:
        f.write_bytes(b"not a safetensors file")
    damaged = lmpatch.edit(model, REQS, "memit", **FAST)
    assert damaged.metrics["edit"]["z_cached"] == 0 and damaged.patch_id == first.patch_id
    off = lmpatch.edit(model, REQS, "memit", **{**FAST, "cache_targets": False})
    assert off.metrics["edit"]["z_cached"] == 0
    for a, b in zip(off.deltas, first.deltas):  # same weights (the id differs: it covers the hparams)
        assert torch.equal(a.materialize(torch.float32, "cpu"), b.materialize(torch.float32, "cpu"))


@pytest.mark.parametrize("n, d, f", [(8, 64, 96), (600, 12, 20)])
def test_layer_info_matches_the_dense_update_on_both_sides_of_the_low_rank_break_even(n, d, f):
    """The per-layer report takes the factored route for small batches and forms ΔW for
    large ones (cheaper past the break-even); both must give ΔW's own numbers."""
    from lmpatch.methods.locate.batch import _layer_info
    from lmpatch.patch import dense_is_smaller

    assert dense_is_smaller(d, n, f) == (n == 600)     # one case on each side
    gen = torch.Generator().manual_seed(n)
    keys = torch.randn(n, f, generator=gen, dtype=torch.float64)
    residual = torch.randn(n, d, generator=gen, dtype=torch.float64)
    left, right = residual.T.contiguous(), torch.randn(n, f, generator=gen, dtype=torch.float64) / f
    info = _layer_info(3, keys, residual, residual, left, right, 0.0)
    dense = left @ right
    written = ((keys @ dense.T) * residual).sum(-1) / (residual * residual).sum(-1)
    assert info["update_norm"] == pytest.approx(float(dense.norm()), rel=1e-9)
    assert info["written"] == pytest.approx(float(written.mean()), rel=1e-9, abs=1e-12)
