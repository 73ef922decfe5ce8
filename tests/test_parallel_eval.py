"""Sharded evaluation (lmpatch.eval.parallel): local worker processes and Ray actors.

A sharded run must leave the records a serial run leaves. Reductions in torch's CPU
kernels are split by thread count, so the serial reference runs with one torch thread,
as each of two workers on this 2-core machine does; the records are then compared
exactly (timings aside). Workers cost a model load each and Ray a few seconds to start,
so the serial reference is made once per module and one Ray session serves the module.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lmpatch
from lmpatch.cli import app
from lmpatch.errors import LmpatchError
from lmpatch.eval.parallel import (
    Backend,
    BackendConfig,
    LocalBackend,
    Worker,
    WorkerSpec,
    check_reachable,
    gpu_share,
    threads_per_worker,
)
from lmpatch.eval.records import read_records
from lmpatch.eval.runner import ModelIdentity, UpdateJob, run_independent, run_updates
from tiny import save_tiny

N = 4
FAST_ROME = ["--set", "mom2_adjustment=false", "--set", "v_steps=2"]
TIMING = ("edit_seconds", "edit_parts")


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, list(args))


def parse_json(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def eval_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model_dir), "--method", "rome", "--data", "counterfact", "--n", str(N),
            *FAST_ROME, "--out", str(out), "--json", *extra]


def results(run_dir: Path) -> dict:
    """Each record without its timings, by case id."""
    return {r["case_id"]: {k: v for k, v in r.items() if k not in TIMING}
            for r in read_records(run_dir / "records.jsonl")}


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One lmpatch cache for the module (context templates are sampled once and read by every
    worker, as in a real run); the workers inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMPATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def serial(tiny_dir, module_cache, tmp_path_factory) -> tuple[dict, dict]:
    """The serial run every sharded run is compared with: (summary, records by case id)."""
    out = tmp_path_factory.mktemp("serial") / "run"
    with torch_threads(1):
        summary = parse_json(run(*eval_args(tiny_dir, out)))
    assert summary["backend"] == "serial" and summary["workers"] == 1 and summary["n"] == N
    return summary, results(out)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module (starting one costs seconds); backends reuse it."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class Interrupting(Backend):
    """Wraps a backend: records the jobs it is given and raises Ctrl-C after ``stop_after`` results."""

    def __init__(self, inner: Backend, stop_after: int | None = None) -> None:
        self.inner, self.stop_after, self.jobs = inner, stop_after, []
        self.name, self.workers = inner.name, inner.workers

    def run(self, jobs):
        self.jobs.extend(jobs)
        with contextlib.closing(self.inner.run(jobs)) as results:
            for k, result in enumerate(results, 1):
                yield result
                if k == self.stop_after:
                    raise KeyboardInterrupt

    @property
    def metric_groups(self):
        return self.inner.metric_groups


def assert_same_as_serial(summary: dict, run_dir: Path, serial: tuple[dict, dict]) -> None:
    reference, records = serial
    assert results(run_dir) == records  # every record, bit for bit (timings aside)
    assert [r["case_id"] for r in read_records(run_dir / "records.jsonl")] == list(records)  # request order
    for key in ("metrics", "metrics_pre", "counts", "protocols", "n", "scored", "model", "fingerprint", "regime"):
        assert summary[key] == reference[key], key


# --------------------------------------------------------------------------- sharded runs


def test_local_workers_give_the_serial_records(tiny_dir, module_cache, serial, tmp_path):
    out = tmp_path / "local"
    summary = parse_json(run(*eval_args(tiny_dir, out, "--backend", "local", "--workers", "2")))
    assert summary["backend"] == "local" and summary["workers"] == 2
    assert_same_as_serial(summary, out, serial)
    assert json.loads((out / "summary.json").read_text())["n"] == N


def test_ray_actors_give_the_serial_records(tiny_dir, module_cache, serial, ray_session, tmp_path):
    out = tmp_path / "ray"
    summary = parse_json(run(*eval_args(tiny_dir, out, "--backend", "ray", "--workers", "2")))
    assert summary["backend"] == "ray" and summary["workers"] == 2
    assert_same_as_serial(summary, out, serial)
    assert ray_session.is_initialized()  # a session the caller started is left running


def test_an_interrupted_sharded_run_resumes_on_another_backend(tiny_dir, module_cache, serial, tmp_path):
    """Ctrl-C after two results keeps exactly those; a serial rerun edits only the rest."""
    from lmpatch.cli.evaluate import select_metrics
    from lmpatch.data import load_dataset
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    hparams = with_overrides(get_method("rome").hparams, {"mom2_adjustment": False, "v_steps": 2})
    metrics = select_metrics(None, None)[0]
    requests = load_dataset("counterfact", n=N)
    model = lmpatch.load_model(str(tiny_dir))
    identity = ModelIdentity.of(model)
    spec = WorkerSpec(model=str(tiny_dir), method="rome", hparams=hparams, requests=tuple(requests),
                      fingerprint=identity.fingerprint, metrics=metrics, env=WorkerSpec.forwarded_env())
    out = tmp_path / "run"

    interrupted = Interrupting(LocalBackend(spec, workers=2), stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_updates(interrupted, requests, out, identity=identity, progress=False, method="rome")
    kept = read_records(out / "records.jsonl")
    assert len(kept) == 2  # both finished results written, nothing else

    edited = []

    def edit_fn(m, request):
        edited.append(request.case_id)
        return lmpatch.edit(m, request, "rome", hparams)

    with torch_threads(1):
        summary = run_independent(model, requests, edit_fn, out, progress=False, metrics=metrics, method="rome")
    assert sorted(edited) == sorted(r.case_id for r in requests if r.case_id not in {k["case_id"] for k in kept})
    assert read_records(out / "records.jsonl")[:2] == kept  # resumed, not redone
    assert results(out) == serial[1] and summary["metrics"] == serial[0]["metrics"]
    assert summary["backend"] == "serial"

    edited.clear()  # and once more: nothing left to do
    run_independent(model, requests, edit_fn, out, progress=False, metrics=metrics, method="rome")
    assert edited == [] and len(read_records(out / "records.jsonl")) == N


# --------------------------------------------------------------------------- refusals


def test_sequential_runs_are_refused_on_worker_backends(tiny_dir, tmp_path):
    result = run(*eval_args(tiny_dir, tmp_path / "seq", "--mode", "sequential", "--backend", "local"))
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "--mode sequential cannot run on --backend local" in message and "--backend serial" in message
    assert not (tmp_path / "seq").exists()  # refused before loading anything


def test_a_missing_ray_is_one_line_naming_the_extra(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = run(*eval_args(tiny_dir, tmp_path / "r", "--backend", "ray"))
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "pip install 'lmpatch[ray]'" in " ".join(result.stderr.split())


@pytest.mark.parametrize("config, regime, device, expected", [
    (BackendConfig("threads"), "single", "cpu", "Unknown --backend"),
    (BackendConfig("serial", workers=2), "single", "cpu", "--workers needs --backend local or --backend ray"),
    (BackendConfig("local", address="auto"), "single", "cpu", "--address names a Ray cluster"),
    (BackendConfig("serial", gpus_per_worker=1), "single", "cpu", "--gpus-per-worker needs"),
    (BackendConfig("ray", workers=2), "sequential", "cpu", "cannot be split between workers"),
    (BackendConfig("local"), "multihop", "cpu", "--data mquake runs in one process"),
    (BackendConfig("ray"), "single", "cuda", "needs --gpus-per-worker"),
])
def test_backend_mistakes_are_one_error_each(config, regime, device, expected):
    with pytest.raises(LmpatchError, match=re.escape(expected)):
        config.check(regime, device)


def test_an_address_nothing_answers_at_is_refused_at_once():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LmpatchError, match="Nothing answers at --address"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(LmpatchError, match="Nothing answers at --address"):
        check_reachable(f"ray://127.0.0.1:{port}")
    check_reachable("auto")  # left to Ray


def test_accepted_configurations():
    BackendConfig().check("sequential")  # serial runs everything
    BackendConfig("local", workers=3).check("batch")
    assert BackendConfig("local").worker_count == 2 and BackendConfig("serial").worker_count == 1


def test_a_worker_refuses_weights_other_than_the_runs(tiny_dir, module_cache):
    spec = WorkerSpec(model=str(tiny_dir), method="rome", hparams=None, requests=(), fingerprint="0" * 16)
    with torch_threads(torch.get_num_threads()):  # the worker sets this process's thread count
        worker = Worker(spec)  # a load failure is kept, and raised by the first job
    with pytest.raises(LmpatchError, match="must load the same weights"):
        worker.run(UpdateJob(update=0, indices=(0,)))


def test_threads_and_gpus_are_shared_out():
    assert threads_per_worker(2, cores=2) == 1 and threads_per_worker(3, cores=2) == 1
    assert threads_per_worker(2, cores=8) == 4 and threads_per_worker(1, cores=8) == 8
    assert gpu_share(["0", "1", "2", "3"], 1, 2) == "2,3"
    with pytest.raises(LmpatchError, match="only 3 are visible"):
        gpu_share(["0", "1", "2"], 1, 2)
