"""Prompts sharing a long beginning: reading it once gives what reading it every time gives."""
from __future__ import annotations

import pytest
import torch

from lmpatch.eval import prefix as prefix_module
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
