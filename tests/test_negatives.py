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
    """‖R ΔWᵀ‖² must equal Σ‖ΔW a‖² over the earlier edits' tokens, both below and above the
    input width (where R comes from an eigendecomposition instead of the rows themselves)."""
    import lmpatch.methods.wise as wise

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 8, generator=gen)
    for tokens in (6, 30):
        x = torch.randn(3, tokens // 3, 8, generator=gen)
        mask = torch.ones(3, tokens // 3)
        mask[0, -1] = 0  # a padded position does not count
        x[0, -1] = 100.0
        monkeypatch.setattr(wise, "_edit_io", lambda *a, x=x, mask=mask: (x, None, mask))
        rows, n = wise._key_factor(None, None, [])
        assert n == tokens - 1
        want = (x[mask > 0] @ delta.T).pow(2).sum()
        got = (rows @ delta.T).pow(2).sum()
        assert torch.allclose(got, want, rtol=1e-4), (tokens, got, want)
