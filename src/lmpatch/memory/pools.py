"""Embeddings of large fixed text pools, computed once and kept on disk.

IKE's demonstration pool and SERAC's classifier training texts are thousands of
sentences that do not change between runs; embedding them takes minutes on a CPU and
reading them back milliseconds. Each pool is one safetensors file, addressed by content:

    $LMPATCH_CACHE/embeddings/<embedder.id>/<sha256 of the texts>.safetensors

so a changed text, order, or embedder (other weights or settings change ``id``) is a
different file, never a stale hit. Files are written atomically; an unreadable or
mismatched file is recomputed and replaced, and a cache that cannot be written costs
only the recomputation next time.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import torch

from lmpatch.fileio import atomic_path
from lmpatch.memory.embedder import Embedder
from lmpatch.model.loading import cache_dir
from lmpatch.progress import progress_bar

log = logging.getLogger(__name__)

# Texts handed to Embedder.embed per call: large enough for full batches sorted by length,
# small enough for a progress bar that moves.
CHUNK = 1024
PROGRESS_FROM = 2 * CHUNK  # pools at least this large show a progress bar by default
_TENSOR = "embeddings"


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts in order (length-prefixed, so no two lists share a digest)."""
    h = hashlib.sha256(f"{len(texts)}\n".encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def pool_path(embedder: Embedder, texts: Sequence[str]) -> Path:
    """Where the embeddings of ``texts`` by ``embedder`` are cached."""
    folder = str(embedder.id)
    if not folder or folder in (".", "..") or "/" in folder or "\\" in folder:
        raise ValueError(f"Embedder id {folder!r} cannot name a cache directory.")
    return cache_dir() / "embeddings" / folder / f"{texts_digest(texts)}.safetensors"


def pool_embeddings(embedder: Embedder, texts: Sequence[str], name: str, *,
                    progress: bool | None = None) -> torch.Tensor:
    """``embedder.embed(texts)`` for a large fixed pool, from the disk cache when possible.

    ``name`` (e.g. ``"ike-demonstrations"``) labels the progress bar, the log and the
    file's metadata; it is not part of the cache key, so equal pools share one file.
    ``progress`` defaults to a bar for pools of :data:`PROGRESS_FROM` texts or more.
    """
    texts = list(texts)
    path = pool_path(embedder, texts)
    cached = _load(path, len(texts), embedder.dim)
    if cached is not None:
        log.debug("Pool %s: %d embeddings from %s", name, len(texts), path)
        return cached
    if not texts:
        return torch.empty(0, embedder.dim)
    show = len(texts) >= PROGRESS_FROM if progress is None else progress
    parts = []
    with progress_bar(show, f"embedding {name}", len(texts), "texts") as advance:
        for start in range(0, len(texts), CHUNK):
            part = embedder.embed(texts[start : start + CHUNK])
            parts.append(part.detach().to(device="cpu", dtype=torch.float32))
            advance(part.shape[0])
    vectors = torch.cat(parts)
    if tuple(vectors.shape) != (len(texts), embedder.dim):
        raise ValueError(f"{embedder.id} returned {tuple(vectors.shape)} for {len(texts)} texts of dim {embedder.dim}.")
    _store(path, vectors, name, embedder.id)
    log.info("Pool %s: embedded %d texts with %s (cached in %s)", name, len(texts), embedder.id, path)
    return vectors


def _load(path: Path, n: int, dim: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        vectors = load_file(str(path))[_TENSOR]
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, never trusted
        log.warning("Ignoring unreadable pool embeddings %s (%s)", path, exc)
        return None
    if tuple(vectors.shape) != (n, dim) or vectors.dtype != torch.float32:
        log.warning("Ignoring pool embeddings %s: %s %s, expected (%d, %d) float32",
                    path, tuple(vectors.shape), vectors.dtype, n, dim)
        return None
    return vectors


def _store(path: Path, vectors: torch.Tensor, name: str, embedder_id: str) -> None:
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file({_TENSOR: vectors.contiguous()}, str(tmp),
                      metadata={"name": name, "embedder": embedder_id, "count": str(vectors.shape[0])})
    except OSError as exc:  # the vectors are still good; only the next run pays again
        log.warning("Could not cache pool embeddings in %s (%s); set LMPATCH_CACHE to a writable directory", path, exc)
