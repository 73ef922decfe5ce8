"""The one training loop of the editors that learn to edit (MEND, KE).

Such an editor is a small network trained over many edits of the frozen base model:
each step makes a batch of edits with the current network, and the loss is how well
the edited model states the new facts (edit prompts and their paraphrases) plus how
little it changes elsewhere (KL to the unedited model on locality prompts). The loop is
shared; each method supplies only its network and its step loss.

What the loop guarantees:

* data from the training splits only: ``counterfact-train`` records 0-4999 and
  ``zsre-train`` records 0-899, without any prompt of the evaluation or tuning sets
  (:func:`lmpatch.methods.negatives.held_out`);
* validation every ``validate_every`` steps on a held-apart slice (``counterfact-train``
  5000+ and ``zsre-train`` 900+), shown on the progress bar and kept in the report;
* a checkpoint (network, optimiser moments, step) every ``checkpoint_every`` steps,
  written atomically, from which an interrupted run resumes: the data order is a
  function of the seed and the step, so a resumed run sees what the full run would;
* the artefact: safetensors + a JSON manifest (settings, base-model fingerprint,
  training time, validation numbers) in a folder keyed by all of those settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from lmpatch.errors import LmpatchError
from lmpatch.fileio import atomic_path, atomic_write_json
from lmpatch.model.loading import LoadedModel, cache_dir
from lmpatch.progress import run_progress
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

__all__ = [
    "EditExample", "TrainingConfig", "artefact_dir", "load_artefact", "save_artefact", "train_editor",
    "training_examples", "validation_examples",
]

#: (data set, first training record, end of training records, end of validation records)
SPLITS = (("counterfact-train", 0, 5000, 5100), ("zsre-train", 0, 900, 1000))
#: the data sets the learned editors train on (what ``lmpatch train`` accepts as ``--data``)
TRAINING_DATA = tuple(name for name, *_ in SPLITS)


@dataclass(frozen=True)
class EditExample:
    """One training edit: the request, a paraphrase that must follow it, and a locality
    prompt with its answer whose prediction must not move."""

    request: EditRequest
    paraphrase: str
    locality: str
    locality_answer: str

    @property
    def paraphrase_request(self) -> EditRequest:
        """The paraphrase with the new target (the whole prompt stands as subject: only prompt and target are read)."""
        r = self.request
        return EditRequest(prompt=self.paraphrase, subject=self.paraphrase, target_new=r.target_new)

    @property
    def locality_request(self) -> EditRequest:
        """The locality prompt and its answer in request form (the answer's positions are the ones compared)."""
        return EditRequest(prompt=self.locality, subject=self.locality, target_new=self.locality_answer)


@dataclass(frozen=True)
class TrainingConfig:
    """How a learned editor is trained (every field keys the artefact)."""

    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-4
    grad_clip: float = 100.0
    validate_every: int = 500
    validate_records: int = 100      # per data set
    checkpoint_every: int = 100
    seed: int = 0


def _examples(lo_hi: Callable[[int, int, int], tuple[int, int]], skip_held_out: bool) -> list[EditExample]:
    from lmpatch.data import load_dataset
    from lmpatch.methods.negatives import held_out

    skip = held_out() if skip_held_out else frozenset()
    out: list[EditExample] = []
    for name, first, train_end, valid_end in SPLITS:
        lo, hi = lo_hi(first, train_end, valid_end)
        for r in load_dataset(name, n=hi - lo, offset=lo):
            if not r.rephrase or not r.locality or not r.locality[0].answer or (skip and r.prompt.strip() in skip):
                continue
            probe = r.locality[0]
            out.append(EditExample(request=r, paraphrase=r.rephrase[0], locality=probe.prompt,
                                   locality_answer=probe.answer))
    return out


def training_examples() -> list[EditExample]:
    """The training edits (both training splits, held-out prompts removed)."""
    return _examples(lambda first, train_end, _v: (first, train_end), skip_held_out=True)


def validation_examples(per_set: int) -> list[EditExample]:
    """The first ``per_set`` held-apart edits of each training split."""
    return _examples(lambda _f, train_end, valid_end: (train_end, min(valid_end, train_end + per_set)),
                     skip_held_out=False)


# --------------------------------------------------------------------------- artefacts


def artefact_key(method: str, fingerprint: str, settings: dict) -> str:
    blob = json.dumps({"method": method, "fingerprint": fingerprint, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shipped_dir() -> Path:
    """Where trained editors ship inside the package."""
    return Path(__file__).resolve().parent.parent / "trained"


def artefact_dir(method: str, key: str) -> Path:
    """The shipped folder when it exists, else the cache folder (where training writes)."""
    shipped = shipped_dir() / method / key
    return shipped if (shipped / "manifest.json").exists() else cache_dir() / method / key


def save_artefact(folder: Path, state: dict[str, torch.Tensor], manifest: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "editor.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    atomic_write_json(folder / "manifest.json", manifest)


def load_artefact(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, manifest) of a trained editor, or None when there is none (or it is unreadable)."""
    from safetensors.torch import load_file

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return load_file(str(folder / "editor.safetensors")), manifest
    except (OSError, ValueError) as exc:
        if (folder / "editor.safetensors").exists():
            log.warning("Ignoring unreadable trained editor in %s (%s)", folder, exc)
        return None


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for name, value in opt.state.get(p, {}).items():
            state[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().clone()
    return state


def _restore_checkpoint(net: nn.Module, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, value in state.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt.state[params[int(i)]][name] = value


# --------------------------------------------------------------------------- the loop

StepLoss = Callable[[LoadedModel, nn.Module, Sequence[EditExample]], tuple[torch.Tensor, dict]]
Validate = Callable[[LoadedModel, nn.Module, Sequence[EditExample]], dict]


def train_editor(
    model: LoadedModel,
    net: nn.Module,
    param_groups: list[dict],
    step_loss: StepLoss,
    validate: Validate,
    config: TrainingConfig,
    folder: Path,
    show: bool = True,
) -> dict:
    """Train ``net`` (in place) and return the report; resumes from ``folder``'s checkpoint.

    ``step_loss(model, net, examples)`` returns (loss, numbers to average for the log);
    ``validate(model, net, examples)`` returns named scores (higher is better).
    """
    train = training_examples()
    valid = validation_examples(config.validate_records)
    if not train:
        raise LmpatchError("No training edits found in counterfact-train and zsre-train.")
    opt = torch.optim.Adam(param_groups)
    start, history, seconds = 0, [], 0.0
    checkpoint = folder / "checkpoint"
    saved = load_artefact(checkpoint)
    if saved is not None and saved[1].get("config") == asdict(config):
        _restore_checkpoint(net, opt, saved[0])
        start, history, seconds = saved[1]["step"], saved[1]["validation"], saved[1]["seconds"]
        log.info("Resuming training from step %d (%s)", start, checkpoint)
    order = _order(len(train), config)

    t0 = time.perf_counter() - seconds
    running: dict[str, float] = {}
    with run_progress(show) as bar:
        task = bar.add_task(_describe(history), total=config.steps, completed=start)
        for step in range(start, config.steps):
            picks = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss, numbers = step_loss(model, net, [train[i] for i in picks])
            if not math.isfinite(loss.item()):
                raise LmpatchError(f"Training diverged at step {step} (loss {float(loss)}); lower the learning rate.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], config.grad_clip)
            opt.step()
            for k, v in {"loss": loss.item(), **numbers}.items():
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
            done = step + 1
            if done % config.validate_every == 0 or done == config.steps:
                net.eval()
                scores = validate(model, net, valid)
                net.train()
                history.append({"step": done, **{k: round(v, 4) for k, v in scores.items()},
                                **{f"train_{k}": round(v, 4) for k, v in running.items()}})
                log.info("step %d: %s", done, history[-1])
            if done % config.checkpoint_every == 0 and done < config.steps:
                save_artefact(checkpoint, _checkpoint_state(net, opt),
                              {"config": asdict(config), "step": done, "validation": history,
                               "seconds": time.perf_counter() - t0})
            bar.update(task, completed=done, description=_describe(history, running))
    net.eval()
    shutil.rmtree(checkpoint, ignore_errors=True)  # finished: a new `train` starts afresh
    return {"steps": config.steps, "train_seconds": round(time.perf_counter() - t0, 1),
            "training_edits": len(train), "validation_edits": len(valid), "validation": history}


def _order(n: int, config: TrainingConfig) -> list[int]:
    """Indices for every step, epoch after epoch, each epoch its own seeded shuffle."""
    epochs = -(-config.steps * config.batch_size // n) + 1
    g = torch.Generator().manual_seed(config.seed)
    return [i for _ in range(epochs) for i in torch.randperm(n, generator=g).tolist()]


def _describe(history: list[dict], running: dict | None = None) -> str:
    """The bar's label: "training", the running loss and the last validation scores."""
    parts = ["training"] + ([f"loss {running['loss']:.3f}"] if running else [])
    if history:
        last = history[-1]
        parts += [f"{k} {v:.2f}" for k, v in last.items() if k != "step" and not k.startswith("train_")]
    return "  ".join(parts)
