"""UltraEdit: registered; the update is the paper's closed form (normalised gradient step,
ridge solve from the raw keys); an edit lowers the new target's loss; the patch applies,
reverts and reloads exactly; the lifelong statistics travel in the patches, so a second
batch normalises with the statistics of both batches, also after a reload; bad settings
are one clear error; and the shared life cycle passes on every tiny architecture."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lmpatch
import test_conformance as conformance
from facts import REQS
from lmpatch.methods.locate.solve import layer_covariances
from lmpatch.methods.memit import edit_layers
from lmpatch.methods.registry import get_method, method_names
from lmpatch.methods.teacher import TARGET_NEW, request_nll, target_batch
from lmpatch.methods.ultraedit import (
    STATS_KEY,
    Moments,
    UltraEditHparams,
    _still_losing,
    edit_params,
    pass_dtype,
    running_statistics,
    token_features,
    token_keys,
    warmup_file,
    warmup_statistics,
)
from tiny import ARCHS, SEQ2SEQ_ARCHS, tiny_model

#: Quick on a 64-wide model: a small warm-up, and a step small enough for a first-order
#: (loss-lowering) change of its tiny weights; the identity ridge (the paper's), so no key
#: statistics are needed (covariance=True has its own test and the conformance run).
#: float32 passes on every CPU, so the exact checks below hold where "auto" means bfloat16
#: (bfloat16 passes have their own test).
FAST = dict(warmup=8, lr=1e-3, retry_lr=None, covariance=False, turns=1, margin=0.0, refresh=0, compute_dtype="float32")

MORE = [
    lmpatch.EditRequest(prompt="The capital of Japan is", subject="Japan", target_new="Lima", target_true="Tokyo"),
    lmpatch.EditRequest(prompt="Water boils at a temperature of", subject="Water", target_new="forty degrees"),
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _nll(model, requests) -> torch.Tensor:
    with torch.no_grad():
        return request_nll(model, target_batch(model, list(requests), TARGET_NEW))


def test_registered_and_listed():
    assert "ultraedit" in method_names()
    info = get_method("UltraEdit")
    assert info.name == "ultraedit" and get_method("ultra-edit") is info
    assert info.regimes == {"single", "batch", "sequential"} and info.produces == {"weight_deltas"}
    assert not info.encoder_decoder and info.prepare is not None
    assert info.capabilities()["hparams"] == "UltraEditHparams"


def test_moments_merge_exactly_and_in_any_order():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3 + 1
    whole = Moments.of(rows)
    parts = [Moments.of(rows[:5]), Moments.of(rows[5:31]), Moments.of(rows[31:])]
    for merged in (parts[0].merged(parts[1]).merged(parts[2]), parts[2].merged(parts[0]).merged(parts[1])):
        assert merged.count == 50
        torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.std(), rows.std(0), rtol=1e-12, atol=1e-12)
    back = Moments.from_json(whole.to_json())
    assert back.count == whole.count and torch.equal(back.mean, whole.mean) and torch.equal(back.m2, whole.m2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_is_the_papers_closed_form(arch):
    """ΔW = Vᵀ K (KᵀK + λI)⁻¹ with v = -lr ‖k̂‖² ĝ, [k̂ ‖ ĝ] normalised by the warm-up
    merged with this batch; GPT-2's Conv1D stores it transposed."""
    model = tiny_model(arch)
    hp = UltraEditHparams(**FAST, ridge=0.5)
    patch = lmpatch.edit(model, REQS, "ultraedit", hp)
    params = edit_params(model, hp)
    assert [d.param for d in patch.deltas] == params
    warm = warmup_statistics(model, params, hp)
    features, _ = token_features(model, REQS, params)
    (key,) = warm  # one group: every edited matrix has the same shape
    rows = torch.cat([torch.cat(features[p], 1) for p in params])
    stats = warm[key].merged(Moments.of(rows))
    assert patch.metrics["edit"]["statistics_count"] == {key: stats.count}
    for param, delta in zip(params, patch.deltas):
        keys, grads = features[param]
        d_in = keys.shape[1]
        z = (torch.cat([keys, grads], 1) - stats.mean) / (stats.std() + torch.finfo(torch.float32).eps)
        values = -hp.lr * (z[:, :d_in] ** 2).sum(-1, keepdim=True) * z[:, d_in:]
        eye = torch.eye(d_in, dtype=torch.float64)
        expected = (torch.linalg.solve(keys.T @ keys + hp.ridge * eye, keys.T @ values)).T    # d_out × d_in
        got = delta.materialize(torch.float64)
        got = got.T if arch == "gpt2" else got
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_edit_lowers_the_new_targets_loss_and_reverts_bit_exactly(arch, tmp_path):
    model = tiny_model(arch)
    state = _state(model)
    before = _nll(model, REQS)
    patch = lmpatch.edit(model, REQS, "ultraedit", **FAST)
    assert not model.applied and all(torch.equal(v, state[k]) for k, v in _state(model).items())
    with patch.applied(model):
        after = _nll(model, REQS)
    assert bool((after < before).all()), (before, after)
    after_revert = _state(model)
    assert all(torch.equal(after_revert[k], state[k]) for k in state)
    loaded = lmpatch.Patch.load(patch.save(tmp_path / "u.lmpatch"))
    assert loaded.patch_id == patch.patch_id and loaded.metrics[STATS_KEY] == patch.metrics[STATS_KEY]
    with loaded.applied(model):
        assert torch.equal(_nll(model, REQS), after)


