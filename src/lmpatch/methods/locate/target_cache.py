"""On-disk cache of optimised targets (MEMIT's z), keyed by everything that determines them.

Why: the target optimisation is almost all of a MEMIT-family edit (on SmolLM2 on a 2-core
CPU, ~2 s per fact against a few seconds for the whole layer loop of 100 facts), and its
result depends only on the model *as it is* (base weights and the patches applied to it,
in order), the layer, the optimisation settings, the context templates and the fact; not
on the solve that turns targets into weights. So comparing MEMIT, AlphaEdit and EMMET on
the same 1,000 facts, or re-running a batch that was interrupted, optimises each fact
once. (The reference code has the same idea as an ``npz`` per case id, keyed only by
layer, clamp and case id, so it silently reuses targets computed for another model
state or other settings; here any change in those gives another key.)

One small safetensors file per fact under ``$LMPATCH_CACHE/targets/<context>/``. Facts
optimised together in a batch follow the same path as alone
(:func:`~lmpatch.methods.locate.values.optimize_values`), so a fact's target does not
depend on which others it was computed with.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmpatch.fileio import atomic_path
from lmpatch.methods.locate.values import ValueConfig
from lmpatch.model.loading import LoadedModel, cache_dir
from lmpatch.model.shadow import resolve_compute_dtype
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

#: Bump when the value optimisation changes what it computes: old entries stop matching.
ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class CachedTarget:
    delta: torch.Tensor   # d, float32
    steps: int
    target_prob: float


@dataclass(frozen=True)
class TargetCache:
    """The cache entries of one optimisation setting on one model state."""

    folder: Path

    @classmethod
    def for_optimisation(
        cls, model: LoadedModel, layer: int, templates: Sequence[str], config: ValueConfig
    ) -> "TargetCache":
        settings = {
            "version": ALGORITHM_VERSION,
            "model": model.fingerprint,
            "applied": [record.patch_id for record in model.applied],
            "chat": model.chat,
            "layer": layer,
            "templates": list(templates),
            "config": asdict(config),
            "compute_dtype": str(resolve_compute_dtype(config.compute_dtype, model.model)),
            "device": model.device.type,
        }
        blob = json.dumps(settings, sort_keys=True, default=str)
        return cls(cache_dir() / "targets" / hashlib.sha256(blob.encode()).hexdigest()[:20])

    def path(self, request: EditRequest) -> Path:
        fact = json.dumps([request.prompt, request.subject, request.target_new])
        return self.folder / (hashlib.sha256(fact.encode()).hexdigest()[:24] + ".safetensors")

    def load(self, request: EditRequest) -> CachedTarget | None:
        path = self.path(request)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                delta = f.get_tensor("delta")
            return CachedTarget(delta.float(), int(meta["steps"]), float(meta["target_prob"]))
        except Exception as exc:  # a truncated or foreign file is recomputed, never trusted
            log.warning("Ignoring unreadable cached target %s (%s)", path, exc)
            return None

    def store(self, request: EditRequest, target: CachedTarget) -> None:
        from safetensors.torch import save_file

        with atomic_path(self.path(request)) as tmp:
            save_file({"delta": target.delta.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"steps": str(target.steps), "target_prob": repr(float(target.target_prob))})
