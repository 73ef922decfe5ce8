"""KN: the attributions are integrated gradients (they add up to the change in the target's
probability, the IG completeness property), edit and erase change only the chosen
neurons' output columns, and the patch reverts exactly on every architecture."""
from __future__ import annotations

import pytest
import torch

import lmpatch
from lmpatch.methods.kn import attributions
from lmpatch.model.hooks import edit_input
from lmpatch.tokens import encode, target_ids
from tiny import ARCHS, tiny_model

REQ = lmpatch.EditRequest(prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                          target_new="Rome", target_true="Paris")


def _prob_with_scaled_activation(model, ids, target, layer, alpha):
    def scale(x):
        x3 = x.reshape(1, -1, x.shape[-1]).clone()
        x3[:, -1] = x3[:, -1] * alpha
        return x3.reshape(x.shape)

    with torch.no_grad(), edit_input(model.spec.mlp_out(model.model, layer), scale):
        logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return float(torch.softmax(logits.float(), -1)[target])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_attributions_add_up_to_the_probability_change(arch):
    model = tiny_model(arch)
    ids = encode(model.tokenizer, REQ.prompt)
    target = target_ids(model.tokenizer, REQ.prompt, REQ.target_new, ids)[0]
    layers = [0, 2]
    attr = attributions(model, ids, target, layers, steps=64)
    for row, layer in enumerate(layers):
        change = _prob_with_scaled_activation(model, ids, target, layer, 1.0) - \
            _prob_with_scaled_activation(model, ids, target, layer, 0.0)
        assert abs(float(attr[row].sum()) - change) <= 0.05 * abs(change) + 1e-9, (layer, float(attr[row].sum()), change)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["edit", "erase"])
def test_kn_changes_only_chosen_columns_and_reverts(arch, mode):
    model = tiny_model(arch)
    before = {n: t.detach().clone() for n, t in model.model.named_parameters()}
    patch = lmpatch.edit(model, REQ, "kn", steps=4, mode=mode, max_neurons=5)
    chosen = patch.metrics["edit"]["requests"][0]
    assert 0 < chosen["neurons"] <= 5
    assert sum(d.rank for d in patch.deltas) == chosen["neurons"]
    with patch.applied(model):
        for d in patch.deltas:
            p = dict(model.model.named_parameters())[d.param]
            changed = (p != before[d.param])
            # whole columns (rows for Conv1D's transposed storage) of the chosen neurons only
            per_neuron = changed.any(dim=0) if p.shape[1] == model.spec.mlp_size else changed.any(dim=1)
            assert int(per_neuron.sum()) <= d.rank
            if mode == "erase":
                zeroed = (p == 0).all(dim=0) if p.shape[1] == model.spec.mlp_size else (p == 0).all(dim=1)
                assert int(zeroed.sum()) == d.rank
    for n, t in model.model.named_parameters():
        assert torch.equal(t, before[n]), n


def test_bad_kn_settings_are_clear_errors():
    model = tiny_model("llama")
    for bad in (dict(mode="delete"), dict(threshold=0.0), dict(steps=0)):
        with pytest.raises(lmpatch.LmpatchError):
            lmpatch.edit(model, REQ, "kn", **bad)
