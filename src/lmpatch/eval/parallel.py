"""Where the updates of an independent run are computed: here, in local worker processes, or on Ray.

Single and batch runs edit every update from the *unedited* model, so their updates are
independent and can run anywhere, in any order, and give the same records. A backend
takes the list of :class:`~lmpatch.eval.runner.UpdateJob` and yields their results as
they finish; :func:`~lmpatch.eval.runner.run_updates` stays the only writer of the run
directory, which is why a sharded run leaves the files a serial one does and either can
resume the other.

Backends:

* ``serial``: the jobs run one after another on the model already loaded here.
* ``local``: ``workers`` processes started with ``spawn`` (a forked copy of a process that
  already ran torch can deadlock in its thread pools), each loading the model once.
* ``ray``: one Ray actor per worker, each loading the model once; a local Ray instance
  (no dashboard, no usage reporting) or the cluster at ``address``.

Every worker, local or Ray, is a :class:`Worker`: it loads the model described by a
:class:`WorkerSpec`, checks it has the weights the run was planned on, and runs jobs
with :class:`~lmpatch.eval.runner.UpdateRunner`, the same code the serial loop runs.
Jobs are handed out one at a time to whichever worker is free, so a slow edit does not
hold up a whole shard.

Sequential runs are not shardable: each update starts from the model the previous ones
left, so records depend on order. :meth:`BackendConfig.check` refuses them.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from lmpatch.errors import LmpatchError
from lmpatch.eval.metrics import DEFAULT_METRICS, resolve_metrics
from lmpatch.eval.runner import UpdateJob, UpdateResult, UpdateRunner
from lmpatch.eval.tasks import TaskConfig
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

BACKENDS = ("serial", "local", "ray")
DEFAULT_WORKERS = 2
RAY_INSTALL_HINT = "pip install 'lmpatch[ray]'"

# Environment a worker needs to find the same caches and stay offline like its parent.
# A fixed list: a Ray cluster may show actors' environments, so secrets are never sent.
FORWARDED_ENV = ("LMPATCH_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "TRANSFORMERS_VERBOSITY")


# --------------------------------------------------------------------------- choosing a backend


@dataclass(frozen=True)
class BackendConfig:
    """The user's choice of backend (``lmpatch eval --backend/--workers/--address/--gpus-per-worker``)."""

    name: str = "serial"
    workers: int | None = None
    address: str | None = None
    gpus_per_worker: int = 0

    @property
    def worker_count(self) -> int:
        if self.name == "serial":
            return 1
        return self.workers or DEFAULT_WORKERS

    def check(self, regime: str, device: str = "cpu") -> None:
        """Raise one :class:`LmpatchError` for a combination that cannot work, before any model is loaded."""
        if self.name not in BACKENDS:
            raise LmpatchError(f"Unknown --backend {self.name!r}; choose {', '.join(BACKENDS)}.")
        if self.workers is not None and self.workers < 1:
            raise LmpatchError(f"--workers must be at least 1, got {self.workers}.")
        if self.name == "serial":
            if self.workers not in (None, 1):
                raise LmpatchError("--workers needs --backend local or --backend ray (serial runs in this process).")
            if self.gpus_per_worker:
                raise LmpatchError("--gpus-per-worker needs --backend local or --backend ray.")
        if self.address is not None and self.name != "ray":
            raise LmpatchError("--address names a Ray cluster; it needs --backend ray.")
        if self.gpus_per_worker < 0:
            raise LmpatchError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}.")
        if self.name == "serial":
            return
        if regime == "sequential":
            raise LmpatchError(
                f"--mode sequential cannot run on --backend {self.name}: every update starts from the model the "
                "earlier ones left, so the edits depend on their order and cannot be split between workers. "
                "Run it with --backend serial (the default); single and batch runs can be sharded."
            )
        if regime == "multihop":
            raise LmpatchError(f"--data mquake runs in one process; drop --backend {self.name}.")
        if self.name == "ray":
            require_ray()
            if self.address:
                check_reachable(self.address)  # before a model is loaded for nothing
            if device != "cpu" and not self.gpus_per_worker:
                raise LmpatchError(
                    f"--backend ray with --device {device} needs --gpus-per-worker N: Ray hides every GPU from "
                    "an actor that did not ask for one."
                )


