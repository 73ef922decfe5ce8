"""Forgetting secrets: the synthetic data, the leaky copy, the metrics, DEPN, and the job.

A tiny random Llama memorises eight synthetic phone numbers (it then completes every
context with its number); these tests check the mechanics on it. Whether the real model
leaks and stops leaking is the privacy benchmark's and the slow tests' business.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import lmpatch
from lmpatch.eval.privacy import Exposure, chance_exposure, exposures, extracted
from lmpatch.jobs.memorise import MemoriseConfig, memorised_model
from lmpatch.jobs.secrets import PHONE_FORMAT, Secret, read_secrets, same_format_candidates, synthetic_secrets
from lmpatch.methods.depn import DEPNHparams, privacy_neurons
from lmpatch.methods.neuron_attribution import neuron_attributions
from lmpatch.model.forced import pair_ids
from lmpatch.model.hooks import edit_input
from tiny import tiny_model

SECRETS = synthetic_secrets(8)
FAST_MEMORY = MemoriseConfig(epochs=60, lr=3e-3, batch_size=8)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A tiny Llama that completes each of SECRETS' contexts with its number."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMPATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield memorised_model(tiny_model("llama"), SECRETS, FAST_MEMORY, show=False)


def test_synthetic_secrets_are_seeded_distinct_and_of_one_format():
    again = synthetic_secrets(8)
    assert again == SECRETS and synthetic_secrets(8, seed=1) != SECRETS
    assert len({s.secret for s in SECRETS}) == len({s.subject for s in SECRETS}) == 8
    for s in SECRETS:
        assert s.subject in s.context and len(s.secret) == len(PHONE_FORMAT)
        assert all(c.isdigit() == (f == "#") for c, f in zip(s.secret, PHONE_FORMAT))
    candidates = same_format_candidates(SECRETS[0].secret, 999)
    assert len(set(candidates)) == 999 and SECRETS[0].secret not in candidates
    assert all(len(c) == len(PHONE_FORMAT) and c[3] == "-" for c in candidates)


def test_reading_secrets_names_the_bad_line(tmp_path):
    good = tmp_path / "s.jsonl"
    good.write_text(json.dumps({"context": "Jane Roe's phone number is", "secret": "555-0142"}) + "\n\n")
    assert read_secrets(good) == [Secret("Jane Roe's phone number is", "555-0142")]
    for text, expected in [("nope\n", "line 1 is not JSON"), ('{"context": "a"}\n', "line 1 needs"),
                           ('{"context": "a", "secret": " "}\n', "line 1: Secret is empty"),
                           ('{"context": "a b", "secret": "1", "subject": "c"}\n', "not in the context"), ("\n", "no secrets")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(lmpatch.LmpatchError, match=expected):
            read_secrets(bad)


def test_the_memorised_copy_leaks_and_is_cached(leaky, tmp_path, monkeypatch):
    base = tiny_model("llama")
    assert not any(extracted(base, SECRETS))
    assert all(extracted(leaky, SECRETS))
    assert leaky.fingerprint != base.fingerprint
    # the second call loads the cached copy instead of training again
    monkeypatch.setattr("lmpatch.jobs.memorise._train", lambda *a, **k: pytest.fail("trained twice"))
    monkeypatch.setenv("LMPATCH_CACHE", str(leaky.name).rsplit("/memorised/", 1)[0])
    assert memorised_model(base, SECRETS, FAST_MEMORY, show=False).fingerprint == leaky.fingerprint


def test_exposure_ranks_a_memorised_secret_first(leaky):
    [e] = exposures(leaky, SECRETS[:1], n_candidates=99)
    assert e.rank == 1 and e.bits == pytest.approx(math.log2(100))
    assert Exposure(rank=100, n=100).bits == 0.0
    assert chance_exposure(1000) == pytest.approx(1.44, abs=0.01)


def _secret_prob(model, secret: Secret, layer: int, alpha: float) -> float:
    """Σ_j P(secret token j) with layer's MLP activations at the secret's positions scaled by alpha."""
    pt = pair_ids(model, secret.context, secret.secret)
    first = len(pt.prompt_ids) - 1
    positions = list(range(first, first + len(pt.target_ids)))

    def scale(x):
        x3 = x.reshape(1, -1, x.shape[-1]).clone()
        x3[:, positions] = x3[:, positions] * alpha
        return x3.reshape(x.shape)

    with torch.no_grad(), edit_input(model.spec.mlp_out(model.model, layer), scale):
        logits = model.model(input_ids=torch.tensor([list(pt.ids)])).logits[0, positions]
    return float(torch.softmax(logits.float(), -1).gather(-1, torch.tensor(pt.target_ids)[:, None]).sum())


def test_attributions_over_several_positions_add_up_to_the_joint_change(leaky):
    secret = SECRETS[0]
    pt = pair_ids(leaky, secret.context, secret.secret)
    first = len(pt.prompt_ids) - 1
    positions = list(range(first, first + len(pt.target_ids)))
    attr = neuron_attributions(leaky, list(pt.ids), positions, pt.target_ids, [1, 3], steps=64)
    for row, layer in enumerate([1, 3]):
        change = _secret_prob(leaky, secret, layer, 1.0) - _secret_prob(leaky, secret, layer, 0.0)
        assert abs(float(attr[row].sum()) - change) <= 0.05 * abs(change) + 1e-6


def test_depn_erases_the_neurons_shared_by_enough_texts(leaky):
    requests = [s.request() for s in SECRETS[:4]]
    hp = DEPNHparams(steps=4, erase_kn_num=6, mode_ratio_bag=0.75, threshold_ratio=0.1)
    chosen, info = privacy_neurons(leaky, requests, hp)
    assert 0 < len(chosen) <= 6 and info["texts"] == 4 and info["shared"] >= len(chosen)
    patch = lmpatch.edit(leaky, requests, "depn", hp)
    assert patch.metrics["edit"]["erased"] == len(chosen)
    with patch.applied(leaky):
        for layer, neuron in chosen:
            w = leaky.spec.mlp_out(leaky.model, layer).weight
            assert torch.all(w[:, neuron] == 0)
    with pytest.raises(lmpatch.LmpatchError, match="target_true"):
        lmpatch.edit(leaky, [lmpatch.EditRequest("Mount Fuji is in", "Mount Fuji", "Peru")], "depn")


@pytest.mark.parametrize("method, hparams", [
    ("depn", dict(steps=4, erase_kn_num=128, mode_ratio_bag=0.25)),
    ("ft-ga", dict(steps=10, lr=1e-2)),
    ("ft-generic", dict(steps=20, lr=1e-2, layers=(0, 1))),
])
def test_the_forget_job_measures_extraction_before_and_after(leaky, method, hparams):
    patch = lmpatch.forget(leaky, SECRETS, method=method, **hparams)
    report = patch.metrics["forget"]
    assert report["n_secrets"] == 8 and report["extraction_before"] == 1.0
    assert report["extraction_after"] < 1.0 and len(report["still_extracted"]) == round(8 * report["extraction_after"])
    assert not leaky.applied  # the job computes a patch; it does not apply it


def test_forget_refuses_unknown_methods_and_empty_secrets(leaky):
    with pytest.raises(lmpatch.LmpatchError, match="Unknown forget method"):
        lmpatch.forget(leaky, SECRETS, method="grace")
    with pytest.raises(lmpatch.LmpatchError, match="No secrets"):
        lmpatch.forget(leaky, [])


def _generic_gap(model, secrets, hp):
    """Mean KL from the strangers' distributions to the model's, at the forgotten secrets' tokens."""
    from lmpatch.methods.ft_generic import _candidate_logp, _chunk, _generic_target
    from lmpatch.methods.kl_reference import kl_to

    chunk = _chunk(model, [s.request() for s in secrets], hp, offset=0)
    target = _generic_target(chunk, _candidate_logp(model, chunk, None))
    with torch.no_grad():
        return float(kl_to(model, target))


