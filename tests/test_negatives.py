"""The negative prompts WISE and T-Patcher train against, and WISE's earlier-edit key factor."""
from __future__ import annotations

import torch

from lmpatch.data import load_dataset
from lmpatch.methods.negatives import NEGATIVE_DATA, NEGATIVE_RECORDS, related_prompts, swapped_prompts, training_pool


def test_negatives_never_come_from_the_tuning_records():
    """Records from NEGATIVE_RECORDS on are left for tuning: none of their prompts, nor their
    neighbourhood probes, may be a negative, even for an edit whose relation they share."""
    tuning = load_dataset(NEGATIVE_DATA, n=50, offset=NEGATIVE_RECORDS)
    pool = {p for _, p in training_pool()}
    assert len(pool) > 1000
    for request in tuning:
        held_out = {request.prompt} | {p.prompt for p in request.locality}
        assert not held_out & {p for p, _ in related_prompts(request, 10_000, 0)}
        assert request.prompt not in pool


def test_related_prompts_share_the_true_answer_and_skip_the_subject():
    request = load_dataset(NEGATIVE_DATA, n=1, offset=NEGATIVE_RECORDS + 7)[0]
    rows = related_prompts(request, 16, seed=0)
    assert rows, "a CounterFact relation has other subjects with the same true object"
    assert all(a.strip() == request.target_true.strip() for _, a in rows)
    assert all(request.subject not in p for p, _ in rows)
    assert rows == related_prompts(request, 16, seed=0)  # seeded: the same edit gets the same negatives
    assert related_prompts(request, 0, seed=0) == []


def test_swapped_prompts_ask_the_same_question_of_someone_else():
    request = load_dataset(NEGATIVE_DATA, n=1, offset=NEGATIVE_RECORDS + 3)[0]
    prompts = swapped_prompts(request, 4, seed=0)
    assert len(set(prompts)) == 4
    template = request.prompt.replace(request.subject, "{}")
    prefix, suffix = template.split("{}", 1)
    assert all(p.startswith(prefix) and p.endswith(suffix) and request.subject not in p for p in prompts)


def test_key_factor_reproduces_the_second_moment(monkeypatch):
    """‖R ΔWᵀ‖² must equal Σ‖ΔW a‖² over the earlier edits' tokens, below the input width
    (R: the rows themselves) and above it (R: a Cholesky factor grown edit by edit in the
    stack's caches), padded positions excluded."""
    from types import SimpleNamespace

    import lmpatch.methods.wise as wise

    gen = torch.Generator().manual_seed(0)
    width = 8
    delta = torch.randn(5, width, generator=gen)
    tokens = {f"edit {i}": torch.randn(3 + i % 2, width, generator=gen) for i in range(6)}

    def fake_edit_io(_model, _host, requests, cached=True):
        longest = max(len(tokens[r.prompt]) for r in requests)
        x = torch.full((len(requests), longest, width), 100.0)  # padding must not count
        mask = torch.zeros(len(requests), longest)
        for i, r in enumerate(requests):
            x[i, :len(tokens[r.prompt])] = tokens[r.prompt]
            mask[i, :len(tokens[r.prompt])] = 1
        return x, None, mask

    monkeypatch.setattr(wise, "_edit_io", fake_edit_io)
    model = SimpleNamespace(stack=SimpleNamespace(solves={}, entries=[]))
    requests = [SimpleNamespace(prompt=p, target_new="x") for p in tokens]
    for k in range(1, len(requests) + 1):  # 3 rows (<= width) up to 21 rows (> width)
        rows, n = wise._key_factor(model, object(), requests[:k])
        want_rows = torch.cat([tokens[r.prompt] for r in requests[:k]])
        assert n == len(want_rows)
        want = (want_rows @ delta.T).pow(2).sum()
        assert torch.allclose((rows @ delta.T).pow(2).sum(), want, rtol=1e-4), k
