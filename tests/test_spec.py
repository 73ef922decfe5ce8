"""ModelSpec discovery: every path it reports is checked against what the model computes."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import transformers
from torch import nn

from lmpatch.errors import LmpatchError
from lmpatch.model.spec import (
    ModelSpec,
    from_param_layout,
    is_conv1d,
    linear_dims,
    to_param_layout,
)
from tiny import ARCHS, EXTRA_ARCHS, HIDDEN, INTERMEDIATE, tiny_model

PROMPT = "The Eiffel Tower is located in the city of"

# (test id, arch, config overrides). The "wide-attn" cases have heads x head_dim = 128,
# wider than the residual and as wide as the MLP, so q_proj/o_proj have exactly the
# shapes of up_proj/down_proj (as in Gemma-7B and Qwen3).
CASES = [(a, a, {}) for a in ARCHS + EXTRA_ARCHS] + [
    ("llama-wide-attn", "llama", {"head_dim": 32}),
    ("gemma-wide-attn", "gemma", {"head_dim": 32}),
]
EXPECTED_MLP = {"bloom": 4 * HIDDEN}  # Bloom's MLP width is fixed at 4 x hidden
RESIDUAL_INSIDE_ATTN = {"bloom"}  # Bloom's attention module adds the residual itself


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    case_id, arch, overrides = request.param
    loaded = tiny_model(arch, **overrides)
    return case_id, arch, loaded


@pytest.fixture(scope="module")
def trace(case):
    """One forward of the full model and one of the base model, hooked at every reported path."""
    case_id, arch, loaded = case
    spec, model = loaded.spec, loaded.model
    paths = [p for layer in spec.layers for p in (layer.block, layer.attn, layer.attn_out, layer.mlp_out, *layer.mlp_in)]
    ids = _ids(loaded)
    with torch.no_grad():
        with _capture(model, paths + [spec.final_norm]) as seen:
            logits = model(input_ids=ids).logits
        hidden = spec.base_model(model)(input_ids=ids).last_hidden_state
    return {"ids": ids, "seen": seen, "logits": logits, "hidden": hidden}


def _ids(loaded) -> torch.Tensor:
    return loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@contextmanager
def _capture(model: nn.Module, paths):
    """Record (first positional input, output) of each module path during a forward."""
    seen: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    handles = []
    for path in set(paths):
        def hook(mod, args, kwargs, out, path=path):
            x = args[0] if args else kwargs.get("hidden_states")
            seen[path] = (x, _first(out))
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_counts_and_widths(case):
    case_id, arch, loaded = case
    spec, cfg = loaded.spec, loaded.model.config
    assert spec.model_type == cfg.model_type
    assert spec.n_layers == cfg.num_hidden_layers == len(spec.layers) == 4
    assert len(spec.module(loaded.model, spec.layers_path)) == spec.n_layers
    assert spec.hidden_size == HIDDEN
    assert spec.mlp_size == EXPECTED_MLP.get(arch, INTERMEDIATE)
    for i, layer in enumerate(spec.layers):
        assert layer.block == f"{spec.layers_path}.{i}"
        assert spec.block(loaded.model, i) is spec.module(loaded.model, layer.block)
        for path in (layer.attn, layer.attn_out, layer.mlp_out, *layer.mlp_in):
            assert path.startswith(layer.block + ".")
        assert layer.attn_out.startswith(layer.attn + ".")
        assert not layer.mlp_out.startswith(layer.attn + ".")
        assert linear_dims(spec.mlp_out(loaded.model, i)) == (spec.mlp_size, HIDDEN)
        assert layer.mlp_in, "every MLP has at least one input projection"


def test_paths_carry_the_shapes_they_claim(case, trace):
    """What flows through each reported module during a forward has the claimed widths."""
    case_id, arch, loaded = case
    spec = loaded.spec
    d_ff, hidden = spec.mlp_size, spec.hidden_size
    ids, seen = trace["ids"], trace["seen"]
    for layer in spec.layers:
        x, y = seen[layer.mlp_out]
        assert x.shape[-1] == d_ff and y.shape[-1] == hidden, layer.mlp_out
        assert y.numel() == ids.numel() * hidden  # one row per token (OPT flattens batch x seq)
        for path in layer.mlp_in:
            x, y = seen[path]
            assert x.shape[-1] == hidden and y.shape[-1] in (d_ff, 2 * d_ff), path
        # The attention module's own output is its output projection's output.
        attn_out = seen[layer.attn_out][1]
        attn = seen[layer.attn][1]
        if arch in RESIDUAL_INSIDE_ATTN:
            attn = attn - seen[layer.block][0]
        torch.testing.assert_close(attn, attn_out, rtol=1e-5, atol=1e-5)


def test_final_norm_embed_and_head(case, trace):
    case_id, arch, loaded = case
    spec, model = loaded.spec, loaded.model
    assert spec.module(model, spec.embed) is model.get_input_embeddings()
    assert spec.module(model, spec.lm_head) is model.get_output_embeddings()
    assert tuple(spec.module(model, spec.embed).weight.shape) == (len(loaded.tokenizer), HIDDEN)
    assert tuple(spec.module(model, spec.lm_head).weight.shape) == (len(loaded.tokenizer), HIDDEN)
    assert spec.final_norm, "every tested architecture has a final norm"
    seen = trace["seen"]
    norm_in, norm_out = seen[spec.final_norm]
    torch.testing.assert_close(norm_in, seen[spec.layers[-1].block][1])  # applied to the last block's output
    torch.testing.assert_close(norm_out, trace["hidden"])  # and is the last thing the base model does


def test_tied_flag_matches_the_weights(case):
    case_id, arch, loaded = case
    model = loaded.model
    shared = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert loaded.spec.tied_embeddings is shared
    assert shared is bool(model.config.get_text_config().tie_word_embeddings)


def test_logits_from_last_hidden_state_equal_the_models(case, trace):
    case_id, arch, loaded = case
    spec, model = loaded.spec, loaded.model
    expected, hidden = trace["logits"], trace["hidden"]
    with torch.no_grad():
        got = spec.logits(model, hidden)
        got_last = spec.logits(model, hidden[:, -1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_last, expected[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch, overrides",
    [("gemma2", {"final_logit_softcapping": 0.5}), ("cohere", {}), ("granite", {})],
    ids=["gemma2-softcap", "cohere-scale", "granite-scale"],
)
def test_logit_post_processing_is_reproduced(arch, overrides):
    """Where the head changes its raw output, spec.logits must do the same."""
    if arch not in ARCHS + EXTRA_ARCHS:
        pytest.fail(f"{arch} should be available in transformers {transformers.__version__}")
    loaded = tiny_model(arch, **overrides)
    spec, model = loaded.spec, loaded.model
    ids = _ids(loaded)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        hidden = spec.base_model(model)(input_ids=ids).last_hidden_state
        raw = spec.module(model, spec.lm_head)(hidden)
    assert (raw - expected).abs().max() > 1e-3  # the post-processing matters here ...
    torch.testing.assert_close(spec.logits(model, hidden), expected, rtol=1e-5, atol=1e-5)  # ... and is applied
    assert (spec.logit_softcap is not None) == (arch == "gemma2")
    assert (spec.logit_scale is not None) == (arch != "gemma2")


def test_untied_gpt2_is_reported_untied():
    loaded = tiny_model("gpt2", tie_word_embeddings=False)
    assert loaded.spec.tied_embeddings is False


def test_gpt2_conv1d_orientation():
    loaded = tiny_model("gpt2")
    spec, model = loaded.spec, loaded.model
    c_proj = spec.mlp_out(model, 0)
    assert is_conv1d(c_proj)
    assert tuple(c_proj.weight.shape) == (spec.mlp_size, HIDDEN)  # stored in x out
    assert linear_dims(c_proj) == (spec.mlp_size, HIDDEN)
    w = from_param_layout(c_proj, c_proj.weight)
    assert tuple(w.shape) == (HIDDEN, spec.mlp_size)  # math: out x in
    assert torch.equal(to_param_layout(c_proj, w), c_proj.weight)

    x = torch.randn(3, spec.mlp_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(c_proj(x), x @ w.T + c_proj.bias)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_math_delta_applied_through_param_layout(arch):
    """A delta written as (out x in) changes the output by delta @ x on any layout."""
    loaded = tiny_model(arch)
    mod = loaded.spec.mlp_out(loaded.model, 1)
    gen = torch.Generator().manual_seed(1)
    d_ff, hidden = loaded.spec.mlp_size, loaded.spec.hidden_size
    delta = torch.randn(hidden, 1, generator=gen) @ torch.randn(1, d_ff, generator=gen)
    x = torch.randn(5, d_ff, generator=gen)
    with torch.no_grad():
        before = mod(x)
        mod.weight += to_param_layout(mod, delta)
        after = mod(x)
    torch.testing.assert_close(after - before, x @ delta.T, rtol=1e-4, atol=1e-4)
    if arch == "llama":
        assert to_param_layout(mod, delta) is delta and from_param_layout(mod, mod.weight) is mod.weight


@pytest.fixture(scope="module")
def llama():
    """A read-only tiny Llama (4 layers) for the addressing tests."""
    return tiny_model("llama")


def test_depth_layer_defaults(llama):
    spec = llama.spec  # 4 layers
    assert [spec.depth_layer(f) for f in (0.0, 0.25, 0.5, 0.99, 1.0)] == [0, 1, 2, 3, 3]
    for bad in (-0.1, 1.5):
        with pytest.raises(LmpatchError, match="between 0 and 1"):
            spec.depth_layer(bad)


def test_check_layer(llama):
    spec = llama.spec
    assert spec.check_layer(0) == 0
    assert spec.check_layer(3) == 3
    assert spec.check_layer(-1) == 3
    assert spec.check_layer(-4) == 0
    for bad in (4, -5, 100):
        with pytest.raises(LmpatchError, match=rf"Layer {bad} does not exist: this model has layers 0\.\.3"):
            spec.check_layer(bad)
    for bad in (1.5, "2", True, None):
        with pytest.raises(LmpatchError, match="Layer must be an integer"):
            spec.check_layer(bad)
    with pytest.raises(LmpatchError, match="does not exist"):
        spec.mlp_out(llama.model, 4)
    with pytest.raises(LmpatchError, match="does not exist"):
        spec.block(llama.model, -5)


def test_discovery_does_not_depend_on_module_names():
    """Rename every sub-module of every block: the spec follows the structure, not the names."""
    loaded = tiny_model("llama")
    model, original = loaded.model, loaded.spec
    roles = ("attn", "attn_out", "mlp_out")
    before = [
        ({r: model.get_submodule(getattr(layer, r)) for r in roles}, [model.get_submodule(p) for p in layer.mlp_in])
        for layer in original.layers
    ]
    for block in model.model.layers:
        block._modules = {f"part{i}": m for i, m in enumerate(block._modules.values())}
        for j, sub in enumerate(block.children()):
            sub._modules = {f"w{j}_{k}": m for k, m in enumerate(sub._modules.values())}
    spec = ModelSpec.from_model(model)
    assert spec.layers != original.layers  # the paths did change ...
    for layer, (mods, mlp_in) in zip(spec.layers, before):
        assert ".part" in layer.mlp_out and ".mlp." not in layer.mlp_out
        for r in roles:  # ... but every role is still played by the same module
            assert model.get_submodule(getattr(layer, r)) is mods[r]
        assert [model.get_submodule(p) for p in layer.mlp_in] == mlp_in


def test_encoder_only_model_is_refused_clearly():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=INTERMEDIATE
    )
    model = transformers.BertForMaskedLM(cfg)
    with pytest.raises(LmpatchError, match="Cannot map the decoder blocks of this BertForMaskedLM"):
        ModelSpec.from_model(model)


def test_mixture_of_experts_is_refused_clearly():
    cfg = transformers.MixtralConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(LmpatchError, match="mixture-of-experts"):
        ModelSpec.from_model(model)


@pytest.mark.model
def test_real_smollm2_spec(real_model):
    spec, model = real_model.spec, real_model.model
    assert (spec.model_type, spec.n_layers, spec.hidden_size, spec.mlp_size) == ("llama", 30, 576, 1536)
    assert spec.layers_path == "model.layers" and spec.final_norm == "model.norm"
    assert spec.layers[7].mlp_out == "model.layers.7.mlp.down_proj"
    assert spec.layers[7].mlp_in == ("model.layers.7.mlp.gate_proj", "model.layers.7.mlp.up_proj")
    assert spec.layers[7].attn == "model.layers.7.self_attn"
    assert spec.layers[7].attn_out == "model.layers.7.self_attn.o_proj"
    assert spec.embed == "model.embed_tokens" and spec.lm_head == "lm_head"
    assert spec.tied_embeddings is True
    assert spec.logit_softcap is None and spec.logit_scale is None
    assert [spec.depth_layer(f) for f in (0.0, 0.25, 1.0)] == [0, 8, 29]
    ids = real_model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), _capture(model, [spec.final_norm]) as seen:
        expected = model(input_ids=ids).logits[:, -1]
    hidden = seen[spec.final_norm][1]
    torch.testing.assert_close(spec.logits(model, hidden[:, -1]), expected, rtol=1e-4, atol=1e-4)
    assert real_model.tokenizer.decode(expected.argmax(-1)).strip() == "Paris"
