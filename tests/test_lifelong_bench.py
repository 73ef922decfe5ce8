"""benchmarks/lifelong.py on a tiny model: run directories per method, checkpoints scored,
resuming adds nothing, the time budget stops a method, and docs/lifelong.md is rendered
(table rows per method and T) without losing the hand-written text around it."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

from lmpatch.data import load_dataset
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
FAST = {"grace": dict(steps=5), "ft-m": dict(steps=3)}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lifelong_bench", ROOT / "benchmarks" / "lifelong.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def setup(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    cfg = bench.BenchConfig(n=2, checkpoints=(1, 2), piqa_n=2, ppl_tokens=100, budget_hours=0,
                            metrics=("reliability", "generalization", "locality", "counterfact", "perplexity", "piqa"))
    return cfg, tiny_model("llama"), load_dataset("counterfact-edit", n=2)


def test_two_methods_run_render_and_resume(bench, setup, tmp_path, caplog):
    cfg, model, requests = setup
    out = tmp_path / "runs"
    caplog.set_level(logging.INFO, logger="lifelong")
    for method in FAST:
        meta = bench.run_method(model, method, requests, cfg, out / method, overrides=FAST[method], progress=False)
        assert meta["status"] == "done" and [s["edits"] for s in meta["stages"]] == [1, 2]
        assert all(s["peak_rss_mb"] > 0 and s["new_edits"] == 1 for s in meta["stages"])
        run_dir = out / method
        for name in ("lifelong.json", "curve.jsonl", "updates.jsonl", "summary.json", "records.jsonl", "tasks.json"):
            assert (run_dir / name).is_file(), name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["regime"] == "sequential" and summary["n"] == 2
        assert [c["edits"] for c in summary["curve"]] == [1, 2]
        assert {"reliability", "efficacy_score", "perplexity_after", "piqa_after"} <= set(summary["curve"][-1]["metrics"])
        assert len(list((run_dir / "updates").glob("*.lmpatch"))) == 2
    assert not model.applied  # every run leaves the model as it found it
    # the unedited model's task scores were measured once and shared with the second method
    assert (out / "ft-m" / "tasks.json").read_text() == (out / "grace" / "tasks.json").read_text()
    assert any("Unedited task scores taken from" in r.getMessage() and "grace" in r.getMessage() for r in caplog.records)

    again = bench.run_method(model, "grace", requests, cfg, out / "grace", overrides=FAST["grace"], progress=False)
    assert len(again["stages"]) == 2  # nothing recomputed
    assert len(bench.edit_seconds(out / "grace")) == 2

    doc = tmp_path / "docs" / "lifelong.md"
    doc.parent.mkdir()
    doc.write_text("# Lifelong\n\nHand-written setup.\n\n" + bench.BEGIN + "\nold\n" + bench.END + "\n\nNotes after.\n")
    runs = bench.render(out, doc)
    assert [r.method for r in runs] == ["grace", "ft-m"]  # the benchmark's method order
    text = doc.read_text()
    assert text.startswith("# Lifelong\n\nHand-written setup.") and text.rstrip().endswith("Notes after.")
    assert "\nold\n" not in text and text.count(bench.BEGIN) == 1
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    starts = [tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in rows]
    for method in FAST:
        assert (method, "1", "1") in starts and (method, "2", "2") in starts
    assert ("unedited", "0", "2") in starts
    assert "CPU: " in text and "reached T=2" in text
    header = rows[0]
    assert "| reliability |" in header and "_wild" not in header  # metrics no run measured get no column
    assert (doc.parent / "lifelong" / "retention.png").stat().st_size > 1000
    assert "![retention curves](lifelong/retention.png)" in text
    # re-rendering is idempotent
    bench.render(out, doc)
    assert doc.read_text() == text


def test_budget_stops_a_method_at_the_last_checkpoint_that_fits(bench, setup, tmp_path):
    cfg, model, requests = setup
    tight = bench.BenchConfig(**{**cfg.__dict__, "budget_hours": 1e-9})
    meta = bench.run_method(model, "grace", requests, tight, tmp_path / "grace", overrides=FAST["grace"], progress=False)
    assert meta["status"] == "stopped" and [s["edits"] for s in meta["stages"]] == [1]
    assert meta["stopped"].startswith("stopped at T=1 because estimated") and "T=2" in meta["stopped"]
    doc = tmp_path / "lifelong.md"
    bench.render(tmp_path, doc)
    assert "stopped at T=1 because estimated" in doc.read_text()


def test_stages_clip_to_n_and_scored_sample(bench):
    cfg = bench.BenchConfig(n=500, score_n=100)
    assert cfg.stages() == [1, 10, 100, 500]
    assert cfg.stages(available=50) == [1, 10, 50]
    assert [cfg.scored(t) for t in (1, 10, 100, 500)] == [1, 10, 100, 100]
    assert bench.parse_args(["--n", "10"]).checkpoints == [1, 10]
