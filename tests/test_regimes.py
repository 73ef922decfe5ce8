"""Batch and sequential regimes: the right requests reach each update, edits accumulate
only in ``sequential``, retention curves and weight drift are recorded, model-level tasks
are measured before/after, an interrupted run resumes without recomputing, and the
model ends bit-identical to where it started."""
from __future__ import annotations

import json

import pytest
import torch

from lmpatch.eval.records import read_records
from lmpatch.eval.runner import ModelState, run_independent
from lmpatch.eval.sequential import default_checkpoints, run_sequential
from lmpatch.eval.tasks import Task
from lmpatch.patch import Patch, WeightDelta
from test_eval import tiny, tiny_requests  # noqa: F401  (fixture)

PARAM = "model.layers.1.mlp.down_proj.weight"
METRICS = ["reliability", "locality", "counterfact"]


def seeded_patch(model, requests, scale: float = 0.3) -> Patch:
    """A real Patch whose delta depends only on which requests it edits."""
    reqs = requests if isinstance(requests, list) else [requests]
    seed = sum(int(r.case_id[1:]) + 1 for r in reqs)
    w = model.model.get_parameter(PARAM)
    g = torch.Generator().manual_seed(seed)
    delta = scale * torch.randn(w.shape, generator=g)
    return Patch(parts=[WeightDelta(param=PARAM, dense=delta)], method="seeded", model_fingerprint=model.fingerprint,
                 model_name=model.name, requests=reqs)


def test_default_checkpoints_are_spread_and_end_at_n():
    assert default_checkpoints(n_updates=100, batch_size=10, n_requests=1000) == list(range(100, 1001, 100))
    assert default_checkpoints(n_updates=3, batch_size=2, n_requests=5) == [2, 4, 5]


def test_batch_regime_edits_groups_from_the_original_model(tiny, tmp_path):  # noqa: F811
    seen = []

    def edit_fn(model, reqs):
        seen.append([r.case_id for r in reqs])
        assert not model.applied  # every update starts from the original weights
        return seeded_patch(model, reqs)

    before = ModelState.of(tiny.model)
    summary = run_independent(tiny, tiny_requests(5), edit_fn, tmp_path, batch_size=2, progress=False, metrics=METRICS)
    assert seen == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert summary["regime"] == "batch" and summary["n"] == 5 and summary["batch_size"] == 2
    records = read_records(tmp_path / "records.jsonl")
    assert [r["update"] for r in records] == [0, 0, 1, 1, 2]
    assert summary["edit_seconds"]["total"] == pytest.approx(sum({r["update"]: r["edit_seconds"] for r in records}.values()))
    assert not before.differences(ModelState.of(tiny.model))


def test_sequential_accumulates_records_curve_and_restores(tiny, tmp_path):  # noqa: F811
    applied_counts = []

    def edit_fn(model, reqs):
        applied_counts.append(len(model.applied))
        return seeded_patch(model, reqs)

    calls = []
    lm_sum = Task("head_sum", "test_protocol", lambda m: calls.append(1) or float(m.model.get_parameter(PARAM).sum()))
    before = ModelState.of(tiny.model)
    reqs = tiny_requests(5)
    summary = run_sequential(tiny, reqs, edit_fn, tmp_path, batch_size=2, checkpoints=[2], progress=False,
                             metrics=METRICS, tasks={"head_sum": lm_sum}, method="seeded")
    assert applied_counts == [0, 1, 2]  # each update sees all earlier ones applied
    assert not before.differences(ModelState.of(tiny.model)) and not tiny.applied
    assert [c["edits"] for c in summary["curve"]] == [2, 5]
    drift = [c["weights"][PARAM]["delta_norm"] for c in summary["curve"]]
    assert 0 < drift[0] < drift[1]
    # the final checkpoint scores all five edits, and equals the records' post summary
    assert summary["curve"][-1]["metrics"]["reliability"] == pytest.approx(summary["metrics"]["reliability"])
    # task before = unedited weights, after = all three updates applied
    w0 = tiny.model.get_parameter(PARAM).detach()
    total = w0 + sum(seeded_patch(tiny, reqs[i:i + 2]).deltas[0].dense for i in (0, 2, 4))
    assert summary["metrics"]["head_sum_before"] == pytest.approx(float(w0.sum()), rel=1e-5)
    assert summary["metrics"]["head_sum_after"] == pytest.approx(float(total.sum()), rel=1e-4)
    assert summary["protocols"]["head_sum_after"] == "test_protocol"
    assert len(list((tmp_path / "updates").glob("*.lmpatch"))) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["regime"] == "sequential"


def test_sequential_resumes_from_saved_updates(tiny, tmp_path):  # noqa: F811
    reqs = tiny_requests(6)
    reference = run_sequential(tiny, reqs, seeded_patch, tmp_path / "ref", batch_size=2, progress=False,
                               metrics=METRICS)

    calls = []

    def crashing(model, batch):
        calls.append([r.case_id for r in batch])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return seeded_patch(model, batch)

    before = ModelState.of(tiny.model)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(tiny, reqs, crashing, tmp_path / "run", batch_size=2, progress=False, metrics=METRICS)
    assert not before.differences(ModelState.of(tiny.model)) and not tiny.applied  # reverted on the way out

    calls.clear()

    def counting(model, batch):
        calls.append([r.case_id for r in batch])
        return seeded_patch(model, batch)

    resumed = run_sequential(tiny, reqs, counting, tmp_path / "run", batch_size=2, progress=False, metrics=METRICS)
    assert calls == [["c2", "c3"], ["c4", "c5"]]  # update 0 was re-applied from disk, not recomputed
    assert resumed["metrics"] == pytest.approx(reference["metrics"])
    assert [c["edits"] for c in resumed["curve"]] == [c["edits"] for c in reference["curve"]]


