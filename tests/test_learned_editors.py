"""MEND, KE and the pieces every learned editor shares: gradient factors, per-row edits,
the frozen bottom, MEND's gradient network, the training loop with resume, the artefact."""
from __future__ import annotations

import pytest
import torch

import lmpatch
from facts import REQS
from lmpatch.methods import editor_training
from lmpatch.methods.frozen_bottom import FrozenBottom
from lmpatch.methods.hparams import with_overrides
from lmpatch.methods.mend_net import GradientNet, RunningNorm
from lmpatch.methods.registry import get_method
from lmpatch.methods.teacher import TARGET_NEW, request_nll, target_batch
from lmpatch.methods.token_grads import gradient_factors, row_deltas
from tiny import tiny_model

FAST = {"mend": dict(steps=4, batch_size=2, rank=4), "ke": dict(steps=4, batch_size=2, hidden=4)}
LEARNED = sorted(FAST)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _top_modules(model):
    spec = model.spec
    top = spec.n_layers - 1
    return [spec.module(model.model, p) for p in spec.layers[top].mlp_in] + [spec.mlp_out(model.model, top)]


def test_gradient_factors_sum_to_each_requests_weight_gradient(model):
    modules = _top_modules(model)
    factors, losses = gradient_factors(model, modules, REQS[:2])
    assert losses.shape == (2,)
    for row, request in enumerate(REQS[:2]):
        weights = [m.weight for m in modules]
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        request_nll(model, target_batch(model, [request], TARGET_NEW)).sum().backward()
        for w, f in zip(weights, factors):
            assert torch.allclose(w.grad, f.gradient(row), atol=1e-5)
            w.requires_grad_(False)
            w.grad = None


def test_row_deltas_equal_editing_each_rows_weights(model):
    module = _top_modules(model)[-1]
    d_out, d_in = module.weight.shape
    g = torch.Generator().manual_seed(0)
    u, d = torch.randn(2, 3, d_in, generator=g) * 0.1, torch.randn(2, 3, d_out, generator=g) * 0.1
    batch = target_batch(model, REQS[:2], TARGET_NEW)
    with row_deltas([module], [(u, d)]):
        both = request_nll(model, batch)
    for row in range(2):
        original = module.weight.detach().clone()
        with torch.no_grad():
            module.weight += d[row].T @ u[row]
        alone = request_nll(model, target_batch(model, [REQS[row]], TARGET_NEW))
        with torch.no_grad():
            module.weight.copy_(original)
        assert torch.allclose(both[row], alone[0], atol=1e-5)


def test_replaying_the_frozen_bottom_gives_the_full_forward(model):
    bottom = FrozenBottom(model, model.spec.n_layers - 1)
    batch = target_batch(model, REQS[:3], TARGET_NEW)
    full = request_nll(model, batch)
    with bottom.replaying(batch.input_ids, batch.attention_mask):
        first = request_nll(model, batch)
    assert len(bottom.states) == 3
    # a batch padded differently reuses the states kept per text
    other = target_batch(model, REQS[1:3], TARGET_NEW)
    with bottom.replaying(other.input_ids, other.attention_mask):
        again = request_nll(model, other)
    assert len(bottom.states) == 3
    assert torch.allclose(first, full, atol=1e-5) and torch.allclose(again, full[1:], atol=1e-5)


def test_a_bounded_frozen_bottom_drops_the_longest_kept_states_never_the_current_ones(model):
    bottom = FrozenBottom(model, model.spec.n_layers - 1, max_states=1)
    for batch in (target_batch(model, REQS[:2], TARGET_NEW), target_batch(model, REQS[1:3], TARGET_NEW)):
        with bottom.replaying(batch.input_ids, batch.attention_mask):
            replayed = request_nll(model, batch)
        assert torch.allclose(replayed, request_nll(model, batch), atol=1e-5)
        assert set(bottom.states) == set(bottom._rows(batch.input_ids, batch.attention_mask))  # a pass's own stay
    with pytest.raises(ValueError, match="max_states"):
        FrozenBottom(model, 1, max_states=0)


