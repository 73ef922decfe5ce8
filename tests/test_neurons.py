"""Added FFN neurons (ffn.neurons): the host-form computation, exact merging, T-Patcher's
firing pattern and CaliNET's training facts. Save/load/revert: test_conformance.py."""
from __future__ import annotations

import pytest
import torch

import lmpatch
from facts import REQS
from lmpatch.methods.calinet import facts
from lmpatch.methods.neurons import FFNNeurons, mlp_form
from lmpatch.methods.tpatcher import TPatcherHparams, memory_inputs
from lmpatch.model.hooks import capture_input
from lmpatch.patch import ModuleAddition, Patch
from tiny import tiny_model

PROMPTS = [REQS[0].prompt, "Mount Fuji is in", "My favourite colour is"]


def _logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.forward(input_ids=torch.tensor([model.tokenizer(p)["input_ids"]])).logits[0] for p in PROMPTS]


def _random_neurons(model, layer: int, k: int, seed: int = 1) -> Patch:
    form = mlp_form(model.model, model.spec, layer)
    g = torch.Generator().manual_seed(seed)
    d = model.spec.hidden_size

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    module = FFNNeurons(form, r(k, d), r(k, d), key_bias=r(k) if form.key_bias else None,
                        ups=None if form.kind == "plain" else r(k, d), up_bias=r(k) if form.up_bias else None)
    return Patch(parts=[ModuleAddition.of(form.place, module)], method="test-neurons",
                 model_fingerprint=model.fingerprint, model_name=model.name)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "phi3"])
def test_neurons_add_what_a_wider_mlp_computes(arch):
    """The hook's contribution equals the host MLP with the neurons appended as hidden units."""
    model = tiny_model(arch)
    patch = _random_neurons(model, 2, k=3)
    place = patch.modules[0].place
    host = model.model.get_submodule(place)
    x = torch.randn(2, 5, model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hooked = patch.modules[0].build()
        expected = host(x) + hooked.contribution(x)
        hooked.merge_into(host)  # widen this (fresh) model's MLP in place
        widened = host(x)
    assert host is model.model.get_submodule(place)
    assert torch.allclose(widened, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "gemma", "phi3"])
def test_merged_neurons_load_as_a_plain_checkpoint_with_the_same_logits(arch, tmp_path):
    """Two patches on different layers: every layer is widened to one width (zero units where
    nothing was added) and the config says so. Not bitwise: the wider GEMMs block differently."""
    model = tiny_model(arch)
    width = model.spec.mlp_size
    first, second = _random_neurons(model, 3, k=3, seed=1), _random_neurons(model, 1, k=2, seed=2)
    first.apply(model)
    second.apply(model)
    patched = _logits(model)
    out = second.merge(model, tmp_path / "merged")
    assert model.spec.mlp_size == width  # the live model and its config are untouched
    assert width + 3 not in model.model.config.to_dict().values()
    merged = lmpatch.load_model(out)
    assert merged.spec.mlp_size == width + 3  # the widest layer (3 added); layer 1's 2 + 1 zero unit
    widths = {merged.model.get_submodule(layer.mlp_out).weight.numel() for layer in merged.spec.layers}
    assert len(widths) == 1
    for a, b in zip(_logits(merged), patched):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


def test_tpatcher_merges_exactly_on_llama(tmp_path):
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQS[0], "t-patcher", steps=5, memory_prompts=4)
    with patch.applied(model):
        patched = _logits(model)
    merged = lmpatch.load_model(patch.merge(model, tmp_path / "m"))
    assert not patch.is_applied(model)
    for a, b in zip(_logits(merged), patched):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_tpatcher_neurons_fire_on_the_edit_prompt_and_not_on_memory_prompts():
    model = tiny_model("llama")
    # 32 records: with the evaluated prompts left out, 16 gave too small a memory here;
    # no related negatives: on a random model, prompts of the edit's relation are
    # near-copies of the edit prompt, which 300 steps cannot always separate
    hp = TPatcherHparams(memory_prompts=32, steps=300, related=0)
    patch = lmpatch.edit(model, REQS[0], "t-patcher", hp)
    info = patch.metrics["edit"]["requests"][0]
    neurons = patch.modules[0].build()
    host = model.model.get_submodule(patch.modules[0].place)
    store: list = []
    with torch.no_grad(), capture_input(host, store):
        model.forward(input_ids=torch.tensor([model.tokenizer(REQS[0].prompt)["input_ids"]]))
        edit_score = float(neurons.scores(store[0][0, -1])[0])
        memory = memory_inputs(model, host, patch.modules[0].place, [REQS[0]], hp)
        memory_scores = neurons.scores(memory)[:, 0]
    assert info["fixed"]
    assert edit_score > 2.0
    # (a 4-layer random model barely mixes context: a memory token equal to the prompt's
    # last token can look almost the same, so the test asks for nearly all, not all)
    assert float((memory_scores < edit_score - 3.0).float().mean()) > 0.95
    assert float((memory_scores < 0).float().mean()) > 0.9
    # unseen prompts, not in the memory: the neuron adds far less there than on the edit prompt
    store.clear()
    with torch.no_grad(), capture_input(host, store):
        for p in ["Water boils at a temperature of", "The capital of Japan is"]:
            model.forward(input_ids=torch.tensor([model.tokenizer(p)["input_ids"]]))
        others = torch.cat([x[0] for x in store])
        firing = float(neurons.act(torch.tensor(edit_score)))
    assert float(neurons.act(neurons.scores(others)).max()) < 0.5 * firing


def test_tpatcher_in_sequence_keeps_off_earlier_edits():
    """An earlier edit's prompt is memory for the next one: the second patch's neuron is
    silent there, so the first edit still holds with both applied."""
    model = tiny_model("llama")
    first = lmpatch.edit(model, REQS[0], "t-patcher", steps=200, memory_prompts=8, related=0)
    with first.applied(model):
        second = lmpatch.edit(model, REQS[1], "t-patcher", steps=200, memory_prompts=8, related=0)
        assert second.metrics["edit"]["memory_inputs"] == first.metrics["edit"]["memory_inputs"] + 1
        second.apply(model)
        ids = torch.tensor([model.tokenizer(REQS[0].prompt)["input_ids"]])
        target = model.tokenizer(" " + REQS[0].target_new)["input_ids"][0]
        with torch.no_grad():
            assert int(model.forward(input_ids=ids).logits[0, -1].argmax()) == target
        second.revert(model)


def test_calinet_trains_on_rephrasings_only_when_asked_and_refuses_opt():
    request = lmpatch.EditRequest(prompt="Mount Fuji is in", subject="Mount Fuji", target_new="Peru",
                                  rephrase=("Mount Fuji can be found in", "The country of Mount Fuji is"))
    assert [f.prompt for f in facts([request], True)] == [request.prompt, *request.rephrase]
    assert len(facts([request], False)) == 1
    patch = lmpatch.edit(tiny_model("qwen2"), request, "calinet", steps=3, slots=4)
    assert patch.metrics["edit"]["facts"] == 1 and len(patch.modules) == 2  # rephrases are test probes
    patch = lmpatch.edit(tiny_model("qwen2"), request, "calinet", steps=3, slots=4, use_rephrase=True)
    assert patch.metrics["edit"]["facts"] == 3
    with pytest.raises(lmpatch.LmpatchError, match="OPT-style"):
        lmpatch.edit(tiny_model("opt"), request, "calinet", steps=1)
