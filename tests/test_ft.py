"""FT-L / FT-M: wiring on tiny models, exact losses, constraints, restoring the model, and a real edit."""
from __future__ import annotations

import math

import pytest
import torch

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.eval.scoring import score_targets
from lmpatch.methods.ft import FTHparams, FTLHparams, FTMHparams, apply_ft, ft_params
from lmpatch.model.loading import wrap_model
from lmpatch.request import EditRequest
from lmpatch.tokens import prompt_target
from tiny import tiny_model

EIFFEL = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
    target_new="Rome", target_true="Paris",
)
DARRIEUX = EditRequest(
    prompt="Danielle Darrieux's mother tongue is", subject="Danielle Darrieux",
    target_new="Brazilian Portuguese", target_true="French",
)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.model.named_parameters()}


def _assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.model.named_parameters())
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), f"{name} changed"


# Initialised 10x wider than the transformers default so that the tied head can express a
# confident prediction at all (at 0.02 the logits of a 64-wide model barely move).
INIT = 0.2


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=2, initializer_range=INIT)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", n_layers=2, initializer_range=INIT)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("hp_cls", [FTLHparams, FTMHparams])
def test_patch_holds_dense_deltas_on_chosen_params_and_model_is_unchanged(arch, hp_cls, request):
    model = request.getfixturevalue(arch)
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    hp = hp_cls(layers=(1,), steps=3, lr=1e-3)

    patch = apply_ft(model, [EIFFEL, DARRIEUX], hp)

    _assert_unchanged(model, before)
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == flags
    assert all(p.grad is None for p in model.model.parameters())
    param = model.spec.layers[1].mlp_out + ".weight"
    assert [d.param for d in patch.deltas] == [param]
    delta = patch.deltas[0]
    assert not delta.is_low_rank
    assert delta.shape == tuple(model.model.get_parameter(param).shape)  # parameter layout (Conv1D too)
    assert delta.dense.dtype == torch.float32 and delta.dense.abs().max() > 0
    assert patch.method == ("ft-l" if hp_cls is FTLHparams else "ft-m")
    assert patch.model_fingerprint == model.fingerprint
    assert patch.hparams["objective"] == hp.objective and patch.hparams["layers"] == [1]
    assert patch.metrics["steps"] == 3 and len(patch.metrics["losses"]) == 3
    assert patch.metrics["final_loss"] == patch.metrics["losses"][-1]
    assert [r.prompt for r in patch.requests] == [EIFFEL.prompt, DARRIEUX.prompt]

    with patch.applied(model):
        changed = [n for n, p in model.model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert changed == [param]
        expected = before[param] + delta.dense
        assert torch.equal(model.model.get_parameter(param).detach(), expected)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("arch", "kinds"),
    [
        ("llama", {"mlp_in": ["mlp.gate_proj", "mlp.up_proj"], "attn_out": ["self_attn.o_proj"]}),
        ("gpt2", {"mlp_in": ["mlp.c_fc"], "attn_out": ["attn.c_proj"]}),
    ],
)
def test_modules_and_layers_select_the_trained_matrices(arch, kinds, request):
    model = request.getfixturevalue(arch)
    hp = FTMHparams(layers=(1, 0, -1), modules=("mlp_in", "attn_out"))  # -1 is layer 1 again
    names = ft_params(model, hp)
    expected = [
        f"{model.spec.layers[layer].block}.{suffix}.weight"
        for layer in (0, 1) for kind in ("mlp_in", "attn_out") for suffix in kinds[kind]
    ]
    assert names == expected
    patch = apply_ft(model, [EIFFEL], FTMHparams(layers=(0,), modules=("mlp_in", "attn_out"), steps=1))
    assert sorted(d.param for d in patch.deltas) == sorted(n for n in names if ".0." in n)
    assert all(d.dense.abs().max() > 0 for d in patch.deltas)