def require_ray() -> Any:
    """The ``ray`` module, imported with usage reporting off, or one error saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    try:
        import ray
    except ImportError:
        raise LmpatchError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count, where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """torch threads for each of ``workers`` workers on one machine: its share of the cores, at least one.

    Every process would otherwise start one thread per core, and two workers on two cores
    would each run two threads that fight for the same cores."""
    return max(1, (cores if cores is not None else usable_cores()) // max(1, workers))


def gpu_share(visible: Sequence[str], slot: int, per_worker: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of local worker ``slot``: its own ``per_worker`` of the ``visible`` GPUs."""
    share = list(visible)[slot * per_worker:(slot + 1) * per_worker]
    if len(share) < per_worker:
        raise LmpatchError(f"Worker {slot + 1} needs {per_worker} GPU(s) but only {len(visible)} are visible "
                           f"({', '.join(visible) or 'none'}); lower --workers or --gpus-per-worker.")
    return ",".join(share)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# --------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild the run's model and editor in its own process.

    Plain, picklable data: no model, no closures. ``workers`` (set by the backend) is how
    many workers share the machine, for their thread count. ``fingerprint`` is the fingerprint of the
    model the run was planned on; a worker whose load gives other weights (another
    revision of a hub model, a different file at the same path on another machine)
    refuses to run instead of mixing two models' records in one run.
    """

    model: str | None
    method: str
    hparams: Any
    requests: tuple[EditRequest, ...]
    fingerprint: str
    device: str = "cpu"
    chat: bool = False
    metrics: tuple[str, ...] = tuple(DEFAULT_METRICS)
    eval_batch_size: int = 16
    task_names: tuple[str, ...] = ()
    task_config: TaskConfig = field(default_factory=TaskConfig)
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def forwarded_env() -> dict[str, str]:
        """This process's values of :data:`FORWARDED_ENV`, to give the workers."""
        return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def start_worker(spec: WorkerSpec) -> UpdateRunner:
    """Load the model once and build the runner every job of this worker uses."""
    import torch

    from lmpatch.api import edit as compute_edit
    from lmpatch.eval.tasks import build_tasks
    from lmpatch.model.loading import load_model

    os.environ.update(spec.env)
    threads = threads_per_worker(spec.workers)
    torch.set_num_threads(threads)
    model = load_model(spec.model, device=spec.device, chat=spec.chat)
    if model.fingerprint != spec.fingerprint:
        raise LmpatchError(
            f"A worker loaded {spec.model or 'the default model'} with fingerprint {model.fingerprint}, but the run "
            f"was planned on {spec.fingerprint}: the workers must load the same weights (same path, same revision)."
        )
    log.info("Worker %d ready: %s on %s, %d torch thread(s)", os.getpid(), model.name, model.device, threads)

    def edit_fn(m, reqs):
        return compute_edit(m, reqs, spec.method, spec.hparams)

    tasks = build_tasks(spec.task_names, spec.task_config) if spec.task_names else None
    return UpdateRunner(model, spec.requests, edit_fn, metrics=spec.metrics, eval_batch_size=spec.eval_batch_size,
                        tasks=tasks)


class Worker:
    """One worker: a local process's resident object or a Ray actor (the same class for both).

    A failure while loading is kept and raised by the first job, so it reaches the parent
    as the original exception (a clear :class:`LmpatchError` stays one) instead of a dead
    process pool or actor."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.error: BaseException | None = None
        self.runner: UpdateRunner | None = None
        try:
            self.runner = start_worker(spec)
        except Exception as exc:  # re-raised by run()
            self.error = exc

    def run(self, job: UpdateJob) -> UpdateResult:
        if self.runner is None:
            raise self.error or LmpatchError("The worker did not start.")
        return self.runner.run(job)


# --------------------------------------------------------------------------- backends


class Backend(ABC):
    """Runs jobs and yields their results in any order. Closing the iterator stops the workers."""

    name: str = ""
    workers: int = 1

    @abstractmethod
    def run(self, jobs: Sequence[UpdateJob]) -> Iterator[UpdateResult]:
        ...

    @property
    @abstractmethod
    def metric_groups(self) -> list[str]:
        """The metric groups every record gets: part of the run's identity, whichever backend runs it."""


class SerialBackend(Backend):
    """The jobs one after another, in order, on a model already loaded in this process."""

    name = "serial"

    def __init__(self, runner: UpdateRunner) -> None:
        self.runner = runner
        self.workers = 1

    @property
    def metric_groups(self) -> list[str]:
        return sorted(self.runner.groups)

    def run(self, jobs: Sequence[UpdateJob]) -> Iterator[UpdateResult]:
        for job in jobs:
            yield self.runner.run(job)


# The Worker of a local worker process (set once by the pool's initializer).
_PROCESS_WORKER: Worker | None = None


def _start_process(spec: WorkerSpec, gpu_slots: Any, gpus_per_worker: int, gpus: Sequence[str]) -> None:
    global _PROCESS_WORKER
    # Ctrl-C reaches the whole process group; the parent handles it (keeps finished
    # results, then stops the workers), so a worker must not die mid-job with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gpus_per_worker:
        # Set before anything initialises CUDA in this process, which reads it once.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_share(gpus, gpu_slots.get(), gpus_per_worker)
    _PROCESS_WORKER = Worker(spec)