def test_sequential_batches_carry_the_lifelong_statistics(tmp_path):
    """Batch 2, computed with batch 1's patch applied, normalises with warm-up + batch 1 +
    batch 2; the same from a reloaded batch-1 patch (a resumed run), bit for bit; reverting
    batch 1 takes its statistics out again."""
    model = tiny_model("llama")
    hp = UltraEditHparams(**FAST)
    params = edit_params(model, hp)
    first = lmpatch.edit(model, REQS, "ultraedit", hp)
    (key,) = first.metrics[STATS_KEY]
    warm = warmup_statistics(model, params, hp)[key]
    n1 = first.metrics[STATS_KEY][key]["count"]
    assert first.metrics["edit"]["earlier_count"] == {key: warm.count}
    assert first.metrics["edit"]["statistics_count"] == {key: warm.count + n1}
    first.apply(model)
    second = lmpatch.edit(model, MORE, "ultraedit", hp)
    n2 = second.metrics[STATS_KEY][key]["count"]
    assert second.metrics["edit"]["earlier_count"] == {key: warm.count + n1}
    assert second.metrics["edit"]["statistics_count"] == {key: warm.count + n1 + n2}
    second.apply(model)
    both = running_statistics(model, params, hp)[key]      # what a third batch would start from
    expected = warm.merged(Moments.from_json(first.metrics[STATS_KEY][key])).merged(
        Moments.from_json(second.metrics[STATS_KEY][key]))
    assert both.count == warm.count + n1 + n2
    torch.testing.assert_close(both.mean, expected.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(both.m2, expected.m2, rtol=1e-12, atol=1e-12)
    # batch 2's contribution is its own rows, measured on the model with batch 1 in it
    second.revert(model)
    features, _ = token_features(model, MORE, params, compute_dtype=pass_dtype(model, hp))  # as the edit reads
    mine = Moments.of(torch.cat([torch.cat(features[p], 1) for p in params]))
    stored = Moments.from_json(second.metrics[STATS_KEY][key])
    torch.testing.assert_close(stored.mean, mine.mean, rtol=1e-12, atol=1e-15)

    # the forward-only key read a reloaded patch gets is the same keys as the gradient pass's
    for p, k in token_keys(model, MORE, params).items():
        torch.testing.assert_close(k, features[p][0], rtol=1e-6, atol=1e-7)
    resumed = tiny_model("llama")
    lmpatch.Patch.load(first.save(tmp_path / "first.lmpatch")).apply(resumed)
    again = lmpatch.edit(resumed, MORE, "ultraedit", hp)
    assert again.patch_id == second.patch_id

    first.revert(model)
    alone = lmpatch.edit(model, MORE, "ultraedit", hp)
    assert alone.metrics["edit"]["earlier_count"] == {key: warm.count}
    assert alone.patch_id != second.patch_id


def test_preserve_keeps_later_batches_off_earlier_keys(tmp_path):
    """With preserve=α the second batch solves ΔW = Vᵀ K (KᵀK + λI + α K_pᵀK_p)⁻¹, K_p the
    first batch's keys as it solved for them; it moves the first batch's outputs less than
    the paper's ridge does; a first patch loaded from disk has its keys read again (on the
    model it is now in, so close to but not the same keys);
    reverting it stops protecting them."""
    model = tiny_model("llama")
    hp = UltraEditHparams(**FAST, preserve=2.0, ridge=0.5)
    params = edit_params(model, hp)
    first_keys = {p: k for p, (k, _) in token_features(model, REQS, params)[0].items()}
    first = lmpatch.edit(model, REQS, "ultraedit", hp)
    first.apply(model)
    second = lmpatch.edit(model, MORE, "ultraedit", hp)
    assert second.metrics["edit"]["preserved_keys"] == first.metrics["edit"]["tokens"]
    plain = lmpatch.edit(model, MORE, "ultraedit", **{**FAST, "ridge": 0.5, "preserve": 0.0})
    features, _ = token_features(model, MORE, params)
    for param, delta, loose in zip(params, second.deltas, plain.deltas):
        keys = features[param][0]
        k_p = first_keys[param]
        written = delta.materialize(torch.float64)
        # the solve's own values: recover V from the unpreserved (paper's) update of the same batch
        eye = torch.eye(keys.shape[1], dtype=torch.float64)
        values = loose.materialize(torch.float64) @ (keys.T @ keys + hp.ridge * eye) @ torch.linalg.pinv(keys)
        expected = values @ keys @ torch.linalg.inv(keys.T @ keys + hp.ridge * eye + hp.preserve * k_p.T @ k_p)
        torch.testing.assert_close(written, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
        assert (written @ k_p.T).norm() < (loose.materialize(torch.float64) @ k_p.T).norm()

    # the forward-only key read a reloaded patch gets is the same keys as the gradient pass's
    for p, k in token_keys(model, MORE, params).items():
        torch.testing.assert_close(k, features[p][0], rtol=1e-6, atol=1e-7)
    resumed = tiny_model("llama")
    lmpatch.Patch.load(first.save(tmp_path / "first.lmpatch")).apply(resumed)
    again = lmpatch.edit(resumed, MORE, "ultraedit", hp)
    assert again.metrics["edit"]["preserved_keys"] == first.metrics["edit"]["tokens"]
    assert not torch.equal(again.deltas[0].materialize(), plain.deltas[0].materialize())

    first.revert(model)
    alone = lmpatch.edit(model, MORE, "ultraedit", hp)
    assert alone.metrics["edit"]["preserved_keys"] == 0
    assert all(torch.equal(a.materialize(), b.materialize()) for a, b in zip(
        alone.deltas, lmpatch.edit(model, MORE, "ultraedit", **{**FAST, "ridge": 0.5, "preserve": 0.0}).deltas))


def test_preserve_scale_batch_weighs_the_earlier_keys_as_one_batch():
    """preserve_scale="batch": the earlier keys together weigh α times this batch's keys, so
    the second batch's update is the "sum" update with α·n/n_p in place of α."""
    model = tiny_model("llama")
    hp = UltraEditHparams(**FAST, preserve=2.0, ridge=0.5)
    first = lmpatch.edit(model, REQS, "ultraedit", hp)
    first.apply(model)
    batch = lmpatch.edit(model, MORE[1:], "ultraedit", replace(hp, preserve_scale="batch"))
    info = batch.metrics["edit"]
    weight = hp.preserve * info["tokens"] / info["preserved_keys"]
    assert info["preserved_keys"] == first.metrics["edit"]["tokens"] and info["preserve_weight"] == weight
    assert weight != hp.preserve  # the two batches differ in tokens, so the test tells the modes apart
    same = lmpatch.edit(model, MORE[1:], "ultraedit", replace(hp, preserve=weight))
    assert same.metrics["edit"]["preserve_weight"] == weight
    for a, b in zip(batch.deltas, same.deltas):
        torch.testing.assert_close(a.materialize(), b.materialize())


def test_the_losing_check_reads_one_token_true_targets_from_the_new_targets_pass():
    """The check between turns compares each request's new-target NLL with its true
    target's. A one-token true target is read where the new target's first token is (same
    prompt), a longer one from its own sequence, and with the lower layers replayed the
    answer is the same: equal to the two targets scored apart, and the requests with new
    and true swapped lose exactly where the originals win."""
    from lmpatch.methods.frozen_bottom import FrozenBottom
    from lmpatch.methods.ultraedit import _bottom

    model = tiny_model("llama")
    requests = [*REQS, MORE[0],
                lmpatch.EditRequest(prompt="Water boils at", subject="Water", target_new="forty degrees",
                                    target_true="one hundred degrees Celsius"),
                lmpatch.EditRequest(prompt="Ice melts at", subject="Ice", target_new="zero degrees", target_true="Rome")]
    swapped = [replace(r, target_new=r.target_true, target_true=r.target_new) for r in requests]
    trues = [replace(r, target_new=r.target_true, target_true=None) for r in requests]
    new, true = _nll(model, requests).tolist(), _nll(model, trues).tolist()
    expected = [r for r, a, b in zip(requests, new, true) if a >= b]
    assert 0 < len(expected) < len(requests)  # some of each, or the test tells nothing
    bottom = _bottom(model, UltraEditHparams(**FAST))
    assert isinstance(bottom, FrozenBottom) and bottom.layer > 0
    for check in (lambda rs: _still_losing(model, rs), lambda rs: _still_losing(model, rs, bottom)):
        assert check(requests) == expected
        assert {r.prompt for r in check(swapped)} == {r.prompt for r in requests} - {r.prompt for r in expected}
    assert bottom.states  # the replayed pass kept the lower layers' states


def test_turns_re_edit_the_requests_that_still_lose_in_one_patch():
    """turns=2: the first turn edits every request; applied, the requests that still lose
    get a second turn computed on top of it (its statistics and preserved keys counting the
    first's). The call returns one patch equal to the two turns in sequence and leaves the
    model, its preserved keys and its running K_pᵀK_p as they were."""
    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "lr": 1e-5}, preserve=1.0, ridge=0.5)  # too small a step to win every edit at once
    earlier = lmpatch.edit(model, MORE[1:], "ultraedit", hp)
    earlier.apply(model)
    lmpatch.edit(model, MORE[:1], "ultraedit", hp)  # fills the running K_pᵀK_p memo with `earlier`'s keys
    before, keys_before = _state(model), dict(model.stack.edit_keys)
    memo_before = {k: v for k, v in model.stack.solves.items() if k[0] == "ultraedit-earlier-keys"}

    requests = [*REQS, MORE[0]]
    patch = lmpatch.edit(model, requests, "ultraedit", replace(hp, turns=2))
    counts = patch.metrics["edit"]["turns"]
    assert len(counts) == 2 and counts[0] == len(requests) and 0 < counts[1] <= len(requests)
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert set(model.stack.edit_keys) == set(keys_before) | {patch.patch_id}
    for key, (ids, gram) in memo_before.items():
        assert model.stack.solves[key][0] == ids and torch.equal(model.stack.solves[key][1], gram)

    # the same two turns by hand
    first = lmpatch.edit(model, requests, "ultraedit", hp)
    first.apply(model)
    losing = _still_losing(model, requests)
    assert len(losing) == counts[1]
    after_first = _nll(model, losing)
    second = lmpatch.edit(model, losing, "ultraedit", hp)
    second.apply(model)
    by_hand = _state(model)
    second.revert(model)
    first.revert(model)
    patch.apply(model)
    for k, v in _state(model).items():
        torch.testing.assert_close(v, by_hand[k], rtol=1e-5, atol=1e-6)
    assert bool((_nll(model, losing) < after_first).all())  # the second turn moved them further
    stats = patch.metrics[STATS_KEY]
    assert all(entry["count"] == first.metrics["edit"]["tokens"] + second.metrics["edit"]["tokens"]
               for entry in stats.values())
    n_keys = next(iter(model.stack.edit_keys[patch.patch_id].values())).shape[0]
    assert n_keys == first.metrics["edit"]["tokens"] + second.metrics["edit"]["tokens"]
    patch.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_features_read_in_runs_of_similar_length_equal_one_padded_batch():
    """token_features runs requests of similar length together (a padded batch of
    CounterFact prompts is ~45% padding) and gives the rows back in request order, equal to
    one pass over the whole padded batch; the check between turns reads them the same way."""
    from lmpatch.methods.token_grads import gradient_factors
    from lmpatch.methods.ultraedit import _length_runs

    model = tiny_model("llama")
    words = "north south east west river hill town field".split()
    requests = [lmpatch.EditRequest(prompt=" ".join(words[j % 8] for j in range(2 + (5 * i) % 37)),
                                    subject=words[0], target_new=("Rome", "New York City")[i % 2],
                                    target_true=("Paris", "the old town of Lyon")[i % 3 % 2])
                for i in range(40)]
    assert len(_length_runs(model, requests)) > 1
    params = edit_params(model, UltraEditHparams(**FAST))
    features, losses = token_features(model, requests, params)
    batch = target_batch(model, requests, TARGET_NEW)
    factors, whole = gradient_factors(model, [model.model.get_submodule(p.rsplit(".", 1)[0]) for p in params],
                                      requests, batch=batch)
    torch.testing.assert_close(losses, whole.float(), rtol=1e-5, atol=1e-6)
    for p, f in zip(params, factors):
        torch.testing.assert_close(features[p][0], f.inputs[batch.pos_rows, batch.pos_cols].double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(features[p][1], f.grads[batch.pos_rows, batch.pos_cols].double(), rtol=1e-4, atol=1e-7)
    trues = [replace(r, target_new=r.target_true, target_true=None) for r in requests]
    new, true = _nll(model, requests).tolist(), _nll(model, trues).tolist()
    assert _still_losing(model, requests) == [r for r, a, b in zip(requests, new, true) if a >= b]


def test_retry_lr_is_the_step_of_the_later_turns_only():
    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "lr": 1e-6, "turns": 2}, preserve=1.0, ridge=0.5)

    def change(h):
        return [d.materialize() for d in lmpatch.edit(model, REQS, "ultraedit", h).deltas]

    def equal(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    base = change(hp)
    assert equal(change(replace(hp, retry_lr=1e-6)), base)
    assert not equal(change(replace(hp, retry_lr=1e-5)), base)
    assert equal(change(replace(hp, turns=1, retry_lr=1e-5)), change(replace(hp, turns=1)))
    with pytest.raises(lmpatch.LmpatchError, match="retry_lr"):
        lmpatch.edit(model, REQS, "ultraedit", replace(hp, retry_lr=0.0))


def test_a_third_turn_takes_only_the_second_turns_losers(monkeypatch):
    """Turn k > 1 re-reads only turn k - 1's requests: the ones an earlier turn won are held
    by the keys its update preserves, and re-reading them would cost a pass per turn."""
    from lmpatch.methods import ultraedit

    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "lr": 1e-6, "turns": 3}, preserve=1.0, ridge=0.5)
    requests = [*REQS, MORE[0]]
    seen: list[list[str]] = []
    real = ultraedit._still_losing

    def spy(m, reqs, *rest):
        seen.append([r.prompt for r in reqs])
        return real(m, reqs, *rest)

    monkeypatch.setattr(ultraedit, "_still_losing", spy)
    patch = lmpatch.edit(model, requests, "ultraedit", hp)
    counts = patch.metrics["edit"]["turns"]
    assert len(counts) == 3 and counts[0] == len(requests)  # a step this small wins nothing at once
    assert seen[0] == [r.prompt for r in requests] and len(seen[1]) == counts[1] < len(requests)


