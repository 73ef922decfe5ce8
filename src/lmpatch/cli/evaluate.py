"""``lmpatch eval``: edit and score many requests in the single, batch or sequential regime,
in this process or on local / Ray workers (:mod:`lmpatch.eval.parallel`)."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import notice, out, print_json
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, default_run_dir, parse_sets
from lmpatch.cli.warmup import prepare
from lmpatch.machine import peak_rss_mb

MODES = ("single", "batch", "sequential")
PROTOCOL_CHOICES = ("teacher_forced", "probability", "generation")
ALL_METRICS = "all"


def evaluate(
    ctx: typer.Context,
    method: str = typer.Option("rome", "--method", help="Editing method (see `lmpatch methods`)."),
    data: str = typer.Option("counterfact", "--data", help="Dataset name (see `lmpatch datasets`), JSON/JSONL file, or mquake (multi-hop questions after each "
    "case's edits)."),
    n: int = typer.Option(10, "--n", min=1, help="Number of requests to edit."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many requests first."),
    mode: str = typer.Option("single", "--mode", help="single: each edit from the original model; batch: "
                             "--batch-size edits per update, each from the original model; sequential: updates "
                             "accumulate (lifelong editing)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Edits per update (batch default: "
                                             "all n in one update; sequential default: 1)."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Sequential: comma-separated edit counts "
                                              "at which all edits so far are re-scored (default: ~10 evenly spaced)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap prompts in the model's chat template."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override key=value (repeatable)."),
    metrics: Optional[str] = typer.Option(
        None, "--metrics", help="Comma-separated metric groups (default: reliability, generalization, locality, "
        "portability, side_effects, counterfact, generation, wild). Also: fluency (n-gram entropy of generations), "
        "piqa and perplexity (whole-model side effects, measured before and after). `all` selects every "
        "group and task."
    ),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="Keep only metrics of one protocol: "
                                           "teacher_forced, probability or generation."),
    piqa_n: int = typer.Option(200, "--piqa-n", min=1, help="PIQA validation items scored per measurement."),
    ppl_tokens: int = typer.Option(20_000, "--ppl-tokens", min=100, help="WikiText-2 tokens scored for perplexity."),
    score_n: Optional[int] = typer.Option(None, "--score-n", min=1, help="Score only this many "
                                          "evenly spaced requests (all n are edited); for runs of thousands, "
                                          "where scoring would cost more than editing."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<method>-<data>-<time>)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue the run already in --out (whichever "
                                "backend made it)."),
    backend: str = typer.Option("serial", "--backend", help="Where the edits run: serial (this process), local "
                                "(--workers processes on this machine) or ray (--workers Ray actors; pip install "
                                "'lmpatch\\[ray]'). Each worker loads the model once; the run directory is a serial "
                                "run's. single and batch modes only."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes or actors for --backend "
                                          "local/ray (default 2); each uses its share of this machine's cores."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (e.g. auto or "
                                          "ray://head:10001); default: a private local Ray instance."),
    gpus_per_worker: int = typer.Option(0, "--gpus-per-worker", min=0, help="GPUs given to each worker (local or "
                                        "ray); with --device auto a model spans its worker's GPUs."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Edit many requests in the single, batch or sequential regime and report every metric
    pre and post, each with its protocol. Single and batch runs can be spread over worker
    processes (--backend local) or Ray actors (--backend ray) with the same results."""
    from lmpatch.api import edit as compute_edit
    from lmpatch.data import load_dataset
    from lmpatch.errors import LmpatchError
    from lmpatch.eval.parallel import BackendConfig
    from lmpatch.eval.runner import ModelIdentity, run_independent
    from lmpatch.eval.sequential import run_sequential
    from lmpatch.eval.tasks import TaskConfig, build_tasks
    from lmpatch.methods.hparams import as_dict, with_overrides
    from lmpatch.methods.registry import get_method

    settings: Settings = ctx.obj
    if mode not in MODES:
        raise LmpatchError(f"Unknown --mode {mode!r}; choose single, batch or sequential.")
    if mode == "single" and batch_size not in (None, 1):
        raise LmpatchError("--batch-size needs --mode batch or --mode sequential (single edits one request per update).")
    info = get_method(method)
    if mode not in info.regimes:
        supported = ", ".join(r for r in ("single", "batch", "sequential") if r in info.regimes)
        raise LmpatchError(f"{info.name} does not support --mode {mode}; it supports {supported}.")
    hparams = with_overrides(info.hparams, parse_sets(sets, info.hparams))
    groups, task_names = select_metrics(metrics, protocol)
    marks = _parse_counts(checkpoints)
    from lmpatch.data.mquake import looks_like_mquake

    multihop = data == "mquake" or looks_like_mquake(data)
    where = BackendConfig(backend, workers, address, gpus_per_worker)
    where.check("multihop" if multihop else mode, settings.device)
    if multihop:
        _multihop(settings, info, hparams, n, offset, model, chat, out_dir, as_json, data)
        return
    requests = load_dataset(data, n=n, offset=offset)
    if not requests:
        raise LmpatchError(f"No requests in {data!r} after skipping {offset}; lower --offset.")
    if len(requests) < n:
        notice(f"{data} has {len(requests)} usable requests after skipping {offset}, fewer than --n {n}; "
               f"editing those {len(requests)}.")
    size = 1 if mode == "single" else batch_size or (len(requests) if mode == "batch" else 1)
    run_dir = out_dir or default_run_dir(info.name, data)
    loaded, _ = load(settings, model, chat=chat)
    prepare(loaded, info, hparams, show=True)
    tasks = build_tasks(task_names, TaskConfig(piqa_n=piqa_n, perplexity_tokens=ppl_tokens)) if task_names else None

    def edit_fn(m, reqs):
        return compute_edit(m, reqs, info.name, hparams)

    # What makes this run this run: resuming --out with any of it changed is refused (eval/run_identity.py).
    identity_settings = {"hparams": as_dict(hparams), "data": data, "offset": offset, "chat": chat}
    common = dict(resume=resume, progress=True, metrics=groups, method=info.name, tasks=tasks, score_n=score_n,
                  settings=identity_settings)
    try:
        if mode == "sequential":
            summary = run_sequential(loaded, requests, edit_fn, run_dir, batch_size=size, checkpoints=marks, **common)
        elif where.name == "serial":
            summary = run_independent(loaded, requests, edit_fn, run_dir, batch_size=size, **common)
        else:
            # The model loaded here did the one-off work (cached on disk for the workers) and
            # names the weights every worker must load; the workers load their own, so this
            # process lets its copy go instead of holding it while they run.
            identity = ModelIdentity.of(loaded)
            del loaded
            _release_memory()
            summary = _sharded(where, settings, identity, model, chat, info.name, hparams, requests, run_dir, size,
                               task_names, TaskConfig(piqa_n=piqa_n, perplexity_tokens=ppl_tokens), common)
    except KeyboardInterrupt:
        notice(f"Interrupted. Finished work is kept in {run_dir}; rerun with --out {run_dir} to resume.")
        raise
    summary = {**summary, "data": data, "offset": offset, "out_dir": str(run_dir), "peak_rss_mb": peak_rss_mb()}
    from lmpatch.eval.records import SUMMARY_FILE
    from lmpatch.fileio import atomic_write_json

    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)
    if as_json:
        print_json(json.dumps(summary, default=str))
        return
    _print_summary(summary)
    notice(f"Records: {Path(run_dir) / 'records.jsonl'}; summary: {Path(run_dir) / 'summary.json'}; "
           f"render with `lmpatch report {run_dir}`")


