"""Key statistics: exact against brute force, one pass for many layers, stop early, cache by key."""
from __future__ import annotations

import copy
import gzip
import logging
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import lmpatch
from lmpatch.errors import LmpatchError
from lmpatch.stats import (
    StatsConfig,
    cached_stats,
    inverse_second_moment,
    open_corpus,
    second_moment,
    second_moments,
    stats_path,
)
from lmpatch.stats.corpus import split_documents
from lmpatch.stats.covariance import token_chunks

TEXT = """The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.
It is named after the engineer Gustave Eiffel, whose company designed and built it.

Tokyo is the capital of Japan and one of the most populous cities in the world,
home to a very large number of people and companies.


Mount Everest is the highest mountain above sea level, located in the Himalayas.
Its elevation was most recently established in 2020 by Chinese and Nepali authorities.
"""


# ----------------------------------------------------------------------------- fixtures
def byte_tokenizer(bos: bool = False):
    """A real HF fast tokenizer, one token per byte, built in memory (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = 256
    vocab["<bos>"] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kw = {"eos_token": "<eos>", "pad_token": "<eos>"}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
        kw["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def tiny(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=260, max_position_embeddings=128)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, vocab_size=260,
                         bos_token_id=256, eos_token_id=256)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return lmpatch.wrap_model(model, byte_tokenizer(), name=f"tiny-{arch}")


@pytest.fixture(autouse=True)
def stats_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache, so nothing leaks between tests or into the user's cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LMPATCH_CACHE", str(root))
    return root


@pytest.fixture(params=["llama", "gpt2"])
def lm(request):
    return tiny(request.param)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def cfg_for(path, **kw) -> StatsConfig:
    return StatsConfig(**{"corpus": str(path), "n_tokens": 150, "seq_len": 32, "batch_size": 3, **kw})


def brute_force(lm, layer: int, config: StatsConfig) -> tuple[torch.Tensor, int]:
    """Σkkᵀ/N the slow obvious way: every chunk alone through the whole model, all keys kept."""
    tok = lm.tokenizer
    ids: list[int] = []
    for doc in open_corpus(config.corpus).documents():
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = ids[: config.n_tokens]
    keys: list[torch.Tensor] = []
    module = lm.spec.mlp_out(lm.model, layer)
    handle = module.register_forward_pre_hook(lambda _m, args: keys.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for i in range(0, len(ids), config.seq_len):
                lm.model(input_ids=torch.tensor([ids[i : i + config.seq_len]]))
    finally:
        handle.remove()
    k = torch.cat(keys)
    return k.T @ k / k.shape[0], k.shape[0]


def count_calls(module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def forbid_forward(lm):
    """Make any forward pass fail; returns the hook handle (``.remove()`` to allow them again)."""
    def boom(*_):
        raise AssertionError("the model ran although the statistics were cached")

    return lm.model.get_input_embeddings().register_forward_pre_hook(boom)


# ----------------------------------------------------------------------------- corpus
def test_shipped_wikitext_splits_into_clean_articles():
    corpus = open_corpus("wikitext-2-raw")
    docs = list(corpus.documents())
    assert len(docs) == 62  # the test split has 62 top-level "= Title =" articles
    assert docs[0].startswith("Robert Boulter\nRobert Boulter is an English film, television")
    assert docs[1].startswith("Du Fu\n")
    assert all(d.strip() for d in docs)
    assert not any("@-@" in d or " , " in d or "\n\n" in d for d in docs)
    lines = [line for d in docs for line in d.split("\n")]
    assert not any(line.startswith("=") and line.endswith("=") for line in lines)  # headings are plain titles


def test_text_file_splits_on_blank_lines_and_gz_crlf_gives_same_documents(tmp_path, text_file):
    docs = list(open_corpus(text_file).documents())
    assert len(docs) == 3
    assert docs[0].startswith("The Eiffel Tower") and docs[0].endswith("designed and built it.")
    assert docs[2].startswith("Mount Everest")
    gz = tmp_path / "other" / "notes.txt.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(TEXT.replace("\n", "\r\n").encode()))
    assert list(open_corpus(gz).documents()) == docs


def test_split_documents_starts_new_document_at_top_level_heading():
    lines = [" = A = ", " first ", " = = Sub = = ", " more ", " = B = ", " second ", "   ", ""]
    assert list(split_documents(lines)) == [" = A = \n first \n = = Sub = = \n more ", " = B = \n second "]


def test_corpus_key_follows_content(tmp_path):
    a, b = tmp_path / "a" / "x.txt", tmp_path / "b" / "x.txt"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text("one text\n")
    b.write_text("another text\n")
    assert open_corpus(a).key != open_corpus(b).key
    b.write_text("one text\n")
    assert open_corpus(a).key == open_corpus(b).key


@pytest.mark.parametrize("bad", ["/nonexistent/corpus.txt", "no-such-corpus", "hf:", "hf:a:b:c:d"])
def test_bad_corpus_names_raise_lmpatch_error(bad):
    with pytest.raises(LmpatchError):
        open_corpus(bad)


def test_directory_is_not_a_corpus(tmp_path):
    with pytest.raises(LmpatchError, match="Unknown corpus"):
        open_corpus(tmp_path)


def test_hf_corpus_without_datasets_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    corpus = open_corpus("hf:wikitext:wikitext-2-raw-v1:test")
    assert corpus.key == "hf-wikitext-wikitext-2-raw-v1-test"
    with pytest.raises(LmpatchError, match="pip install datasets"):
        next(corpus.documents())


def test_token_chunks_count_separators_and_bos():
    tok = byte_tokenizer(bos=True)
    docs = ["abcdefgh", "ijk"]
    chunks = list(token_chunks(tok, docs, seq_len=5, n_tokens=100))
    flat_text = [i for c in chunks for i in c[1:]]
    assert all(c[0] == 257 for c in chunks)  # every chunk starts with BOS
    assert flat_text == tok("abcdefgh", add_special_tokens=False)["input_ids"] + [256] + tok(
        "ijk", add_special_tokens=False)["input_ids"] + [256]
    assert [len(c) for c in chunks] == [5, 5, 5, 2]
    capped = list(token_chunks(tok, docs, seq_len=5, n_tokens=7))
    assert [len(c) for c in capped] == [5, 2]


# ----------------------------------------------------------------------------- exactness
def test_matches_brute_force_on_text_file(lm, text_file):
    config = cfg_for(text_file)  # 150 tokens = 4 chunks of 32 + one of 22 (padded in its batch)
    for layer in (0, 2):
        moment = second_moment(lm, layer, config, progress=False)
        expected, n = brute_force(lm, layer, config)
        assert moment.count == n == 150
        assert moment.matrix.dtype == torch.float32 and moment.matrix.device.type == "cpu"
        assert moment.matrix.shape == (lm.spec.mlp_size, lm.spec.mlp_size)
        torch.testing.assert_close(moment.matrix.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_one_pass_for_several_layers_equals_per_layer_passes(lm, text_file):
    config = cfg_for(text_file)
    assert lm.spec  # built first: reading the structure runs one probe pass (post-norm detection)
    embed_calls = count_calls(lm.model.get_input_embeddings())
    together = second_moments(lm, [2, 0, 1], config, progress=False, cache=False)
    assert list(together) == [0, 1, 2]
    assert len(embed_calls) == 2  # 5 chunks in batches of 3: one pass of 2 batches for all layers
    for layer in (0, 1, 2):
        alone = second_moment(lm, layer, config, progress=False, cache=False)
        torch.testing.assert_close(together[layer].matrix, alone.matrix, rtol=1e-6, atol=1e-7)
        assert together[layer].count == alone.count


def test_forward_stops_at_deepest_requested_layer(lm, text_file):
    above = count_calls(lm.spec.block(lm.model, 2))
    head = count_calls(lm.spec.module(lm.model, lm.spec.lm_head))
    deepest = count_calls(lm.spec.mlp_out(lm.model, 1))
    second_moments(lm, [0, 1], cfg_for(text_file), progress=False)
    assert deepest and not above and not head


def test_padding_tokens_are_excluded(lm, text_file):
    # 150 tokens = chunks of 32, 32, 32, 32, 22. With batch_size 1 nothing is padded; with 3 the
    # second batch is [32, 22] and the short chunk gets 10 pad tokens.
    unpadded = second_moment(lm, 1, cfg_for(text_file, batch_size=1), progress=False, cache=False)
    padded = second_moment(lm, 1, cfg_for(text_file, batch_size=3), progress=False, cache=False)
    assert unpadded.count == padded.count == 150
    torch.testing.assert_close(padded.matrix, unpadded.matrix, rtol=1e-5, atol=1e-7)


def test_bfloat16_model_gives_float32_statistics(text_file):
    fp32 = tiny("llama")
    bf16 = lmpatch.wrap_model(copy.deepcopy(fp32.model).to(torch.bfloat16), fp32.tokenizer)
    a = second_moment(fp32, 1, cfg_for(text_file), progress=False)
    b = second_moment(bf16, 1, cfg_for(text_file), progress=False)
    assert b.matrix.dtype == torch.float32 and torch.isfinite(b.matrix).all()
    assert "bfloat16" in b.path.name and "float32" in a.path.name
    assert torch.allclose(a.matrix, b.matrix, rtol=0.1, atol=0.05 * float(a.matrix.abs().max()))


# ----------------------------------------------------------------------------- cache
def test_cache_hit_is_identical_and_does_not_run_the_model(lm, text_file, stats_cache):
    config = cfg_for(text_file)
    first = second_moments(lm, [0, 2], config, progress=False)
    assert all(m.path.is_file() and stats_cache in m.path.parents for m in first.values())
    forbid_forward(lm)
    again = second_moments(lm, [0, 2], config, progress=False)
    for layer in (0, 2):
        assert torch.equal(again[layer].matrix, first[layer].matrix)
        assert again[layer].count == first[layer].count == 150
        assert again[layer].model_fingerprint == lm.fingerprint


def test_factorised_covariance_is_kept_on_the_model_until_its_file_changes(lm, text_file):
    from lmpatch.methods.locate.solve import layer_covariances

    config = cfg_for(text_file)
    first = layer_covariances(lm, [0, 2], config)
    first[2].cholesky()
    again = layer_covariances(lm, [2, 0], config)
    assert again[2] is first[2] and again[0] is first[0] and list(again) == [2, 0]
    assert again[2]._chol is not None  # the factor is not recomputed
    other = lmpatch.wrap_model(copy.deepcopy(lm.model), lm.tokenizer, name="other")
    assert layer_covariances(other, [2], config)[2] is not first[2]  # memo lives on the model
    stats_path(lm, 2, config).unlink()  # a deleted (or recomputed) statistics file is noticed
    fresh = layer_covariances(lm, [2], config)[2]
    assert fresh is not first[2] and torch.equal(fresh.matrix, first[2].matrix)


def test_partly_cached_layers_only_compute_the_missing_ones(lm, text_file):
    config = cfg_for(text_file)
    second_moment(lm, 2, config, progress=False)
    above = count_calls(lm.spec.block(lm.model, 1))  # layer 2 is cached, so the pass stops at layer 0
    out = second_moments(lm, [0, 2], config, progress=False)
    assert not above and set(out) == {0, 2}


def test_cache_key_changes_with_everything_that_changes_the_result(lm, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Different words entirely.\n")
    base = cfg_for(text_file)
    path = stats_path(lm, 0, base)
    variants = [
        stats_path(lm, 0, cfg_for(text_file, n_tokens=151)),
        stats_path(lm, 0, cfg_for(other)),
        stats_path(lm, 1, base),
        stats_path(lm, 0, cfg_for(text_file, seq_len=16)),
        stats_path(lmpatch.wrap_model(lm.model, byte_tokenizer(bos=True)), 0, base),
    ]
    assert len({path, *variants}) == len(variants) + 1
    assert stats_path(lm, 0, cfg_for(text_file, batch_size=7)) == path  # batching does not change C0
    assert lm.fingerprint in path.parts
    assert base.key() in path.name


def test_corrupt_cache_file_is_recomputed(lm, text_file):
    config = cfg_for(text_file)
    good = second_moment(lm, 0, config, progress=False)
    good.path.write_bytes(b"not a safetensors file")
    again = second_moment(lm, 0, config, progress=False)
    assert torch.equal(again.matrix, good.matrix)


def test_cache_false_writes_nothing(lm, text_file, stats_cache):
    second_moment(lm, 0, cfg_for(text_file), progress=False, cache=False)
    assert not stats_cache.exists() or not any(stats_cache.rglob("*.safetensors"))


def _stand_in_patch(lm) -> lmpatch.Patch:
    """A do-nothing weight delta: what matters to the cache is that a patch sits in the stack."""
    name = lm.spec.layers[-1].mlp_out + ".weight"
    shape = dict(lm.model.named_parameters())[name].shape
    return lmpatch.Patch(
        parts=[lmpatch.WeightDelta(name, dense=torch.zeros(shape))],
        method="rome", model_fingerprint=lm.fingerprint, model_name=lm.name,
    )


def test_model_with_patches_applied_uses_but_never_writes_the_cache(lm, text_file, stats_cache, caplog):
    config = cfg_for(text_file)
    stand_in = _stand_in_patch(lm)
    stand_in.apply(lm)
    with caplog.at_level(logging.WARNING, logger="lmpatch.stats.covariance"):
        patched = second_moment(lm, 0, config, progress=False)
    assert patched.path is None and "patches applied" in caplog.text
    assert not stats_cache.exists() or not any(stats_cache.rglob("*.safetensors"))
    stand_in.revert(lm)
    base = second_moment(lm, 0, config, progress=False)  # computed and cached for the base model
    stand_in.apply(lm)
    forbid_forward(lm)
    assert torch.equal(second_moment(lm, 0, config, progress=False).matrix, base.matrix)


def test_cached_stats_lists_files_with_metadata(lm, text_file):
    config = cfg_for(text_file)
    second_moments(lm, [0, 1], config, progress=False)
    inverse_second_moment(lm, 1, config, ridge=0.01, progress=False)
    entries = cached_stats()
    assert sorted((e["kind"], e["layer"]) for e in entries) == [
        ("inverse", 1), ("second_moment", 0), ("second_moment", 1)
    ]
    moment = next(e for e in entries if e["kind"] == "second_moment")
    assert moment["count"] == 150 and moment["n_tokens"] == 150 and moment["seq_len"] == 32
    assert moment["fingerprint"] == lm.fingerprint and moment["model"] == lm.name
    assert moment["corpus"] == str(text_file) and moment["dtype"] == "float32"
    assert moment["bytes"] > lm.spec.mlp_size**2 * 4
    assert next(e for e in entries if e["kind"] == "inverse")["ridge"] == 0.01
    assert len(cached_stats(lm.fingerprint)) == 3 and cached_stats("0" * 16) == []


# ----------------------------------------------------------------------------- inverse, rank
def test_inverse_is_exact_and_cached(lm, text_file):
    config = cfg_for(text_file, n_tokens=400)
    moment = second_moment(lm, 1, config, progress=False)
    ridge = 1e-3
    inv = inverse_second_moment(lm, 1, config, ridge=ridge, progress=False)
    expected = torch.linalg.inv(moment.matrix.double() + ridge * torch.eye(moment.d_ff, dtype=torch.float64))
    assert inv.dtype == torch.float32 and torch.equal(inv, inv.T)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    forbid_forward(lm)
    assert torch.equal(inverse_second_moment(lm, 1, config, ridge=ridge, progress=False), inv)
    assert (moment.path.parent / f"{moment.path.stem}-inv-r0.001.safetensors").is_file()


def test_too_few_tokens_warns_and_inverse_needs_ridge(lm, text_file, caplog):
    config = cfg_for(text_file, n_tokens=20)  # fewer tokens than the d_ff key dimensions
    with caplog.at_level(logging.WARNING, logger="lmpatch.stats.covariance"):
        moment = second_moment(lm, 0, config, progress=False)
    assert moment.count == 20
    assert "singular" in caplog.text and "n_tokens" in caplog.text
    with pytest.raises(LmpatchError, match="ridge"):
        inverse_second_moment(lm, 0, config, ridge=0.0, progress=False)
    inv = inverse_second_moment(lm, 0, config, ridge=0.1, progress=False)
    assert torch.isfinite(inv).all()


# ----------------------------------------------------------------------------- bad input
def test_bad_corpus_path_gives_lmpatch_error(lm, tmp_path):
    with pytest.raises(LmpatchError, match="Unknown corpus"):
        second_moment(lm, 0, StatsConfig(corpus=str(tmp_path / "missing.txt")), progress=False)


def test_empty_corpus_gives_lmpatch_error(lm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(LmpatchError, match="no text"):
        second_moment(lm, 0, cfg_for(empty), progress=False)


@pytest.mark.parametrize("kw", [{"n_tokens": 0}, {"seq_len": -1}, {"batch_size": 1.5}])
def test_config_rejects_non_positive_sizes(kw):
    with pytest.raises(LmpatchError):
        StatsConfig(**kw)


def test_bad_layer_and_too_long_chunks(lm, text_file):
    with pytest.raises(LmpatchError, match="Layer 7"):
        second_moment(lm, 7, cfg_for(text_file), progress=False)
    with pytest.raises(LmpatchError, match="context"):
        second_moment(lm, 0, cfg_for(text_file, seq_len=4096), progress=False)
    with pytest.raises(LmpatchError, match="No layers"):
        second_moments(lm, [], cfg_for(text_file), progress=False)


# ----------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def smollm():
    return lmpatch.load_model()


@pytest.mark.model
def test_real_model_second_moment_is_symmetric_psd(smollm):
    config = StatsConfig(n_tokens=4000)
    moment = second_moment(smollm, 5, config, progress=False)
    c = moment.matrix
    assert c.shape == (1536, 1536) and moment.count == 4000
    assert torch.equal(c, c.T)
    eig = torch.linalg.eigvalsh(c.double())
    assert float(eig.min()) > -1e-6 * float(eig.max())
    assert float(eig.max()) > 0
    handle = forbid_forward(smollm)
    try:
        again = second_moment(smollm, 5, config, progress=False)
    finally:
        handle.remove()
    assert torch.equal(again.matrix, c)