def test_turns_never_replay_the_patches_below(monkeypatch):
    """The turns go in and out of the weights as one patch on top of the stack, so each
    change costs one sum per edited matrix however many patches a sequential run has
    applied (taking out a patch below the top replays every patch above the base)."""
    from lmpatch.patch import stack

    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "lr": 1e-6, "turns": 3}, preserve=1.0, ridge=0.5)
    for request in MORE:
        lmpatch.edit(model, [request], "ultraedit", hp).apply(model)
    sums = []
    real = stack._summed
    monkeypatch.setattr(stack, "_summed", lambda p, d, pid: sums.append(pid) or real(p, d, pid))
    patch = lmpatch.edit(model, REQS, "ultraedit", hp)
    assert len(patch.metrics["edit"]["turns"]) == 3
    assert len(sums) == 3 * len(edit_params(model, hp))  # one apply per turn, no replay
    # the running K_pᵀK_p the first turn read stays for the next call, which adds one product
    applied = tuple(e.patch_id for e in model.applied)
    assert all(model.stack.solves[("ultraedit-earlier-keys", p)][0] == applied for p in edit_params(model, hp))


def test_margin_keeps_a_narrow_win_in_the_next_turn():
    """With ``margin`` m a request still loses until its new target's mean NLL is m below
    the true target's; a request without a true target needs every token the argmax, as
    without a margin."""
    model = tiny_model("llama")
    requests = [*REQS, MORE[0], replace(MORE[1], target_true="one hundred degrees")]
    trues = [replace(r, target_new=r.target_true, target_true=None) for r in requests]
    new, true = _nll(model, requests).tolist(), _nll(model, trues).tolist()
    winning = sorted(b - a for a, b in zip(new, true) if b > a)  # the true target's NLL above the new's
    assert winning  # some win without a margin, or the test tells nothing
    # between the narrowest win and the next, so the check must add exactly the narrowest
    m = (winning[0] + winning[1]) / 2 if len(winning) > 1 else winning[0] + 0.1
    expected = [r for r, a, b in zip(requests, new, true) if a >= b - m]
    assert _still_losing(model, requests, margin=m) == expected
    assert len(expected) == len(_still_losing(model, requests)) + 1
    assert len(_still_losing(model, requests, margin=1e9)) == len(requests)