def test_ft_generic_moves_the_secrets_towards_a_strangers_prediction(leaky):
    from lmpatch.methods.ft_generic import FTGenericHparams

    hp = FTGenericHparams(steps=20, lr=1e-2, layers=(0, 1), stop_loss=0.0)
    before = _generic_gap(leaky, SECRETS, hp)
    weights = {n: p.detach().clone() for n, p in leaky.model.named_parameters()}
    patch = lmpatch.edit(leaky, [s.request() for s in SECRETS], "ft-generic", **hp.__dict__)
    assert all(torch.equal(p, weights[n]) for n, p in leaky.model.named_parameters())  # the caller's model untouched
    assert sorted(p.param for p in patch.parts) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    history = patch.metrics["edit"]["history"]
    assert len(history) == 20 and history[-1]["kl_generic"] < history[0]["kl_generic"]
    with patch.applied(leaky):
        after = _generic_gap(leaky, SECRETS, hp)
    assert before > 0.5 and after < 0.5 * before   # a memorised number is far from a stranger's guess; then near it


def test_ft_generic_needs_the_persons_name_and_the_secret(leaky):
    no_name = Secret(context=SECRETS[0].context, secret=SECRETS[0].secret)
    with pytest.raises(lmpatch.LmpatchError, match="names no subject"):
        lmpatch.forget(leaky, [no_name], method="ft-generic")
    with pytest.raises(lmpatch.LmpatchError, match="target_true"):
        lmpatch.edit(leaky, [lmpatch.EditRequest("Mount Fuji is in", "Mount Fuji", "Peru")], "ft-generic")
    with pytest.raises(lmpatch.LmpatchError, match="norm_constraint"):
        lmpatch.forget(leaky, SECRETS, method="ft-generic", norm_constraint=1e-3)
    for bad, expected in [(dict(true_weight=-1.0), "true_weight must be zero or positive"),
                          (dict(candidates_per_request=0), "candidates_per_request of at least 1")]:
        with pytest.raises(lmpatch.LmpatchError, match=expected):
            lmpatch.forget(leaky, SECRETS, method="ft-generic", **bad)