def test_default_layer_derives_from_depth(llama):
    spec = llama.spec
    assert ft_params(llama, FTMHparams()) == [spec.layers[spec.depth_layer(0.66)].mlp_out + ".weight"]
    assert ft_params(llama, FTMHparams(layer_fraction=0.0)) == [spec.layers[0].mlp_out + ".weight"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_norm_constraint_bounds_every_entry(arch, request):
    model = request.getfixturevalue(arch)
    eps = 1e-4
    # A learning rate 100x the radius: unconstrained Adam would move every entry ~1e-2.
    patch = apply_ft(model, [EIFFEL, DARRIEUX], FTLHparams(layers=(0,), steps=4, lr=1e-2, norm_constraint=eps))
    biggest = float(patch.deltas[0].dense.abs().max())
    assert biggest <= eps + 1e-7
    assert biggest > 0.9 * eps  # the constraint was active, not trivially satisfied
    free = apply_ft(model, [EIFFEL, DARRIEUX], FTLHparams(layers=(0,), steps=4, lr=1e-2, norm_constraint=None))
    assert float(free.deltas[0].dense.abs().max()) > 10 * eps


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ft_m_loss_decreases_and_the_edit_moves_the_target(arch, request):
    model = request.getfixturevalue(arch)
    pre = score_targets(model, [(EIFFEL.prompt, EIFFEL.target_new)])[0]
    patch = apply_ft(model, [EIFFEL], FTMHparams(layers=(0, 1), steps=8, lr=1e-2))
    losses = patch.metrics["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.2 * losses[0]
    with patch.applied(model):
        post = score_targets(model, [(EIFFEL.prompt, EIFFEL.target_new)])[0]
    assert pre.token_accuracy == 0.0 and post.token_accuracy == 1.0
    assert post.mean_logprob > pre.mean_logprob + 5.0


@pytest.mark.parametrize("chat", [False, True])
def test_target_new_loss_is_length_normalised_teacher_forced_nll(llama, chat):
    """The first pass's loss equals what the scorer measures: mean over requests of per-token NLL.

    With ``chat`` both read the chat-wrapped prompt, so training and scoring see the same text.
    """
    if chat:
        llama = wrap_model(llama.model, llama.tokenizer, name="tiny-llama-chat", chat=True)
    requests = [EIFFEL, DARRIEUX]
    scores = score_targets(llama, [(r.prompt, r.target_new) for r in requests])
    assert max(s.n_tokens for s in scores) > 1  # a multi-token target is covered
    expected = sum(-s.mean_logprob for s in scores) / len(scores)
    patch = apply_ft(llama, requests, FTMHparams(steps=1))
    assert patch.metrics["losses"][0] == pytest.approx(expected, rel=1e-4)


def test_prompt_last_loss_reads_every_target_token_at_the_last_prompt_position(llama):
    requests = [EIFFEL, DARRIEUX]
    per_request = []
    with torch.no_grad():
        for r in requests:
            pt = prompt_target(llama.tokenizer, r.prompt, r.target_new)
            logits = llama.model(input_ids=torch.tensor([pt.prompt_ids])).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            per_request.append(-float(logp[list(pt.target_ids)].mean()))
    patch = apply_ft(llama, requests, FTLHparams(steps=1))
    assert patch.metrics["losses"][0] == pytest.approx(sum(per_request) / 2, rel=1e-4)


def test_targets_are_not_given_a_second_leading_space(llama):
    """A target that already starts with a space is tokenised once, as the scorer does (EasyEdit adds a second)."""
    spaced = EditRequest(prompt=EIFFEL.prompt, subject=EIFFEL.subject, target_new=" Rome")
    plain = apply_ft(llama, [EIFFEL], FTMHparams(steps=1)).metrics["losses"][0]
    assert apply_ft(llama, [spaced], FTMHparams(steps=1)).metrics["losses"][0] == pytest.approx(plain, rel=1e-6)


def test_early_stop_and_mini_batches(llama):
    patch = apply_ft(llama, [EIFFEL, DARRIEUX], FTMHparams(steps=10, stop_loss=1e6))
    assert patch.metrics["steps"] == 1
    small = apply_ft(llama, [EIFFEL, DARRIEUX, EIFFEL], FTMHparams(steps=2, batch_size=1))
    assert small.metrics["steps"] == 2 and small.deltas[0].dense.abs().max() > 0


def test_works_under_inference_mode(llama):
    before = _snapshot(llama)
    with torch.inference_mode():
        patch = apply_ft(llama, [EIFFEL], FTMHparams(steps=2))
    assert patch.deltas[0].dense.abs().max() > 0
    _assert_unchanged(llama, before)


def test_model_is_restored_when_training_fails(llama):
    before = _snapshot(llama)
    flags = {n: p.requires_grad for n, p in llama.model.named_parameters()}
    with pytest.raises(LmpatchError, match="diverged"):
        apply_ft(llama, [EIFFEL], FTMHparams(steps=3, lr=math.inf))
    _assert_unchanged(llama, before)
    assert {n: p.requires_grad for n, p in llama.model.named_parameters()} == flags


def test_bfloat16_model_delta_reproduces_the_trained_weights():
    model = tiny_model("llama", n_layers=2, initializer_range=INIT)
    model.model.to(torch.bfloat16)
    param = model.spec.layers[1].mlp_out + ".weight"
    original = model.model.get_parameter(param).detach().clone()
    patch = apply_ft(model, [EIFFEL], FTMHparams(layers=(1,), steps=2, lr=1e-2))
    assert torch.equal(model.model.get_parameter(param).detach(), original)
    delta = patch.deltas[0].dense
    trained = (original.float() + delta).to(torch.bfloat16)
    assert torch.equal(trained.float() - original.float(), delta)  # exactly representable: an exact revert/apply
    assert delta.abs().max() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "maximise"}, "Unknown FT objective"),
        ({"modules": ("mlp_mid",)}, "Unknown FT module"),
        ({"modules": ()}, "at least one module"),
        ({"layers": ()}, "layers is empty"),
        ({"layers": (7,)}, "Layer 7 does not exist"),
        ({"layers": ("1",)}, "must be an integer"),
        ({"steps": 0}, "steps must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"lr": 0.0}, "learning rate"),
        ({"norm_constraint": 0.0}, "norm_constraint"),
    ],
)
def test_bad_hparams_are_clear_errors(llama, overrides, message):
    before = _snapshot(llama)
    with pytest.raises(InvalidRequestError, match=message):
        apply_ft(llama, [EIFFEL], FTHparams(**overrides))
    _assert_unchanged(llama, before)


def test_no_requests_is_an_error(llama):
    with pytest.raises(InvalidRequestError, match="at least one edit request"):
        apply_ft(llama, [], FTMHparams())


@pytest.mark.model
def test_ft_m_makes_the_new_target_the_argmax_on_smollm2(real_model):
    from lmpatch.data import load_dataset

    request = load_dataset("counterfact-train", n=3)[0]
    pair = [(request.prompt, request.target_new)]
    pre = score_targets(real_model, pair)[0]
    assert pre.token_accuracy < 1.0  # the counterfactual is not already the model's answer
    hp = FTMHparams()
    param = ft_params(real_model, hp)[0]
    original = real_model.model.get_parameter(param).detach().clone()

    patch = apply_ft(real_model, [request], hp)

    assert torch.equal(real_model.model.get_parameter(param).detach(), original)
    with patch.applied(real_model):
        post = score_targets(real_model, pair)[0]
    assert post.token_accuracy == 1.0, (request.prompt, request.target_new, patch.metrics)
    assert torch.equal(real_model.model.get_parameter(param).detach(), original)
    assert score_targets(real_model, pair)[0].logprobs == pre.logprobs