def _run_in_process(job: UpdateJob) -> UpdateResult:
    assert _PROCESS_WORKER is not None, "worker process not initialised"
    return _PROCESS_WORKER.run(job)


class LocalBackend(Backend):
    """``workers`` spawned processes on this machine, each loading the model once."""

    name = "local"

    @property
    def metric_groups(self) -> list[str]:
        return sorted(resolve_metrics(self.spec.metrics))

    def __init__(self, spec: WorkerSpec, workers: int, gpus_per_worker: int = 0) -> None:
        self.spec, self.workers, self.gpus_per_worker = spec, workers, gpus_per_worker

    def run(self, jobs: Sequence[UpdateJob]) -> Iterator[UpdateResult]:
        if not jobs:
            return
        n = min(self.workers, len(jobs))
        ctx = multiprocessing.get_context("spawn")
        gpus, slots = [], None
        if self.gpus_per_worker:
            gpus = visible_gpus()
            gpu_share(gpus, n - 1, self.gpus_per_worker)  # enough GPUs for all: refuse before starting any
            slots = ctx.Queue()
            for slot in range(n):
                slots.put(slot)
        spec = replace(self.spec, workers=n)
        pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_start_process,
                                   initargs=(spec, slots, self.gpus_per_worker, gpus))
        pending = {pool.submit(_run_in_process, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()
            _stop_pool(pool, wait_for_jobs=not pending)


def _stop_pool(pool: ProcessPoolExecutor, wait_for_jobs: bool) -> None:
    """Shut the pool down; after an error or Ctrl-C, end its processes instead of letting
    them finish jobs whose results nobody will read."""
    if wait_for_jobs:
        pool.shutdown(wait=True)
        return
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+; shuts the pool down too
    if terminate is not None:
        terminate()
        return
    # Before shutdown(), which forgets the processes while they would finish their jobs.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


class RayBackend(Backend):
    """One Ray actor per worker, each loading the model once.

    Without ``address`` a private local Ray instance with ``workers`` CPUs is started and
    shut down again (no dashboard, no usage statistics, worker output kept in Ray's log
    files so it cannot break the progress bar); with one, the actors join that cluster,
    whose nodes need lmpatch and the model. A Ray session that is already running
    (``ray.init`` by the caller) is used as it is and left running.
    """

    name = "ray"

    @property
    def metric_groups(self) -> list[str]:
        return sorted(resolve_metrics(self.spec.metrics))

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None, gpus_per_worker: int = 0) -> None:
        self.spec, self.workers, self.address, self.gpus_per_worker = spec, workers, address, gpus_per_worker

    def run(self, jobs: Sequence[UpdateJob]) -> Iterator[UpdateResult]:
        if not jobs:
            return
        ray = require_ray()
        from ray.exceptions import RayTaskError
        from ray.util import ActorPool

        started = False
        if not ray.is_initialized():
            if self.address:
                check_reachable(self.address)
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise LmpatchError(f"Could not join the Ray cluster at --address {self.address}: {exc}") from None
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            started = True
        n = min(self.workers, len(jobs))
        spec = replace(self.spec, workers=n)
        # The environment is set when the actor's process starts: huggingface_hub reads
        # HF_HUB_OFFLINE once, on import, before the actor's constructor could set it.
        actor = ray.remote(Worker).options(num_cpus=1, num_gpus=self.gpus_per_worker,
                                           runtime_env={"env_vars": dict(spec.env)} if spec.env else None)
        actors = [actor.remote(spec) for _ in range(n)]
        try:
            pool = ActorPool(actors)
            results = pool.map_unordered(lambda a, job: a.run.remote(job), list(jobs))
            while True:
                try:
                    result = next(results)
                except StopIteration:
                    return
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
                yield result
        finally:
            for a in actors:
                ray.kill(a)
            if started:
                ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) that nothing answers at, at once:
    ``ray.init`` itself keeps retrying for minutes behind a silent progress bar.
    ``auto`` and other forms are left to Ray."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise LmpatchError(f"Nothing answers at --address {address} ({exc.strerror or exc}); start the cluster "
                           "with `ray start --head` or check the address.") from None


def make_backend(config: BackendConfig, spec: WorkerSpec) -> Backend:
    """The local or Ray backend ``config`` names, with workers built from ``spec``
    (the serial backend needs a model in this process: :func:`~lmpatch.eval.runner.run_independent`)."""
    if config.name == "local":
        return LocalBackend(spec, config.worker_count, config.gpus_per_worker)
    if config.name == "ray":
        return RayBackend(spec, config.worker_count, config.address, config.gpus_per_worker)
    raise LmpatchError(f"make_backend builds worker backends (local, ray), not {config.name!r}.")
