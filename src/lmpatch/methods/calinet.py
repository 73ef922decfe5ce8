"""CaliNET: calibration memory slots added to the top FFNs (Dong et al., Findings of EMNLP 2022).

The model stays frozen. A small number of extra FFN neurons ("memory slots", ``slots``
per layer) is added to the FFN of each of the top ``top_layers`` layers and trained with
the language-model loss on the facts to calibrate: each request's prompt -> new target,
teacher-forced. CaliNET trains on several templates of each fact; ``use_rephrase``
adds the same target after every ``request.rephrase`` prompt. It is off by default:
in CounterFact and zsRE the rephrases are exactly the prompts generalization is
measured on, so training on them would report the training data as generalization
(the earlier default did, and measured generalization 0.70 on 20 records). A batch of requests trains one set of slots
(the ``batch`` regime); in the ``sequential`` regime every update adds its own set.

Slots start with random keys scaled so that their scores on the edit prompts have unit
spread (half the slots active anywhere, as in a randomly initialised FFN) and zero
values, so the model is unchanged until training moves them. Nothing keeps the slots
silent on other inputs (CaliNET has no such term), so expect locality to suffer where
the slots are active; T-Patcher is the variant that adds that constraint.

Slots are neurons in the host MLP's own form (:mod:`lmpatch.methods.neurons`), so a
patch merges exactly into a plain checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.neuron_train import hooked, nll_and_fixed, record_below, replaying
from lmpatch.methods.neurons import PLAIN, FFNNeurons, MlpForm, mlp_form
from lmpatch.methods.registry import Method, register
from lmpatch.methods.teacher import TARGET_NEW, target_batch
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import ModuleAddition, Patch
from lmpatch.request import EditRequest

__all__ = ["CaliNetHparams", "apply_calinet"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaliNetHparams:
    """CaliNET's settings. The paper adds its slots to the last FFN layers and trains
    them with the LM loss alone; ``slots`` 64 per layer is the brief's "small number";
    ``lr``/``steps`` suit a handful of facts (the paper calibrates thousands over epochs)."""

    layers: tuple[int, ...] | None = None   # None: the top ``top_layers`` layers
    top_layers: int = 2
    slots: int = 64                          # new neurons per layer
    lr: float = 5e-3
    steps: int = 100
    stop_loss: float = 0.05                  # stop once every fact holds and the mean NLL is below this
    use_rephrase: bool = False               # also train on the request's rephrases (see the module docstring)
    seed: int = 0

    def check(self) -> None:
        if self.slots < 1 or self.top_layers < 1:
            raise InvalidRequestError(f"CaliNET needs slots >= 1 and top_layers >= 1, got {self.slots}, {self.top_layers}.")
        if not self.lr > 0 or self.steps < 1:
            raise InvalidRequestError(f"CaliNET needs lr > 0 and steps >= 1, got lr={self.lr}, steps={self.steps}.")


@dataclass(frozen=True)
class _Fact:
    """One (template, target) pair to train on: what :func:`target_batch` reads."""

    prompt: str
    target_new: str


def calinet_layers(model: LoadedModel, hp: CaliNetHparams) -> list[int]:
    spec = model.spec
    if hp.layers is not None:
        layers = sorted({spec.check_layer(layer) for layer in hp.layers})
        if not layers:
            raise InvalidRequestError("CaliNET needs at least one layer; leave layers unset for the top ones.")
        return layers
    return list(range(max(0, spec.n_layers - hp.top_layers), spec.n_layers))


def facts(requests: Sequence[EditRequest], use_rephrase: bool) -> list[_Fact]:
    out = []
    for r in requests:
        out.append(_Fact(r.prompt, r.target_new))
        if use_rephrase:
            out.extend(_Fact(p, r.target_new) for p in r.rephrase)
    return out


def apply_calinet(model: LoadedModel, requests: Sequence[EditRequest], hp: CaliNetHparams) -> Patch:
    """One set of slots per layer, trained on all ``requests`` together."""
    hp.check()
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("CaliNET needs at least one edit request.")
    t0 = time.perf_counter()
    layers = calinet_layers(model, hp)
    forms = [mlp_form(model.model, model.spec, layer) for layer in layers]
    hosts = [model.model.get_submodule(f.place) for f in forms]
    batch = target_batch(model, facts(requests, hp.use_rephrase), TARGET_NEW)
    blocks, recorded, xs = record_below(model, layers[0], batch, hosts)
    gen = torch.Generator().manual_seed(_seed(hp, requests))
    modules = [_new_slots(f, x, batch, hp.slots, gen).to(model.input_device) for f, x in zip(forms, xs)]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=hp.lr)
    history = []
    with replaying(blocks, recorded), hooked(hosts, modules):
        for _ in range(hp.steps):
            opt.zero_grad()
            loss, fixed = nll_and_fixed(model, batch)
            history.append((loss.item(), fixed))
            if fixed and history[-1][0] < hp.stop_loss:
                break
            if not math.isfinite(history[-1][0]):
                raise InvalidRequestError(f"CaliNET diverged; lower lr (now {hp.lr}).")
            loss.backward()
            opt.step()
    info = {
        "layers": layers, "slots": hp.slots, "facts": batch.n_requests, "steps": len(history),
        "initial_loss": round(history[0][0], 4), "final_loss": round(history[-1][0], 4),
        "fixed": history[-1][1], "seconds": round(time.perf_counter() - t0, 3),
    }
    log.debug("calinet: %s", info)
    parts = [ModuleAddition.of(f.place, m.requires_grad_(False).cpu()) for f, m in zip(forms, modules)]
    return Patch(
        parts=parts, method="calinet", model_fingerprint=model.fingerprint, model_name=model.name,
        hparams=asdict(hp), requests=requests, metrics={"edit": info},
    )


def _seed(hp: CaliNetHparams, requests: Sequence[EditRequest]) -> int:
    text = "\n".join(f"{r.prompt}\t{r.target_new}" for r in requests)
    return int.from_bytes(hashlib.sha256(f"{hp.seed}:{text}".encode()).digest()[:4], "little")


def _new_slots(form: MlpForm, x: torch.Tensor, batch, k: int, gen: torch.Generator) -> FFNNeurons:
    """Random keys (and ups) whose scores on the supervised positions have unit spread; zero values."""
    d = x.shape[-1]
    seen = x[batch.pos_rows, batch.pos_cols].cpu()
    scale = 1.0 / float(seen.norm(dim=-1).mean().clamp_min(1e-6))

    def rand() -> torch.Tensor:
        return torch.randn(k, d, generator=gen) * scale

    zeros = torch.zeros(k)
    return FFNNeurons(
        form, rand(), torch.zeros(k, d),
        key_bias=zeros if form.key_bias else None,
        ups=None if form.kind == PLAIN else rand(),
        up_bias=zeros.clone() if form.up_bias else None,
    )


register(Method(
    name="calinet", aliases=("CaliNET", "cali-net"),
    summary="CaliNET: calibration memory slots (extra FFN neurons) in the top layers, trained on the facts (Dong et al. 2022)",
    hparams=CaliNetHparams, edit=apply_calinet, regimes=frozenset({"single", "batch", "sequential"}),
    produces=frozenset({"module_additions"}),
    paper="Dong et al., Calibrating Factual Knowledge in Pretrained Language Models, Findings of EMNLP 2022",
))