def test_sequential_refuses_a_directory_of_another_run(tiny, tmp_path):  # noqa: F811
    from lmpatch.errors import LmpatchError

    run_sequential(tiny, tiny_requests(2), seeded_patch, tmp_path, batch_size=1, progress=False, metrics=["reliability"])
    with pytest.raises(LmpatchError, match="holds a different run .batch_size: 1 there, 2 now"):  # run.json says so
        run_sequential(tiny, tiny_requests(2), seeded_patch, tmp_path, batch_size=2, progress=False,
                       metrics=["reliability"])
    with pytest.raises(LmpatchError, match="other requests or another batch size"):  # the saved updates say so
        run_sequential(tiny, tiny_requests(2)[::-1], seeded_patch, tmp_path, batch_size=1, progress=False,
                       metrics=["reliability"])


def test_summaries_add_up_the_methods_timed_parts(tiny, tmp_path):  # noqa: F811
    """MEMIT-style patches report target-optimisation and solve time; both regimes sum them
    over updates, so a run whose targets came from the cache is visible as such."""
    def timed(model, reqs):
        patch = seeded_patch(model, reqs)
        cached = reqs[0].case_id == "c2" if isinstance(reqs, list) else False
        patch.metrics = {"edit": {"z_seconds": 0.0 if cached else 1.5, "z_cached": 2 if cached else 0,
                                  "spread_seconds": 0.25, "layers": {}}}
        return patch

    batch = run_independent(tiny, tiny_requests(4), timed, tmp_path / "b", batch_size=2, progress=False,
                            metrics=["reliability"])
    assert batch["edit_parts"] == {"z_seconds": 1.5, "spread_seconds": 0.5, "z_cached": 2}
    seq = run_sequential(tiny, tiny_requests(4), timed, tmp_path / "s", batch_size=2, progress=False,
                         metrics=["reliability"])
    assert seq["edit_parts"] == batch["edit_parts"]
    # a plain patch without timed parts leaves the summary's parts empty
    plain = run_independent(tiny, tiny_requests(2), seeded_patch, tmp_path / "p", batch_size=2, progress=False,
                            metrics=["reliability"])
    assert plain["edit_parts"] == {}


def test_score_n_scores_an_even_sample_but_edits_everything(tiny, tmp_path):  # noqa: F811
    from lmpatch.eval.records import scored_indices

    assert scored_indices(10, 4) == [0, 2, 5, 7]
    assert scored_indices(3, 5) == [0, 1, 2] and scored_indices(3, None) == [0, 1, 2]
    edited = []

    def edit_fn(model, reqs):
        edited.extend(r.case_id for r in reqs)
        return seeded_patch(model, reqs)

    reqs = tiny_requests(6)
    full = run_independent(tiny, reqs, seeded_patch, tmp_path / "full", batch_size=2, progress=False, metrics=METRICS)
    part = run_independent(tiny, reqs, edit_fn, tmp_path / "part", batch_size=2, progress=False, metrics=METRICS,
                           score_n=2)
    assert edited == [r.case_id for r in reqs]
    assert part["n"] == 6 and part["scored"] == 2 and full["scored"] == 6
    records = read_records(tmp_path / "part" / "records.jsonl")
    assert [("pre" in r) for r in records] == [True, False, False, True, False, False]
    by_id = {r["case_id"]: r for r in read_records(tmp_path / "full" / "records.jsonl")}
    expected = sum(by_id[c]["post"]["reliability"] for c in ("c0", "c3")) / 2
    assert part["metrics"]["reliability"] == pytest.approx(expected)
    # resuming finds every update done, scored or not
    again = run_independent(tiny, reqs, edit_fn, tmp_path / "part", batch_size=2, progress=False, metrics=METRICS,
                            score_n=2)
    assert len(edited) == 6 and again["metrics"] == pytest.approx(part["metrics"])

    # the fully scored sequential run whose records the sampled one is compared with below
    run_sequential(tiny, reqs, seeded_patch, tmp_path / "sf", batch_size=2, checkpoints=[2], progress=False,
                   metrics=METRICS)
    seq = run_sequential(tiny, reqs, seeded_patch, tmp_path / "sp", batch_size=2, checkpoints=[2], progress=False,
                         metrics=METRICS, score_n=2)
    assert seq["n"] == 6 and seq["scored"] == 2
    sf = {r["case_id"]: r for r in read_records(tmp_path / "sf" / "records.jsonl")}
    assert seq["metrics"]["reliability"] == pytest.approx(sum(sf[c]["post"]["reliability"] for c in ("c0", "c3")) / 2)
    assert [c["edits"] for c in seq["curve"]] == [2, 6]