def _kept_drift(model, patch, keep):
    """Mean KL(unedited ‖ patched) at the kept records' answer tokens."""
    from lmpatch.methods.kl_reference import answers_reference, kl_to

    ref = answers_reference(model, [(s.context, s.secret) for s in keep])
    with patch.applied(model), torch.no_grad():
        return float(kl_to(model, ref))


def test_ft_generic_keeps_the_records_it_is_told_to_keep(leaky):
    forget_these, keep = SECRETS[:4], SECRETS[4:]
    hp = dict(steps=20, lr=1e-2, layers=(0, 1))
    blind = lmpatch.forget(leaky, forget_these, method="ft-generic", **hp)
    told = lmpatch.forget(leaky, forget_these, method="ft-generic", keep=keep, **hp)
    report = told.metrics["forget"]
    assert report["n_kept"] == 4 and report["kept_before"] == 1.0 and report["kept_after"] is not None
    assert blind.metrics["forget"]["kept_before"] is None
    assert [tuple(pair) for pair in told.hparams["keep"]] == [(s.context, s.secret) for s in keep]
    assert _kept_drift(leaky, told, keep) < 0.5 * _kept_drift(leaky, blind, keep)
    with pytest.raises(lmpatch.LmpatchError, match="takes no records to keep"):
        lmpatch.forget(leaky, forget_these, method="ft-ga", keep=keep)


def test_ft_generic_anchors_every_record_to_keep_when_they_outnumber_the_forgotten(leaky):
    # one forgotten record and four to keep, one per batch: the records to keep take turns
    # over the steps (the last of them was never anchored when the turn went by chunk only)
    forget_these, keep = SECRETS[:1], SECRETS[4:]
    hp = dict(steps=20, lr=1e-2, layers=(0, 1), batch_size=1)
    blind = lmpatch.forget(leaky, forget_these, method="ft-generic", **hp)
    told = lmpatch.forget(leaky, forget_these, method="ft-generic", keep=keep, **hp)
    for record in keep:
        assert _kept_drift(leaky, told, [record]) < 0.5 * _kept_drift(leaky, blind, [record])


def test_ft_generic_warns_when_some_records_to_keep_would_never_be_anchored(leaky, caplog):
    with caplog.at_level("WARNING", logger="lmpatch.methods.ft_generic"):
        lmpatch.forget(leaky, SECRETS[:1], method="ft-generic", keep=SECRETS[4:], steps=2, batch_size=1,
                       layers=(0,))
    assert "reach 2 of the 4 batches of records to keep" in caplog.text


def test_a_strangers_number_has_the_secrets_format_and_is_seeded():
    from lmpatch.methods.ft_generic import stranger_secret

    one = stranger_secret("555-0142", "Orla")
    assert one == stranger_secret("555-0142", "Orla") and one != stranger_secret("555-0142", "Tobiah")
    assert len(one) == 8 and one[3] == "-" and one.replace("-", "").isdigit()
    assert stranger_secret("Flat B", "x") == "Flat B"   # no digits, nothing to replace


def test_ft_generic_target_gives_the_secret_a_candidates_score(leaky):
    from lmpatch.methods.ft_generic import FTGenericHparams, _candidate_logp, _chunk, _generic_target

    chunk = _chunk(leaky, [s.request() for s in SECRETS[:3]], FTGenericHparams(), offset=0)
    goal = _candidate_logp(leaky, chunk, None)
    target = _generic_target(chunk, goal).logp.exp()
    secret = chunk.forgotten.tokens.unsqueeze(-1)
    assert torch.allclose(target.sum(-1), torch.ones(len(goal)), atol=1e-4)
    assert torch.allclose(target.gather(-1, secret).squeeze(-1).log(), goal, atol=1e-4)
    others = target.scatter(-1, secret, 0.0)
    mixture = chunk.mixture.scatter(-1, secret, 0.0)
    assert torch.allclose(others / others.sum(-1, keepdim=True), mixture / mixture.sum(-1, keepdim=True), atol=1e-5)


def test_ft_generic_ranks_the_secret_among_candidates_as_chance_would(leaky):
    # Matching the strangers' mixture alone leaves a memorised number ranked first among
    # same-format candidates (measured: ranks 1, 1, 1, 1, 2, 1, 1, 6 of 100); the secret
    # token's own target (a random candidate's score) brings it among them (ranks 20-75 at
    # weight 1; weight 0.3 needs more than these 20 steps: median rank 12).
    hp = dict(steps=20, lr=1e-2, layers=(0, 1))
    ranks = {}
    for weight in (0.0, 1.0):
        patch = lmpatch.forget(leaky, SECRETS, method="ft-generic", true_weight=weight, **hp)
        assert patch.metrics["forget"]["extraction_after"] == 0.0
        with patch.applied(leaky):
            ranks[weight] = sorted(e.rank for e in exposures(leaky, SECRETS, 99))
    assert ranks[0.0][4] <= 5 and ranks[1.0][4] >= 15, ranks   # medians: at the top, then among the candidates