def _losing_batch(model, hp, requests):
    """``requests`` applied in one patch too weak to win them (they lose afterwards)."""
    patch = lmpatch.edit(model, requests, "ultraedit", replace(hp, lr=1e-9, turns=1))
    patch.apply(model)
    return patch


def test_earlier_sample_takes_only_the_latest_ultraedit_edit_of_each_prompt():
    """The refresh sample draws from the edits of applied UltraEdit patches, skipping one a
    later patch (of any method) or the call itself edits again, and depends on the stack alone."""
    from lmpatch.methods.ultraedit import earlier_sample

    model = tiny_model("llama")
    hp = UltraEditHparams(**FAST)
    assert earlier_sample(model, REQS, 10) == []
    _losing_batch(model, hp, [*REQS, MORE[1]])
    newer = replace(REQS[0], target_new="Oslo")
    lmpatch.edit(model, [newer], "ft", steps=1).apply(model)  # a later fact of REQS[0]'s prompt
    pool = earlier_sample(model, MORE[:1], 100)
    assert {r.prompt for r in pool} == {r.prompt for r in [*REQS[1:], MORE[1]]}
    assert {r.prompt for r in earlier_sample(model, [MORE[1]], 100)} == {r.prompt for r in REQS[1:]}
    two = earlier_sample(model, MORE[:1], 2)
    assert len(two) == 2 and earlier_sample(model, MORE[:1], 2) == two  # a function of the stack
    assert earlier_sample(model, MORE[:1], 0) == []