def _release_memory() -> None:
    """Give back the memory of a dropped model, including what torch's CUDA allocator keeps
    cached, which would otherwise stay reserved on GPUs the workers are about to use."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sharded(where, settings, identity, model, chat, method, hparams, requests, run_dir, size, task_names,
             task_config, common) -> dict:
    """An independent run on local or Ray workers; this process only plans and writes."""
    from lmpatch.eval.parallel import WorkerSpec, make_backend
    from lmpatch.eval.runner import run_updates

    # Workers may start in another directory (Ray's): a local model path is passed absolute.
    source = model
    if model and Path(model).expanduser().exists():
        source = str(Path(model).expanduser().resolve())
    spec = WorkerSpec(model=source, method=method, hparams=hparams, requests=tuple(requests),
                      fingerprint=identity.fingerprint, device=settings.device, chat=chat,
                      metrics=tuple(common["metrics"]), task_names=task_names, task_config=task_config,
                      env=WorkerSpec.forwarded_env())
    backend = make_backend(where, spec)
    target = f" on the Ray cluster at {where.address}" if where.address else ""
    notice(f"Running on {backend.workers} {where.name} worker(s){target}; each loads the model once.")
    common = {k: v for k, v in common.items() if k != "metrics"}
    return run_updates(backend, requests, run_dir, identity=identity, batch_size=size, **common)


def _multihop(settings, info, hparams, n, offset, model, chat, out_dir, as_json, data="mquake") -> None:
    """``--data mquake`` or an MQuAKE-format file: each case's edits together, then its
    multi-hop questions (MQuAKE's protocol); pre = the unedited model against the original answers."""
    from lmpatch.api import edit as compute_edit
    from lmpatch.data.mquake import load_mquake
    from lmpatch.errors import LmpatchError
    from lmpatch.eval.multihop import multihop_accuracy
    from lmpatch.eval.records import SUMMARY_FILE
    from lmpatch.fileio import atomic_write_json

    cases = load_mquake(None if data == "mquake" else data)[offset : offset + n]
    if not cases:
        raise LmpatchError(f"No MQuAKE cases after skipping {offset}; lower --offset.")
    run_dir = Path(out_dir or default_run_dir(info.name, "mquake" if data == "mquake" else Path(data).stem))
    run_dir.mkdir(parents=True, exist_ok=True)
    loaded, _ = load(settings, model, chat=chat)
    prepare(loaded, info, hparams, show=True)
    pre = multihop_accuracy(loaded, cases)
    post = multihop_accuracy(loaded, cases, lambda m, reqs: compute_edit(m, reqs, info.name, hparams))
    edit_times = [r.edit_seconds for r in post.records if r.edit_seconds is not None]
    from lmpatch.eval.records import timing

    summary = {
        "method": info.name, "model": loaded.name, "fingerprint": loaded.fingerprint, "regime": "single",
        "batch_size": 1, "n": len(cases), "data": data, "offset": offset,
        "metrics": {"multihop_accuracy": post.accuracy, "multihop_question_accuracy": post.question_accuracy},
        "metrics_pre": {"multihop_accuracy": pre.accuracy, "multihop_question_accuracy": pre.question_accuracy},
        "counts": {"multihop_accuracy": len(cases)},
        "protocols": {"multihop_accuracy": post.tag, "multihop_question_accuracy": post.tag},
        "edit_seconds": timing(edit_times), "answer_seconds": timing([r.answer_seconds for r in post.records]),
        "out_dir": str(run_dir), "peak_rss_mb": peak_rss_mb(),
        "multihop": {"pre": pre.to_dict(records=False), "post": post.to_dict(records=False)},
    }
    atomic_write_json(run_dir / "multihop.json", {"pre": pre.to_dict(), "post": post.to_dict()}, indent=1, default=str)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    if as_json:
        print_json(json.dumps(summary, default=str))
        return
    _print_summary(summary)


def select_metrics(metrics: str | None, protocol: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Per-request metric groups and whole-model tasks named by --metrics, filtered by --protocol."""
    from lmpatch.errors import LmpatchError
    from lmpatch.eval.metrics import DEFAULT_METRICS, GROUPS, PROTOCOLS, resolve_metrics
    from lmpatch.eval.tasks import TASK_NAMES

    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else list(DEFAULT_METRICS)
    if ALL_METRICS in names:
        # Every group applies to every dataset: groups a dataset has no probes for come out
        # as null instead of failing, so "all" need not know which dataset was chosen.
        names = list(dict.fromkeys([*GROUPS, *TASK_NAMES, *(m for m in names if m != ALL_METRICS)]))
    task_names = tuple(m for m in names if m in TASK_NAMES)
    rest = [m for m in names if m not in TASK_NAMES]
    groups = sorted(resolve_metrics(rest)) if rest else []
    if protocol is not None:
        if protocol not in PROTOCOL_CHOICES:
            raise LmpatchError(f"Unknown --protocol {protocol!r}; choose {', '.join(PROTOCOL_CHOICES)}.")
        family = {
            "teacher_forced": ("teacher_forced_token_accuracy", "pre_post_agreement"),
            "probability": ("probability_comparison",),
            "generation": ("generation_exact_match", "generation_contains", "generation_wild_exact_match",
                           "ngram_entropy_of_greedy_generation"),
        }[protocol]
        groups = [g for g in groups if any(PROTOCOLS[k] in family for k in GROUPS[g])]
        task_names = ()
        if not groups:
            raise LmpatchError(f"None of the selected metrics uses the {protocol} protocol.")
    if not groups and not task_names:
        raise LmpatchError("No metrics selected.")
    return tuple(groups) or ("reliability",), task_names


def _parse_counts(text: str | None) -> list[int] | None:
    from lmpatch.errors import LmpatchError

    if not text:
        return None
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmpatchError(f"--checkpoints takes comma-separated edit counts like 10,100,1000, not {text!r}.") from None
    if any(c < 1 for c in counts):
        raise LmpatchError("--checkpoints must be positive edit counts.")
    return counts


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_summary(summary: dict) -> None:
    console = out()
    post, pre = summary.get("metrics", {}), summary.get("metrics_pre", {})
    counts, protocols = summary.get("counts", {}), summary.get("protocols", {})
    table = Table(
        title=f"{summary['method']} on {summary['model']}: {summary['n']} edits from {summary['data']} "
        f"({summary.get('regime', 'single')}{', batches of ' + str(summary['batch_size']) if summary.get('regime') != 'single' else ''})",
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    table.add_column("pre", justify="right")
    table.add_column("post", justify="right", style="bold")
    table.add_column("n", justify="right")
    table.add_column("protocol", style="dim")
    for key in protocols:
        if key.endswith("_before"):
            continue  # shown as the "pre" of its "_after" row
        if key.endswith("_after"):
            name = key[: -len("_after")]
            table.add_row(name, _fmt(post.get(name + "_before")), _fmt(post.get(key)), "", protocols[key])
            continue
        table.add_row(key, _fmt(pre.get(key)), _fmt(post.get(key)), str(counts.get(key, "")), protocols[key])
    console.print(table)
    t = summary.get("edit_seconds", {})
    if t.get("median") is not None:
        console.print(f"Edit time: median {t['median']:.2f} s, p90 {t['p90']:.2f} s, total {t['total']:.1f} s.")