def test_running_norm_pools_moments_exactly_and_the_network_starts_as_the_identity():
    norm = RunningNorm(modes=2, dim=5)
    x = torch.randn(40, 5, dtype=torch.float64).float()
    norm.update(1, x[:13])
    norm.update(1, x[13:])
    assert torch.allclose(norm.mean[1], x.mean(0), atol=1e-5)
    assert torch.allclose(norm.var[1], x.var(0, unbiased=False), atol=1e-5)
    assert torch.equal(norm.mean[0], torch.zeros(5))
    net = GradientNet(d_in=3, d_out=2, modes=1, rank=2)
    u, d = torch.randn(4, 3), torch.randn(4, 2)
    out_u, out_d = net(0, u, d)
    assert torch.allclose(out_u, u) and torch.allclose(out_d, d)  # unit statistics: the identity


def _train(model, tmp_path, monkeypatch, method="mend"):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(editor_training.TrainingConfig, "__init__", _small_config_init(), raising=True)
    info = get_method(method)
    return info.train(model, with_overrides(info.hparams, FAST[method]), show=False)


def _small_config_init():
    real = editor_training.TrainingConfig.__init__

    def init(self, **kw):
        real(self, **{**kw, "validate_every": 2, "validate_records": 4, "checkpoint_every": 2})
    return init


@pytest.mark.parametrize("method", LEARNED)
def test_editing_with_an_untrained_editor_names_the_command_to_run(model, tmp_path, monkeypatch, method):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path))
    with pytest.raises(lmpatch.LmpatchError, match=f"lmpatch train {method}") as caught:
        lmpatch.edit(model, REQS[0], method, **FAST[method])
    # Only MEND ships an editor; KE's error must not promise that the defaults need no training.
    assert ("needs no training" in str(caught.value)) == (method == "mend")


@pytest.mark.parametrize("method", LEARNED)
def test_training_validates_saves_and_edits_in_one_call(model, tmp_path, monkeypatch, method):
    report = _train(model, tmp_path, monkeypatch, method)
    assert [v["step"] for v in report["validation"]] == [2, 4]
    assert {"efficacy", "paraphrase", "locality"} <= set(report["validation"][-1])
    assert not any(tmp_path.rglob("checkpoint"))  # a finished run leaves no checkpoint behind
    one = lmpatch.edit(model, REQS[0], method, **FAST[method])
    n_matrices = {"mend": 9, "ke": 3}[method]  # 3 layers x (gate, up, down) or (down)
    assert len(one.parts) == n_matrices and one.parts[-1].param.endswith("down_proj.weight")
    assert one.metrics["edit_seconds"] < 5
    batch = lmpatch.edit(model, REQS[:3], method, **FAST[method])  # three edits, one call, one patch
    assert len(batch.parts) == n_matrices and len(batch.requests) == 3
    with batch.applied(model):
        pass