@pytest.mark.parametrize("refresh, n_requests, expected", [
    (0, 100, 0), (2, 100, 200), (2, 1, 2), (0.5, 3, 2), (0.01, 1, 1), (0.3, 10, 3),
])
def test_refresh_is_a_number_of_earlier_edits_per_request(refresh, n_requests, expected):
    """A batch of 100 with refresh=2 checks 200 earlier edits, a single edit 2: a stream
    checks as many per edit whichever way it comes; any refresh > 0 checks at least one."""
    from lmpatch.methods.ultraedit import refresh_count

    assert refresh_count(UltraEditHparams(**{**FAST, "refresh": refresh}), n_requests) == expected


def test_refresh_re_edits_the_earlier_edits_that_lose_in_the_first_turn():
    """refresh=n: the call checks up to n earlier UltraEdit edits and re-edits those that
    lose together with its own requests: the patch equals a call on both (one turn here),
    its requests are the call's own, and it names the edits it re-asserted."""
    from lmpatch.methods.ultraedit import earlier_sample

    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "lr": 1e-3}, preserve=1.0, ridge=0.5)
    _losing_batch(model, hp, REQS)
    earlier = earlier_sample(model, MORE[:1], len(REQS))
    losing = _still_losing(model, earlier)
    assert losing  # the weak patch left some of them losing, or the test tells nothing
    patch = lmpatch.edit(model, MORE[:1], "ultraedit", replace(hp, refresh=len(REQS)))
    assert patch.requests == MORE[:1]
    assert patch.metrics["edit"]["refreshed"] == [r.prompt for r in losing]
    assert patch.metrics["edit"]["turns"] == [1 + len(losing)]
    by_hand = lmpatch.edit(model, [MORE[0], *losing], "ultraedit", hp)
    for a, b in zip(patch.deltas, by_hand.deltas):
        torch.testing.assert_close(a.materialize(), b.materialize(), rtol=1e-5, atol=1e-7)
    before = _nll(model, losing)
    patch.apply(model)
    assert bool((_nll(model, losing) < before).all())
    without = lmpatch.edit(model, MORE[:1], "ultraedit", hp)
    assert "refreshed" not in without.metrics["edit"]


