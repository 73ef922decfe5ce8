"""The steppers of the value optimisation (lmpatch.methods.locate.delta_steps) on functions
whose minimum is known: they must find it, stay in the clamp ball, and treat requests
batched together exactly as they would treat each alone."""
from __future__ import annotations

import pytest
import torch

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.delta_steps import AdamSteps, LbfgsSteps, make_stepper, project
from lmpatch.methods.locate.values import ValueConfig


def _loss(x: torch.Tensor, centres: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-request ill-conditioned quadratic plus a log-cosh term (not quadratic), minimum at ``centres``."""
    d = (x - centres) * scales
    return (d ** 2).sum(dim=(-1, -2)) + torch.log(torch.cosh(x - centres)).sum(dim=(-1, -2))


def _run(stepper, centres, scales, passes: int) -> tuple[list[torch.Tensor], list[float]]:
    """Drive a stepper as optimize_values does; the best point and loss of each request."""
    best = [None] * centres.shape[0]
    best_loss = [float("inf")] * centres.shape[0]
    for _ in range(passes):
        trial = stepper.trial()
        loss = _loss(trial, centres, scales)
        for i in range(centres.shape[0]):
            if float(loss[i].detach()) < best_loss[i]:
                best[i], best_loss[i] = trial[i].detach().clone(), float(loss[i].detach())
        stepper.zero_grad()
        loss.sum().backward()
        stepper.observe(trial, loss.detach())
    return best, best_loss


def _problem(n: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, 1, d, generator=g) * 3
    scales = torch.logspace(-0.5, 0.5, d)[None, None, :].expand(n, 1, d).clone()
    return centres, scales


def test_lbfgs_reaches_the_minimum_in_fewer_passes_than_adam():
    centres, scales = _problem()
    big = torch.full((2, 1), 1e6)
    first = centres.norm(dim=-1).norm(dim=-1)
    _, lb = _run(LbfgsSteps((2, 1, 16), first, big, "cpu"), centres, scales, 25)
    _, ad = _run(AdamSteps((2, 1, 16), 0.5, big, "cpu"), centres, scales, 25)
    assert max(lb) < 1e-3, lb                 # the minimum is 0
    assert min(ad) > 10 * max(lb), (ad, lb)   # Adam at a fixed rate is still on its way


def test_trials_stay_in_the_clamp_ball():
    centres, scales = _problem()
    limit = torch.full((2, 1), 1.0)           # the minimum lies outside: norm ~12
    for stepper in (LbfgsSteps((2, 1, 16), torch.full((2,), 5.0), limit, "cpu"),
                    AdamSteps((2, 1, 16), 2.0, limit, "cpu")):
        for _ in range(8):
            trial = stepper.trial()
            assert float(trial.detach().norm(dim=-1).max()) <= 1.0 + 1e-5
            loss = _loss(trial, centres, scales)
            stepper.zero_grad()
            loss.sum().backward()
            stepper.observe(trial, loss.detach())


@pytest.mark.parametrize("kind", ["lbfgs", "adam"])
def test_batched_requests_follow_their_own_paths(kind):
    centres, scales = _problem(n=3, seed=1)
    big = torch.full((3, 1), 1e6)

    def make(n):
        if kind == "lbfgs":
            return LbfgsSteps((n, 1, 16), torch.full((n,), 2.0), big[:n], "cpu")
        return AdamSteps((n, 1, 16), 0.5, big[:n], "cpu")

    together, _ = _run(make(3), centres, scales, 12)
    for i in range(3):
        alone, _ = _run(make(1), centres[i : i + 1], scales[i : i + 1], 12)
        torch.testing.assert_close(together[i], alone[0])


@pytest.mark.parametrize("kind", ["lbfgs", "adam"])
def test_keep_drops_requests_without_disturbing_the_others(kind):
    centres, scales = _problem(n=3, seed=2)
    big = torch.full((3, 1), 1e6)

    def make(n):
        if kind == "lbfgs":
            return LbfgsSteps((n, 1, 16), torch.full((n,), 2.0), big[:n], "cpu")
        return AdamSteps((n, 1, 16), 0.5, big[:n], "cpu")

    stepper = make(3)
    _run(stepper, centres, scales, 4)
    stepper.keep(torch.tensor([True, False, True]))
    kept, _ = _run(stepper, centres[[0, 2]], scales[[0, 2]], 6)
    reference = make(3)
    full, _ = _run(reference, centres, scales, 10)
    # the best points after 10 passes: equal whether or not request 1 left after 4
    torch.testing.assert_close(kept[1], full[2])


def test_project_scales_only_what_is_outside():
    points = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])
    out = project(points, torch.tensor([[1.0], [1.0]]))
    torch.testing.assert_close(out[0, 0].norm(), torch.tensor(1.0))
    torch.testing.assert_close(out[1], points[1])


def test_unknown_optimizer_and_bad_first_step_are_one_clear_error():
    with pytest.raises(LmpatchError, match="optimizer"):
        ValueConfig(optimizer="sgd")
    with pytest.raises(LmpatchError, match="first_step"):
        ValueConfig(first_step=0)
    assert isinstance(make_stepper(ValueConfig(optimizer="lbfgs"), (1, 1, 4), torch.ones(1, 1), "cpu"), LbfgsSteps)
