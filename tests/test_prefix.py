"""Prompts sharing a long beginning: reading it once gives what reading it every time gives."""
from __future__ import annotations

import pytest
import torch

from lmpatch.eval import prefix as prefix_module
from lmpatch.eval.prefix import group_by_prefix
from lmpatch.eval.scoring import generate, generate_ids, score_targets
from tiny import tiny_model

LONG = " ".join(f"Fact number {i} is that the sky has colour {i % 7}." for i in range(30))
PAIRS = [(f"{LONG}\nThe Eiffel Tower is in", " Rome"), (f"{LONG}\nWater boils at", " 100 degrees"),
         (f"{LONG}\nThe capital of Japan is", " Tokyo")]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _without_prefix(monkeypatch):
    monkeypatch.setattr(prefix_module, "MIN_SHARED", 10**9)


def test_a_long_shared_prefix_is_read_once_and_scores_match(lm, monkeypatch):
    calls = []
    real = prefix_module.read_prefix
    monkeypatch.setattr(prefix_module, "read_prefix", lambda m, ids: calls.append(len(ids)) or real(m, ids))
    fast = score_targets(lm, PAIRS, batch_size=2)
    assert calls and calls[0] >= prefix_module.MIN_SHARED
    _without_prefix(monkeypatch)
    full = score_targets(lm, PAIRS, batch_size=2)
    for a, b in zip(fast, full):
        assert a.target == b.target and a.argmax == b.argmax
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_generation_after_a_shared_prefix_matches(lm, monkeypatch):
    prompts = [p for p, _ in PAIRS]
    fast_ids = generate_ids(lm, prompts, max_new_tokens=[3, 6, 5])
    fast_stop = generate(lm, prompts, max_new_tokens=8, stop_texts=("e",))
    _without_prefix(monkeypatch)
    assert generate_ids(lm, prompts, max_new_tokens=[3, 6, 5]) == fast_ids
    assert all(len(r) <= n for r, n in zip(fast_ids, [3, 6, 5])) and any(fast_stop)
    assert generate(lm, prompts, max_new_tokens=8, stop_texts=("e",)) == fast_stop


def test_short_prefixes_and_added_modules_take_the_ordinary_path(lm, monkeypatch):
    monkeypatch.setattr(prefix_module, "read_prefix", lambda *a: pytest.fail("no prefix should be read"))
    score_targets(lm, [("The Eiffel Tower is in", " Rome"), ("The Eiffel Tower stands in", " Rome")])
    monkeypatch.setattr(prefix_module, "shareable", lambda m: False)
    score_targets(lm, PAIRS)
    generate_ids(lm, [p for p, _ in PAIRS], max_new_tokens=2)


OTHER = " ".join(f"Item {i} of the list is a {('red', 'green', 'blue')[i % 3]} box." for i in range(30))


def test_prompts_are_grouped_by_the_long_beginning_they_share():
    a, b = list(range(200)), list(range(1000, 1200))
    seqs = [a + [1, 2], b + [5], a + [3], [7, 8, 9], b + [6, 6], a[:50] + [4] * 160]
    groups = group_by_prefix(seqs, keep=1, min_shared=128)
    assert sorted((sorted(rows), shared) for rows, shared in groups) == [([0, 2], 200), ([1, 4], 200)]
    # each row keeps `keep` tokens of its own, so the shared part shrinks to leave them
    assert group_by_prefix([a + [1], a + [2, 3]], keep=[2, 1], min_shared=128) == [([0, 1], 199)]
    # a newcomer that would cut a group's shared part by more than it saves stays out
    c = a[:130] + list(range(5000, 5100))
    assert [sorted(r) for r, _ in group_by_prefix([a + [1], a + [2], a + [3], c + [1]], min_shared=128)] == [[0, 1, 2]]
    assert group_by_prefix([a], min_shared=128) == [] and group_by_prefix([], min_shared=128) == []


def test_several_prefix_groups_in_one_call_match_the_full_computation(lm, monkeypatch):
    calls = []
    real = prefix_module.read_prefix
    monkeypatch.setattr(prefix_module, "read_prefix", lambda m, ids: calls.append(len(ids)) or real(m, ids))
    pairs = [*PAIRS[:2], (f"{OTHER}\nThe Eiffel Tower is in", " Paris"), ("The capital of Japan is", " Tokyo"),
             (f"{OTHER}\nWater boils at", " 90 degrees"), PAIRS[2]]
    fast = score_targets(lm, pairs, batch_size=2)
    fast_gen = generate(lm, [p for p, _ in pairs], max_new_tokens=[3, 6, 5, 4, 2, 7], stop_texts=("e",))
    assert len(calls) == 4  # two groups, each read once by scoring and once by generation
    _without_prefix(monkeypatch)
    full = score_targets(lm, pairs, batch_size=2)
    for a, b in zip(fast, full):
        assert a.target == b.target and a.argmax == b.argmax
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    assert generate(lm, [p for p, _ in pairs], max_new_tokens=[3, 6, 5, 4, 2, 7], stop_texts=("e",)) == fast_gen
