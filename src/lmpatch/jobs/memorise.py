"""Make a model that has something to remove: fine-tune a copy on given answers, cached.

A model that memorised nothing has nothing to forget, and one that never answers
harmfully has nothing to detoxify. So the privacy and detox benchmarks (and their tests)
start from a copy of the base model fine-tuned on what the job must later remove: the
secrets after their contexts (:func:`memorised_model`; the situation DEPN addresses,
private records in the training data) or unsafe answers after adversarial prompts
(:func:`finetuned_copy`, used by ``benchmarks/detox.py``). The copy is seeded, trained
teacher-forced on the answers' tokens (:mod:`lmpatch.methods.teacher`), and cached as a
plain Hugging Face directory keyed by the base model, the data and the settings, so it is
built once per machine (minutes for SmolLM2-135M).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.fileio import atomic_dir
from lmpatch.jobs.secrets import Secret
from lmpatch.methods.teacher import TARGET_NEW, target_batch, target_nll
from lmpatch.model.loading import LoadedModel, cache_dir, load_model, wrap_model
from lmpatch.progress import progress_bar, quiet_transformers
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoriseConfig:
    """How the leaky copy is trained: every parameter, Adam, a fixed number of epochs."""

    epochs: int = 12
    lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0


def memorised_model(base: LoadedModel, secrets: Sequence[Secret], config: MemoriseConfig = MemoriseConfig(),
                    show: bool = True) -> LoadedModel:
    """The base model fine-tuned on ``secrets`` (built on first use, then loaded from the cache)."""
    if not secrets:
        raise LmpatchError("Nothing to memorise: no secrets given.")
    requests = [EditRequest(prompt=s.context, subject=s.subject or s.context, target_new=s.secret) for s in secrets]
    return finetuned_copy(base, requests, config, "memorised", {"secrets": [s.text for s in secrets]}, show)


def finetuned_copy(base: LoadedModel, requests: Sequence[EditRequest], config: MemoriseConfig, kind: str,
                   identity: dict, show: bool = True) -> LoadedModel:
    """``base`` fine-tuned on every request's ``target_new`` after its prompt, cached under
    ``<cache>/<kind>/<hash of base, identity, config>`` (``identity`` names the data)."""
    if not requests:
        raise LmpatchError(f"Nothing to train the {kind} copy on.")
    blob = json.dumps({"base": base.fingerprint, **identity, **asdict(config)}, sort_keys=True)
    folder = cache_dir() / kind / hashlib.sha256(blob.encode()).hexdigest()[:16]
    if not _built(folder):
        trained = _train(base, requests, config, show, kind)
        with atomic_dir(folder, complete=_built) as tmp, quiet_transformers():
            trained.save_pretrained(tmp, safe_serialization=True)
            base.tokenizer.save_pretrained(tmp)
            (tmp / f"{kind}.json").write_text(blob + "\n")
        log.info("Trained the %s copy on %d answers into %s", kind, len(requests), folder)
    return load_model(folder, device=str(base.device), chat=base.chat)


def _built(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _train(base: LoadedModel, requests: Sequence[EditRequest], config: MemoriseConfig, show: bool,
           kind: str) -> torch.nn.Module:
    net = copy.deepcopy(base.model)
    for p in net.parameters():
        p.requires_grad_(True)
    student = wrap_model(net, base.tokenizer, name=f"{base.name}-{kind}", chat=base.chat)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    order = list(range(len(requests)))
    rng = random.Random(config.seed)
    steps = config.epochs * -(-len(requests) // config.batch_size)
    with torch.random.fork_rng(devices=[]), progress_bar(show, kind, steps, "steps") as advance:
        torch.manual_seed(config.seed)
        net.train()
        for _ in range(config.epochs):
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                batch = target_batch(student, [requests[i] for i in order[start : start + config.batch_size]], TARGET_NEW)
                with torch.enable_grad():
                    loss = target_nll(student, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                advance(1)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