def test_refresh_keeps_the_lower_layers_states_while_they_are_unchanged():
    """With refresh, the states below the edited layers outlive the call: the next call
    finds the texts the last one ran (its requests) already there, and its patch equals
    one computed with nothing kept. A patch that changes a lower layer, or a revert of it,
    starts the states afresh."""
    from lmpatch.methods.ultraedit import BOTTOM_MEMO, _bottom

    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "lr": 1e-3, "refresh": len(REQS)}, preserve=1.0, ridge=0.5)
    lmpatch.edit(model, REQS, "ultraedit", hp).apply(model)
    kept = _bottom(model, hp)
    assert kept is _bottom(model, hp) and kept.states  # the first call's texts are there
    n_kept = len(kept.states)
    patch = lmpatch.edit(model, MORE[:1], "ultraedit", hp)
    assert _bottom(model, hp) is kept and len(kept.states) > n_kept
    model.stack.solves.pop((BOTTOM_MEMO, kept.layer, kept.compute_dtype))  # nothing kept: the same patch
    fresh = lmpatch.edit(model, MORE[:1], "ultraedit", hp)
    for a, b in zip(patch.deltas, fresh.deltas):
        torch.testing.assert_close(a.materialize(), b.materialize(), rtol=1e-5, atol=1e-7)
    kept = _bottom(model, hp)
    low = lmpatch.edit(model, MORE[1:], "ft", layers=[0], steps=2)
    low.apply(model)
    assert _bottom(model, hp) is not kept
    kept = _bottom(model, hp)
    low.revert(model)
    assert _bottom(model, hp) is not kept
    assert _bottom(model, replace(hp, refresh=0)) is not _bottom(model, replace(hp, refresh=0))  # per call


def test_covariance_weighs_the_ridge_by_the_keys_of_ordinary_text():
    """covariance=True solves ΔW = Vᵀ K (KᵀK + λC0)⁻¹ with MEMIT's C0 of each edited layer,
    computed by the method's one-off; without it the same batch gets λI."""
    model = tiny_model("llama")
    hp = UltraEditHparams(**{**FAST, "covariance": True}, stats_tokens=600, ridge=0.5, preserve=0.0)
    jobs = get_method("ultraedit").one_offs(model, hp)
    assert len(jobs) == 2 and not jobs[0].done()
    jobs[0].run(False)
    assert jobs[0].done()
    patch = lmpatch.edit(model, REQS, "ultraedit", hp)
    plain = lmpatch.edit(model, REQS, "ultraedit", **{**FAST, "ridge": 0.5, "preserve": 0.0})
    params = edit_params(model, hp)
    covs = layer_covariances(model, edit_layers(model, hp), hp.stats_config())
    features, _ = token_features(model, REQS, params)
    for param, layer, delta, loose in zip(params, edit_layers(model, hp), patch.deltas, plain.deltas):
        keys = features[param][0]
        eye = torch.eye(keys.shape[1], dtype=torch.float64)
        values = loose.materialize(torch.float64) @ (keys.T @ keys + hp.ridge * eye) @ torch.linalg.pinv(keys)
        c0 = covs[layer].matrix.double()
        expected = values @ keys @ torch.linalg.inv(keys.T @ keys + hp.ridge * c0)
        torch.testing.assert_close(delta.materialize(torch.float64), expected, rtol=1e-3,
                                   atol=1e-4 * float(expected.abs().max()))
        assert not torch.allclose(delta.materialize(torch.float64), loose.materialize(torch.float64))


