"""ROME / r-ROME: the prefix-cache trick is exact on every architecture, the update has
the algebraic properties the papers derive, and on the real model an edit works."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lmpatch
from lmpatch.eval.scoring import score_targets
from lmpatch.methods.locate import values
from lmpatch.methods.locate.solve import KeyCovariance, rank_one_update
from lmpatch.methods.locate.values import SuffixRunner, ValueConfig, build_rows, optimize_value, optimize_values
from lmpatch.methods.rome import ROMEHparams
from tiny import ARCHS, tiny_model

REQ = lmpatch.EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
)
TEMPLATES = ["{}", "Because of this, the. {}", "You can find. {}"]
FAST = dict(mom2_adjustment=False, v_steps=3, template_lengths=((3, 2),))


@pytest.mark.parametrize("overhead", [values.RUN_OVERHEAD_TOKENS, 0])
@pytest.mark.parametrize("arch", ARCHS)
def test_suffix_on_prefix_cache_equals_full_forward(arch, overhead, monkeypatch):
    """Running only the suffix on the cached prefix must give the same hidden states as
    running each whole (unpadded) sequence: this is what makes the optimisation fast.
    The second call replays the blocks below the edit layer instead of running them,
    and must still agree. With no cost per run the prefixes are read one length at a time
    and their keys/values padded back, which must change nothing either."""
    monkeypatch.setattr(values, "RUN_OVERHEAD_TOKENS", overhead)
    model = tiny_model(arch)
    rows = build_rows(model, REQ, TEMPLATES, ("{} is a",))
    runs = []
    real_run = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: runs.append(kw["input_ids"].shape) or real_run(**kw))
    runner = SuffixRunner(model, torch.float32, rows, frozen_below=1)
    lengths = set(rows.prefix_mask.sum(-1).tolist())
    assert len(runs) == (1 if overhead else len(lengths))
    block = model.spec.module(runner.net, model.spec.layers[0].block)  # the module the runner runs
    seen = []
    handle = block.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        first = runner.hidden()
        replayed = runner.hidden()
        handle.remove()
        assert seen[1] is runner.replay[0]  # the second call did not run block 0
        base = model.spec.base_model(model.model)
        for i in range(rows.suffix_ids.shape[0]):
            prefix = rows.prefix_ids[i][rows.prefix_mask[i].bool()]
            suffix = rows.suffix_ids[i][rows.suffix_mask[i].bool()]
            full = torch.cat([prefix, suffix])[None]
            ref = base(input_ids=full).last_hidden_state[0, len(prefix):]
            torch.testing.assert_close(first[i, : len(suffix)], ref, atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(replayed[i, : len(suffix)], ref, atol=2e-4, rtol=1e-3)
    assert "forward" not in vars(block)  # the replay left the block's own forward in place


@pytest.mark.parametrize("target", values.VALUE_TARGETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_edit_point_read_on_the_prefix_cache_equals_the_separate_read(arch, target):
    """Keys and unedited values read by running only the subject's last token on the
    prefix cache are those of the separate full read (what a float32 optimisation uses),
    for two requests, one of which has a KL row of its own."""
    model = tiny_model(arch)
    other = lmpatch.EditRequest(prompt="In Rome, the Colosseum is in", subject="the Colosseum", target_new="Paris")
    rows = values.build_group_rows(model, [REQ, other], TEMPLATES, ("{} is a",))
    assert rows.owner.numel() > rows.rewrite_rows.numel()  # a KL row is in the batch
    layer = 1
    frozen = layer + 1 if target == "block" else layer
    runner = SuffixRunner(model, torch.float32, rows, frozen_below=frozen)
    keys, v_init = runner.edit_point_state(model, layer, target)
    ref_keys, ref_values = values.edit_point_state(model, rows, layer, target)
    assert keys.shape == ref_keys.shape and v_init.shape == ref_values.shape
    torch.testing.assert_close(keys, ref_keys, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(v_init, ref_values, atol=2e-4, rtol=1e-3)
    assert runner.cache is None and runner.replay is None  # the optimisation starts clean
    low = SuffixRunner(model, torch.bfloat16, rows, frozen_below=frozen)  # a compute copy: the separate read
    for got, want in zip(low.edit_point_state(model, layer, target), (ref_keys, ref_values)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_runs_and_reverts_on_every_architecture(arch):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    patch = lmpatch.edit(model, REQ, "rome", **FAST)
    assert len(patch.deltas) == 1
    d = patch.deltas[0]
    layer = model.spec.depth_layer(ROMEHparams().layer_fraction)
    assert d.param == model.spec.layers[layer].mlp_out + ".weight"
    assert d.rank == 1
    assert patch.hparams["layer"] == layer   # the layer chosen from the depth is recorded, not None
    param = dict(model.model.named_parameters())[d.param]
    assert d.shape == tuple(param.shape)
    for n, p in model.model.named_parameters():  # edit() left the model alone
        assert torch.equal(p, before[n]), n
    with patch.applied(model):
        assert not torch.equal(param, before[d.param])
    for n, p in model.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_rank_one_update_maps_key_exactly():
    """ΔW k_den = residual: the edited matrix sends the denominator key to its target."""
    torch.manual_seed(0)
    d_ff, d = 12, 5
    x = torch.randn(200, d_ff)
    cov = KeyCovariance(x.T @ x / 200)
    k_dir, k_den, resid = torch.randn(d_ff), torch.randn(d_ff), torch.randn(d)
    r, u = rank_one_update(k_dir, k_den, resid, cov)
    torch.testing.assert_close((torch.outer(r, u) @ k_den.double()).float(), resid, atol=1e-5, rtol=1e-5)
    # u is the normalised C⁻¹k direction.
    ref = torch.linalg.solve(cov.matrix.double(), k_dir.double())
    torch.testing.assert_close(u, ref / ref.norm())


def test_r_rome_uses_template_average_key(monkeypatch):
    model = tiny_model("llama")
    seen = {}
    import lmpatch.methods.rome as rome

    real = rome.rank_one_update

    def spy(direction_key, denominator_key, residual, covariance):
        seen["same"] = torch.equal(direction_key, denominator_key)
        return real(direction_key, denominator_key, residual, covariance)

    monkeypatch.setattr(rome, "rank_one_update", spy)
    lmpatch.edit(model, REQ, "r-rome", **FAST)
    assert seen["same"] is True
    lmpatch.edit(model, REQ, "rome", **FAST)
    assert seen["same"] is False


def test_several_requests_compose_into_one_patch():
    model = tiny_model("gpt2")
    other = lmpatch.EditRequest(prompt="Mount Fuji is in", subject="Mount Fuji", target_new="Peru")
    patch = lmpatch.edit(model, [REQ, other], "rome", **FAST)
    assert len(patch.deltas) == 1 and patch.deltas[0].rank == 2
    assert len(patch.requests) == 2


def test_bad_hyperparameters_are_clear():
    model = tiny_model("llama")
    with pytest.raises(lmpatch.LmpatchError, match="Unknown hyperparameter"):
        lmpatch.edit(model, REQ, "rome", no_such_knob=1)
    with pytest.raises(lmpatch.LmpatchError, match="Layer 99 does not exist"):
        lmpatch.edit(model, REQ, "rome", layer=99, **FAST)
    with pytest.raises(lmpatch.LmpatchError, match="Unknown method"):
        lmpatch.edit(model, REQ, "nope")


@pytest.mark.model
def test_rome_edit_on_real_model(real_model):
    """The edit makes the new target the model's prediction on the prompt and on a
    paraphrase, leaves an unrelated fact alone, and reverts exactly."""
    model = real_model
    para = "Where is the Eiffel Tower? It is in the city of"
    other = ("The capital of Japan is", "Tokyo")
    pre = score_targets(model, [(REQ.prompt, "Rome"), (REQ.prompt, "Paris"), other])
    assert pre[1].mean_logprob > pre[0].mean_logprob
    snapshot = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    patch = lmpatch.edit(model, REQ, "rome")
    with patch.applied(model):
        post = score_targets(model, [(REQ.prompt, "Rome"), (REQ.prompt, "Paris"), (para, "Rome"), (para, "Paris"), other])
        assert post[0].token_accuracy == 1.0
        assert post[0].mean_logprob > post[1].mean_logprob
        assert post[2].mean_logprob > post[3].mean_logprob
        assert post[4].argmax == pre[2].argmax
    for n, p in model.model.named_parameters():
        assert torch.equal(p, snapshot[n]), n


@pytest.mark.parametrize("arch", ["llama", "opt"])  # opt: its MLP sees flattened tokens
def test_requests_optimised_together_follow_their_paths_alone(arch):
    """A group optimisation (one padded batch, requests leaving it as they stop) gives
    each request the delta and step count it gets when optimised on its own."""
    model = tiny_model(arch)
    requests = [
        REQ,
        lmpatch.EditRequest(prompt="Danielle Darrieux speaks the language", subject="Danielle Darrieux",
                            target_new="English and more"),
        lmpatch.EditRequest(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target_new="piano"),
    ]
    probe = ValueConfig(steps=6, lr=0.02, compute_dtype="float32", stop_loss=0.0)
    first = sorted(optimize_value(model, r, 1, TEMPLATES, probe).losses[0] for r in requests)
    # The request with the lowest initial loss stops at once, the others keep going.
    config = replace(probe, stop_loss=(first[0] + first[1]) / 2)
    alone = [optimize_value(model, r, 1, TEMPLATES, config) for r in requests]
    assert len({a.steps for a in alone}) > 1, "the threshold should make the requests stop at different steps"
    together = optimize_values(model, requests, 1, TEMPLATES, config)
    for a, b in zip(alone, together):
        assert a.steps == b.steps
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.key_mean, a.key_mean)
        torch.testing.assert_close(b.v_init, a.v_init)


def test_length_buckets_are_the_cheapest_split():
    """Every row lands in exactly one run, and no split into contiguous runs of the rows
    sorted by length (brute force over all of them) costs less."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(0, 30) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 5, 64])
        runs = values.length_buckets(lengths, overhead)
        assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
        cost = sum(overhead + len(run) * max(lengths[i] for i in run) for run in runs)
        ordered = sorted(lengths)
        n = len(ordered)
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            other = sum(overhead + (b - a) * ordered[b - 1] for a, b in zip(bounds, bounds[1:]))
            assert cost <= other + 1e-9