@pytest.mark.parametrize("method", LEARNED)
def test_an_interrupted_training_resumes_to_the_same_editor(model, tmp_path, monkeypatch, method):
    _train(model, tmp_path / "whole", monkeypatch, method)
    reference = lmpatch.edit(model, REQS[0], method, **FAST[method])

    real = editor_training.save_artefact

    def stop_after_first_checkpoint(folder, state, manifest):
        real(folder, state, manifest)
        if folder.name == "checkpoint":
            raise KeyboardInterrupt

    monkeypatch.setattr(editor_training, "save_artefact", stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _train(model, tmp_path / "cut", monkeypatch, method)
    monkeypatch.setattr(editor_training, "save_artefact", real)
    _train(model, tmp_path / "cut", monkeypatch, method)
    resumed = lmpatch.edit(model, REQS[0], method, **FAST[method])
    for a, b in zip(reference.parts, resumed.parts):
        assert torch.equal(a.materialize(), b.materialize())


def test_kes_multiplier_moves_by_the_relative_violation_within_its_bounds():
    from lmpatch.methods.ke import KEHparams, next_multiplier

    hp = KEHparams(margin=0.02, lagrange_lr=0.01, lagrange_max=10.0)
    one = torch.tensor(1.0)
    up = next_multiplier(one, torch.tensor(5.0), hp)      # 250x the margin: one capped step up
    assert torch.isclose(up, torch.tensor(0.01).exp())
    down = next_multiplier(one, torch.tensor(0.0), hp)    # satisfied: one full step down
    assert torch.isclose(down, torch.tensor(-0.01).exp())
    assert next_multiplier(one, torch.tensor(0.02), hp) == one
    assert next_multiplier(torch.tensor(10.0), torch.tensor(1.0), hp) == 10.0
    # what ran away before: 1,500 steps far above the margin now end at the cap, and the
    # same number of steps below it bring λ back down
    lam = one
    for _ in range(1500):
        lam = next_multiplier(lam, torch.tensor(1.0), hp)
    assert lam == 10.0
    for _ in range(1500):
        lam = next_multiplier(lam, torch.tensor(0.001), hp)
    assert lam < 1.0


def test_batched_edit_losses_score_every_prompt_under_the_sum_of_all_edits(model):
    """``together``: every row sees the summed change of all the step's edits, which is
    what applying the batched edit's weight change gives."""
    from lmpatch.methods.learned_editing import _per_row

    module = _top_modules(model)[-1]
    d_out, d_in = module.weight.shape
    g = torch.Generator().manual_seed(1)
    u, d = torch.randn(2, 3, d_in, generator=g) * 0.1, torch.randn(2, 3, d_out, generator=g) * 0.1
    batch = target_batch(model, REQS[:2], TARGET_NEW)
    with row_deltas([module], _per_row([(u, d)], torch.arange(2), together=True)):
        both = request_nll(model, batch)
    original = module.weight.detach().clone()
    with torch.no_grad():
        module.weight += d[0].T @ u[0] + d[1].T @ u[1]
    summed = request_nll(model, batch)
    with torch.no_grad():
        module.weight.copy_(original)
    assert torch.allclose(both, summed, atol=1e-5)


def test_a_field_added_after_shipping_keys_the_artefact_only_when_changed():
    from lmpatch.methods.learned_editing import training_settings
    from lmpatch.methods.mend import MendHparams

    assert "batched" not in training_settings(MendHparams())  # the shipped editor's key is unchanged
    assert training_settings(MendHparams(batched=True))["batched"] is True


def test_mend_trains_on_batched_edits_and_validates_both_ways(model, tmp_path, monkeypatch):
    monkeypatch.setitem(FAST, "mend", {**FAST["mend"], "batched": True})
    report = _train(model, tmp_path, monkeypatch)
    last = report["validation"][-1]
    assert {"efficacy", "batch_efficacy", "batch_locality"} <= set(last)
    lmpatch.edit(model, REQS[:3], "mend", **FAST["mend"])  # found under its own key
    with pytest.raises(lmpatch.LmpatchError, match="lmpatch train mend"):
        lmpatch.edit(model, REQS[0], "mend", **{**FAST["mend"], "batched": False})


def test_mend_edits_exactly_the_layers_asked_for_and_names_a_bad_one(model, tmp_path, monkeypatch):
    from lmpatch.methods.learned_editing import training_settings
    from lmpatch.methods.mend import MendHparams

    assert "layers" not in training_settings(MendHparams())  # the shipped editor's key is unchanged
    monkeypatch.setitem(FAST, "mend", {**FAST["mend"], "layers": (0,)})
    _train(model, tmp_path, monkeypatch)
    patch = lmpatch.edit(model, REQS[0], "mend", **FAST["mend"])
    spec = model.spec
    assert {d.param for d in patch.parts} == {f"{p}.weight" for p in (*spec.layers[0].mlp_in, spec.layers[0].mlp_out)}
    with pytest.raises(lmpatch.LmpatchError, match=f"Layer {spec.n_layers} does not exist"):
        lmpatch.edit(model, REQS[0], "mend", **{**FAST["mend"], "layers": (spec.n_layers,)})


def test_the_symmetric_locality_term_charges_a_new_answer_the_forward_kl_lets_through():
    """A token the unedited model ruled out (log-odds -5) rising to a tenth of the mass
    costs the forward KL little and the symmetric one several times more; with nothing
    moved both are zero, and a name that is neither is refused."""
    from lmpatch.methods.learned_editing import locality_divergence

    pre = torch.log_softmax(torch.tensor([[3.0, 1.0, -5.0]]), -1)
    post = torch.log_softmax(torch.tensor([[2.8, 1.0, 1.0]]), -1)
    forward, symmetric = locality_divergence(pre, post), locality_divergence(pre, post, "symmetric")
    assert float(forward) < 0.2 and float(symmetric) > 4 * float(forward)
    reverse = (post.exp() * (post - pre)).sum(-1).mean()
    assert torch.allclose(symmetric, forward + reverse)
    assert float(locality_divergence(pre, pre, "symmetric")) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(lmpatch.LmpatchError, match="locality_kl must be one of forward, symmetric"):
        locality_divergence(pre, post, "reverse")


def test_mend_trains_with_the_symmetric_locality_term_under_its_own_key(model, tmp_path, monkeypatch):
    from lmpatch.methods.learned_editing import training_settings
    from lmpatch.methods.mend import MendHparams

    assert "locality_kl" not in training_settings(MendHparams())  # the shipped editors' keys are unchanged
    monkeypatch.setitem(FAST, "mend", {**FAST["mend"], "locality_kl": "symmetric"})
    report = _train(model, tmp_path, monkeypatch)
    assert report["validation"]
    lmpatch.edit(model, REQS[0], "mend", **FAST["mend"])  # found under its own key
    with pytest.raises(lmpatch.LmpatchError, match="lmpatch train mend"):
        lmpatch.edit(model, REQS[0], "mend", **{**FAST["mend"], "locality_kl": "forward"})
    with pytest.raises(lmpatch.LmpatchError, match="locality_kl must be one of"):
        lmpatch.edit(model, REQS[0], "mend", **{**FAST["mend"], "locality_kl": "reverse"})


@pytest.mark.parametrize("overrides", [{}, {"batched": True}], ids=["default", "batched"])
def test_the_documented_mend_editors_ship_for_the_embedded_model(overrides):
    """The default settings, and the batched ones the docs say need no training, find a
    shipped editor trained for the embedded model with exactly those settings: changing a
    default without shipping its editor fails here, not on a user's fresh install."""
    import json

    from lmpatch.methods.editor_training import artefact_key, shipped_dir
    from lmpatch.methods.learned_editing import training_settings
    from lmpatch.methods.mend import MendHparams

    manifests = [json.loads(p.read_text()) for p in (shipped_dir() / "mend").glob("*/manifest.json")]
    fingerprints = {m["fingerprint"] for m in manifests}
    assert len(fingerprints) == 1  # one embedded model
    settings = training_settings(MendHparams(**overrides))
    key = artefact_key("mend", fingerprints.pop(), settings)
    shipped = shipped_dir() / "mend" / key
    assert (shipped / "editor.safetensors").stat().st_size < 5_000_000
    assert json.loads((shipped / "manifest.json").read_text())["settings"] == json.loads(json.dumps(settings))


def test_the_untrained_error_names_the_command_for_exactly_these_settings():
    """Only what differs from the default is set (bools and tuples as --set parses them),
    and the embedded model needs no --model."""
    from lmpatch.cli.options import parse_sets
    from lmpatch.methods.learned_editing import train_command
    from lmpatch.methods.mend import MendHparams

    assert train_command("mend", "smollm2-135m-instruct", MendHparams()) == "lmpatch train mend"
    hp = MendHparams(batched=True, layers=(20, 21), locality_kl="symmetric")
    cmd = train_command("mend", "my dir/model", hp)
    assert cmd == ("lmpatch train mend --model 'my dir/model' --set batched=true --set layers=20,21 "
                   "--set locality_kl=symmetric")
    assert with_overrides(MendHparams, parse_sets(cmd.split(" --set ")[1:], MendHparams)) == hp