def test_statistics_per_shape_or_per_module():
    """Gate and up projections share one normaliser by default (same shape, as the paper);
    with statistics="module" each matrix has its own; other methods' patches add nothing."""
    model = tiny_model("llama")
    shared = lmpatch.edit(model, REQS, "ultraedit", **FAST, modules=("mlp_in", "mlp_out"), layers=(2, 3))
    assert len(shared.deltas) == 6 and sorted(shared.metrics[STATS_KEY]) == ["128x64", "64x128"]
    assert len(shared.metrics[STATS_KEY]["64x128"]["params"]) == 4
    own = lmpatch.edit(model, REQS, "ultraedit", **FAST, modules=("mlp_in",), layers=(3,), statistics="module")
    assert sorted(own.metrics[STATS_KEY]) == sorted(d.param for d in own.deltas)
    other = lmpatch.edit(model, REQS[:1], "rome", **conformance.FAST["rome"])
    with other.applied(model):
        again = lmpatch.edit(model, REQS, "ultraedit", **FAST)
    assert again.metrics["edit"]["earlier_count"] == lmpatch.edit(model, REQS, "ultraedit", **FAST).metrics["edit"]["earlier_count"]


def test_warm_up_is_cached_and_optional():
    """The warm-up is computed once (a one-off the CLI runs up front) and read back; without
    it (the paper's cold start) one edit with a one-token target standardises a single row,
    which writes nothing."""
    model = tiny_model("llama")
    hp = UltraEditHparams(**FAST)
    (one_off,) = get_method("ultraedit").one_offs(model, hp)
    assert not one_off.done()
    one_off.run(False)
    assert one_off.done() and one_off.where == warmup_file(model, edit_params(model, hp), hp)
    assert lmpatch.edit(model, REQS[0], "ultraedit", **FAST).deltas[0].norm() > 0
    assert get_method("ultraedit").one_offs(model, UltraEditHparams(warmup=0, covariance=False)) == []
    cold = lmpatch.edit(model, REQS[0], "ultraedit", **{**FAST, "warmup": 0})
    assert cold.metrics["edit"]["tokens"] == 1 and cold.deltas[0].norm() == 0.0


@pytest.mark.parametrize("bad", [
    dict(lr=0.0), dict(lr=float("nan")), dict(ridge=-1.0), dict(statistics="layer"), dict(modules=("attn",)),
    dict(modules=()), dict(warmup=-1), dict(preserve=-1.0), dict(preserve=float("inf")), dict(preserve_scale="mean"),
    dict(covariance=True, modules=("mlp_in",)), dict(covariance=True, stats_tokens=0), dict(layers=(99,)), dict(layer_range=(0.9, 0.1)),
    dict(turns=0), dict(turns=-2), dict(margin=-0.1), dict(margin=float("nan")), dict(refresh=-1), dict(refresh=float("inf")),
    dict(refresh=float("nan")), dict(refresh=True), dict(compute_dtype="int8"),
])
def test_bad_settings_are_one_clear_error(bad):
    model = tiny_model("llama")
    with pytest.raises(lmpatch.LmpatchError):
        lmpatch.edit(model, REQS[:1], "ultraedit", **{**FAST, **bad})


@pytest.mark.parametrize("arch", ARCHS + SEQ2SEQ_ARCHS[:1])
def test_life_cycle_on_every_architecture(arch, tmp_path, monkeypatch):
    """The conformance life cycle (edit, apply, generate, revert bit-exact, save, load, same
    logits), with this module's fast settings; T5 is refused with the registry's error."""
    monkeypatch.setitem(conformance.FAST, "ultraedit", FAST)
    conformance.test_method_life_cycle("ultraedit", arch, tmp_path, monkeypatch)


@pytest.mark.parametrize("arch", ARCHS)
def test_turns_on_every_architecture(arch, tmp_path, monkeypatch):
    """The same life cycle with the default three turns at a step too small to win at once,
    so the replayed lower layers and the held keys run on every block layout."""
    monkeypatch.setitem(conformance.FAST, "ultraedit", {**FAST, "lr": 1e-6, "turns": 3})
    conformance.test_method_life_cycle("ultraedit", arch, tmp_path, monkeypatch)


