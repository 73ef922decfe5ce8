"""Nearest stored vectors by inner product: exact torch search, FAISS when a store is huge.

Memory-based editors store one key per edit (or per demonstration) and ask, per prompt,
for the k best-matching keys. Keys and queries are expected to be unit vectors (see
:mod:`lmpatch.memory.embedder`), so the score is a cosine similarity; nothing here
normalises. Up to a hundred thousand keys an exact float32 matrix product is fast enough
(see ``benchmarks/retrieval_cost.py``) and has no extra dependency; FAISS
(``pip install faiss-cpu``) is used past that, or when asked for.

Both backends return ``min(k, len(index))`` columns, best first. They never pad with
``-1`` as FAISS does: a ``-1`` used as a torch index silently selects the last key.
"""
from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch

from lmpatch.errors import LmpatchError

log = logging.getLogger(__name__)

Backend = Literal["auto", "exact", "faiss"]
FAISS_THRESHOLD = 100_000  # "auto" picks FAISS above this many keys (when it is installed)
# Largest query-by-key score block ExactIndex.search materialises (float32 elements, 16 MB).
SCORE_BUDGET = 1 << 22
_MIN_KEY_CHUNK = 1024


class SearchIndex(Protocol):
    """What a memory-based editor needs from an index of keys."""

    dim: int

    def __len__(self) -> int: ...

    def add(self, keys: torch.Tensor) -> None: ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def _as_matrix(x: torch.Tensor, what: str, dim: int | None = None) -> torch.Tensor:
    """``x`` as a detached float32 CPU matrix, checked against ``dim``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a 2-D tensor [n, dim], got {shape}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the index {dim}.")
    return x.detach().to(device="cpu", dtype=torch.float32)


def _empty_result(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(m, k), torch.empty(m, k, dtype=torch.long)


class ExactIndex:
    """Exact maximum-inner-product search in float32 torch.

    Scores are computed block by block (a slice of the queries times a slice of the keys)
    and merged with ``topk``, so a search never holds more than :data:`SCORE_BUDGET`
    scores at once whatever the number of keys; one query against 100k keys is a single
    vector-matrix product. ``chunk_size`` fixes the key slice (default: as large as the
    budget allows).

    Keys are stored transposed, ``[dim, capacity]``: with torch's MKL on an AMD EPYC (one
    thread, the other core busy) one query times 10k keys in that layout took 0.4-0.6 ms,
    against 1.7 ms for ``query @ keys.T`` on row-major keys (100k: 8-14 ms against 18 ms;
    a batch of 64 queries gained less, 9.8 against 11.6 ms for 10k). The buffer grows by
    doubling, so adding edits one at a time costs amortised O(dim) per key, not a copy of
    the store.
    """

    def __init__(self, keys: torch.Tensor, *, chunk_size: int | None = None) -> None:
        keys = _as_matrix(keys, "keys")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.dim = int(keys.shape[1])
        self.chunk_size = chunk_size
        self._cols = torch.empty(self.dim, keys.shape[0])  # key j is column j
        self._cols.copy_(keys.T)
        self._n = int(keys.shape[0])

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ExactIndex(n={self._n}, dim={self.dim})"

    @property
    def keys(self) -> torch.Tensor:
        """The stored keys, ``[n, dim]`` (a view: do not modify)."""
        return self._cols[:, : self._n].T

    def add(self, keys: torch.Tensor) -> None:
        """Append keys; they get the next indices."""
        keys = _as_matrix(keys, "keys", self.dim)
        need = self._n + keys.shape[0]
        if need > self._cols.shape[1]:
            grown = torch.empty(self.dim, max(need, 2 * self._cols.shape[1], 16))
            grown[:, : self._n] = self._cols[:, : self._n]
            self._cols = grown
        self._cols[:, self._n : need] = keys.T
        self._n = need

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``min(k, n)`` best keys per query: ``(scores [m, k'], indices [m, k'])``, best first."""
        queries = _as_matrix(queries, "queries", self.dim)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        m, n = queries.shape[0], self._n
        k = min(k, n)
        if m == 0 or k == 0:
            return _empty_result(m, k)
        key_chunk = min(n, self.chunk_size or max(_MIN_KEY_CHUNK, SCORE_BUDGET // m))
        query_block = max(1, SCORE_BUDGET // key_chunk)
        with torch.no_grad():
            blocks = [self._search_block(queries[q0 : q0 + query_block], k, key_chunk)
                      for q0 in range(0, m, query_block)]
        if len(blocks) == 1:
            return blocks[0]
        return torch.cat([s for s, _ in blocks]), torch.cat([i for _, i in blocks])

    def _search_block(self, block: torch.Tensor, k: int, key_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` over all keys for one block of queries, one key slice at a time."""
        best_s, best_i = None, None
        for c0 in range(0, self._n, key_chunk):
            part = block @ self._cols[:, c0 : min(c0 + key_chunk, self._n)]
            top_s, top_i = part.topk(min(k, part.shape[1]), dim=1)
            if c0:
                top_i += c0
            if best_s is None:
                best_s, best_i = top_s, top_i
                continue
            both_s, both_i = torch.cat([best_s, top_s], dim=1), torch.cat([best_i, top_i], dim=1)
            best_s, pos = both_s.topk(min(k, both_s.shape[1]), dim=1)
            best_i = both_i.gather(1, pos)
        return best_s, best_i


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissIndex:
    """Exact inner-product search with FAISS (``IndexFlatIP``), for stores past ~100k keys.

    Same answers and conventions as :class:`ExactIndex` (up to float rounding); FAISS
    runs its own OpenMP threads and SIMD kernels.
    """

    def __init__(self, keys: torch.Tensor) -> None:
        try:
            import faiss
        except ImportError:
            raise LmpatchError("The FAISS index needs faiss: install it with `pip install faiss-cpu`.") from None
        keys = _as_matrix(keys, "keys")
        self.dim = int(keys.shape[1])
        self._index = faiss.IndexFlatIP(self.dim)
        self.add(keys)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"FaissIndex(n={len(self)}, dim={self.dim})"

    def add(self, keys: torch.Tensor) -> None:
        """Append keys; they get the next indices."""
        keys = _as_matrix(keys, "keys", self.dim)
        if keys.shape[0]:
            self._index.add(keys.contiguous().numpy())

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``min(k, n)`` best keys per query: ``(scores [m, k'], indices [m, k'])``, best first."""
        queries = _as_matrix(queries, "queries", self.dim)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        m, k = queries.shape[0], min(k, len(self))
        if m == 0 or k == 0:
            return _empty_result(m, k)
        scores, indices = self._index.search(queries.contiguous().numpy(), k)
        return torch.from_numpy(scores).float(), torch.from_numpy(indices).long()


def build_index(keys: torch.Tensor, backend: Backend = "auto") -> ExactIndex | FaissIndex:
    """An index over ``keys``: FAISS when asked, or (``"auto"``) when installed and n > 100k.

    The choice is made once, here: an index that later grows past the threshold by
    :meth:`add` keeps its backend.
    """
    if backend not in ("auto", "exact", "faiss"):
        raise LmpatchError(f"Unknown index backend {backend!r}; use auto, exact or faiss.")
    n = keys.shape[0] if isinstance(keys, torch.Tensor) else 0
    if backend == "faiss" or (backend == "auto" and n > FAISS_THRESHOLD and faiss_available()):
        log.debug("FAISS index over %d keys", n)
        return FaissIndex(keys)
    return ExactIndex(keys)