@pytest.mark.parametrize("arch", ARCHS)
def test_refresh_and_margin_on_every_architecture(arch):
    """A call that re-edits earlier edits (``refresh``) and keeps narrow wins for another
    turn (``margin``) on every block layout: the model is left as it was, and its patch
    applies and reverts bit-exactly on top of the earlier one."""
    model = tiny_model(arch)
    hp = UltraEditHparams(**{**FAST, "lr": 1e-6, "turns": 2, "margin": 0.5, "refresh": 10})
    lmpatch.edit(model, REQS, "ultraedit", replace(hp, refresh=0)).apply(model)
    before = _state(model)
    patch = lmpatch.edit(model, MORE[:1], "ultraedit", hp)
    assert patch.metrics["edit"]["refreshed"]  # a step this small left the earlier edits losing
    assert patch.metrics["edit"]["turns"][0] == 1 + len(patch.metrics["edit"]["refreshed"])
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    patch.apply(model)
    assert not all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    patch.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_bfloat16_passes_give_the_float32_update_to_their_rounding():
    """compute_dtype="bfloat16" (what "auto" picks where the CPU multiplies bfloat16 in
    hardware) runs the passes - keys, gradients, the checks, the kept lower layers - in a
    bfloat16 copy of the model; the update is still solved in float64 and written in
    float32, and it is the float32 passes' update up to bfloat16 rounding. The model's
    own weights stay float32 and untouched."""
    from lmpatch.methods.ultraedit import _bottom
    from lmpatch.model.shadow import cpu_has_fast_bf16

    model = tiny_model("llama")
    before = _state(model)
    hp32 = UltraEditHparams(**FAST, preserve=1.0, ridge=0.5)
    hp16 = replace(hp32, compute_dtype="bfloat16")
    assert pass_dtype(model, hp32) is None and pass_dtype(model, hp16) == torch.bfloat16
    assert pass_dtype(model, replace(hp32, compute_dtype="auto")) == (torch.bfloat16 if cpu_has_fast_bf16() else None)
    exact = lmpatch.edit(model, REQS, "ultraedit", hp32)
    rounded = lmpatch.edit(model, REQS, "ultraedit", hp16)
    for a, b in zip(exact.deltas, rounded.deltas):
        wa, wb = a.materialize(), b.materialize()
        assert wb.dtype == torch.float32
        error = float((wa - wb).norm() / wa.norm())
        assert 0 < error < 0.05, error  # bfloat16 keeps 8 bits: different, and close
    for name, value in _state(model).items():
        assert torch.equal(value, before[name])
    kept = _bottom(model, replace(hp16, refresh=2))
    assert next(kept.blocks[0].parameters()).dtype == torch.bfloat16
    start = _nll(model, REQS)
    rounded.apply(model)
    assert bool((_nll(model, REQS) < start).all())  # and it edits


def test_added_rows_inverse_is_the_inverse_with_the_rows_added():
    from lmpatch.methods.locate.solve import added_rows_inverse

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    a = base.T @ base / 40 + 0.1 * torch.eye(24, dtype=torch.float64)
    rows = torch.randn(3, 24, generator=gen, dtype=torch.float64)
    expected = torch.linalg.inv(a + 0.7 * rows.T @ rows)
    torch.testing.assert_close(added_rows_inverse(torch.linalg.inv(a), rows, 0.7), expected, rtol=1e-10, atol=1e-12)


def test_a_stream_of_small_edits_keeps_the_ridge_inverse_and_gets_the_same_patches():
    """A small call keeps its ridge's inverse on the model; the next adds the keys of the
    patches applied since (Woodbury) instead of factorising afresh. Its patch must be the
    one a fresh factorisation gives; a revert below the top, or a call too large, starts
    afresh."""
    from lmpatch.methods.ultraedit import RIDGE_MEMO

    model = tiny_model("llama")
    hp = UltraEditHparams(**FAST, preserve=1.0, ridge=0.5)
    params = edit_params(model, hp)
    stream = [*REQS, *MORE]
    patches = []
    for r in stream:
        patches.append(lmpatch.edit(model, [r], "ultraedit", hp))
        patches[-1].apply(model)
    kept = [model.stack.solves[(RIDGE_MEMO, p)] for p in params]
    # the first call has no earlier keys, the second inverts afresh, each later one updates
    assert all(k[4] == len(stream) - 2 for k in kept)

    def fresh(requests):
        for p in params:
            model.stack.solves.pop((RIDGE_MEMO, p), None)
        return lmpatch.edit(model, requests, "ultraedit", hp)

    probe = [replace(REQS[0], target_new="Oslo")]
    chained = lmpatch.edit(model, probe, "ultraedit", hp)
    assert model.stack.solves[(RIDGE_MEMO, params[0])][4] == len(stream) - 1  # the last patch's keys added
    for a, b in zip(chained.deltas, fresh(probe).deltas):
        torch.testing.assert_close(a.materialize(), b.materialize(), rtol=1e-6, atol=1e-9)
    patches[1].revert(model)  # the kept inverse holds its keys: it must not be used
    after_revert = lmpatch.edit(model, probe, "ultraedit", hp)
    assert model.stack.solves[(RIDGE_MEMO, params[0])][4] == 0
    kind, factor = model.stack.solves[(RIDGE_MEMO, params[0])][3]  # kept as its factor: no inverse
    assert kind == "factor" and torch.equal(factor, torch.tril(factor))  # until a next call needs one
    for a, b in zip(after_revert.deltas, fresh(probe).deltas):
        torch.testing.assert_close(a.materialize(), b.materialize(), rtol=1e-6, atol=1e-9)
    many = [replace(REQS[0], prompt=f"Fact number {i} is", subject=f"number {i}") for i in range(40)]
    lmpatch.edit(model, many, "ultraedit", hp)  # more tokens than a small call: nothing kept
    assert (RIDGE_MEMO, params[0]) not in model.stack.solves
