"""Uncentred second moments C0 = E[k kᵀ] of MLP keys, streamed over a corpus and cached on disk.

The key at layer l is the input of that layer's MLP output projection (one d_ff vector
per token). ROME, MEMIT and their relatives need C0 (or its inverse) for every edited
layer; the reference code makes one full forward pass per layer over tens of millions
of tokens and caches by model *name*. Here one pass records every requested layer and
stops at the deepest one, 10⁵ tokens is the default (a quick estimate instead of the
reference's tens of millions; ``n_tokens`` asks for more), and the cache is keyed by
everything that changes the numbers: model fingerprint, layer, corpus content, token
count, chunk length, forward dtype and tokenizer.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.fileio import atomic_path
from lmpatch.model.hooks import capture_input, run_until
from lmpatch.model.loading import LoadedModel, cache_dir
from lmpatch.progress import progress_bar
from lmpatch.stats.corpus import DEFAULT_CORPUS, Corpus, open_corpus
from lmpatch.tokens import pad_right

log = logging.getLogger(__name__)

# Bump when the way tokens are chunked or moments accumulated changes: old files become stale.
_FORMAT = 1
_TOKENIZER_PROBE = "The quick brown fox, 1234 times — naïve café.\nA second line"
# Relative size of the smallest Cholesky pivot below which C0 is treated as numerically singular.
_SINGULAR_RATIO = 1e-10


@dataclass(frozen=True)
class StatsConfig:
    """What the statistics are estimated from; everything but ``batch_size`` is in the cache key."""

    corpus: str = DEFAULT_CORPUS
    n_tokens: int = 100_000
    seq_len: int = 256
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("n_tokens", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LmpatchError(f"StatsConfig.{name} must be a positive integer, got {value!r}.")

    def key(self) -> str:
        """File-name-safe identity of the corpus text, token count and chunk length."""
        return _config_key(self, open_corpus(self.corpus))


@dataclass
class SecondMoment:
    """C0 for one layer: ``matrix`` = Σ k kᵀ / ``count`` (float32, CPU)."""

    matrix: torch.Tensor
    count: int
    layer: int
    config: StatsConfig
    model_fingerprint: str
    path: Path | None = None  # cache file it was read from / written to
    created: str = field(default="", repr=False)

    @property
    def d_ff(self) -> int:
        return int(self.matrix.shape[0])


# ----------------------------------------------------------------------------- public API
def second_moments(
    model: LoadedModel,
    layers: Sequence[int],
    config: StatsConfig = StatsConfig(),
    *,
    progress: bool = True,
    cache: bool = True,
) -> dict[int, SecondMoment]:
    """C0 for each of ``layers`` (keys are non-negative layer indices), cached ones loaded, the rest in one pass."""
    spec = model.spec
    wanted = sorted({spec.check_layer(layer) for layer in layers})
    if not wanted:
        raise LmpatchError("No layers given: pass at least one layer index.")
    corpus = open_corpus(config.corpus)
    _check_seq_len(model, config)
    paths = {layer: _stats_path(model, layer, config, corpus) for layer in wanted}
    patched = bool(getattr(model, "applied", None))

    out: dict[int, SecondMoment] = {}
    if cache:
        for layer in wanted:
            found = _load_moment(paths[layer], layer, config, model.fingerprint)
            if found is not None:
                log.info("Layer %d: C0 loaded from cache %s", layer, paths[layer])
                out[layer] = found
    todo = [layer for layer in wanted if layer not in out]
    if not todo:
        return out
    if patched and cache:
        log.warning(
            "Computing key statistics with patches applied: the result describes the patched model "
            "and is not cached. Compute statistics before applying patches so the base model's are cached."
        )

    start = time.perf_counter()
    sums, count = _accumulate(model, todo, corpus, config, progress)
    log.info("C0 for layers %s from %d tokens in %.1f s", todo, count, time.perf_counter() - start)
    created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    for layer in todo:
        c64 = sums[layer] / count
        c64 = (c64 + c64.T) / 2  # float32 GEMM blocks are symmetric only up to rounding
        _warn_if_singular(layer, c64, count)
        moment = SecondMoment(
            matrix=c64.to("cpu", torch.float32),
            count=count,
            layer=layer,
            config=config,
            model_fingerprint=model.fingerprint,
            created=created,
        )
        if cache and not patched:
            moment.path = paths[layer]
            _atomic_save({"matrix": moment.matrix}, _moment_metadata(model, moment, corpus), paths[layer])
        out[layer] = moment
    return {layer: out[layer] for layer in wanted}


def second_moment(model: LoadedModel, layer: int, config: StatsConfig = StatsConfig(), **kw) -> SecondMoment:
    """C0 for a single layer (see :func:`second_moments`)."""
    return second_moments(model, [layer], config, **kw)[model.spec.check_layer(layer)]


def inverse_second_moment(
    model: LoadedModel,
    layer: int,
    config: StatsConfig = StatsConfig(),
    ridge: float = 0.0,
    *,
    progress: bool = True,
    cache: bool = True,
) -> torch.Tensor:
    """(C0 + ridge·I)⁻¹ as float32 on CPU, factorised in float64 and cached next to the statistics.

    ROME needs C0⁻¹k for every edit; inverting a d_ff × d_ff matrix each time is the
    single most wasteful step of the reference code, so the inverse is a cached asset too.
    """
    if not ridge >= 0:
        raise LmpatchError(f"ridge must be >= 0, got {ridge!r}.")
    moment = second_moment(model, layer, config, progress=progress, cache=cache)
    path = _inverse_path(moment.path, ridge) if moment.path is not None else None
    if path is not None:
        found = _load_inverse(path, moment)
        if found is not None:
            return found
    inv = _spd_inverse(moment, ridge)
    if path is not None:
        meta = {
            "kind": "inverse",
            "layer": str(moment.layer),
            "ridge": repr(float(ridge)),
            "count": str(moment.count),
            "source": moment.path.name,
            "source_created": moment.created,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "format": str(_FORMAT),
        }
        _atomic_save({"inverse": inv}, meta, path)
    return inv


def stats_path(model: LoadedModel, layer: int, config: StatsConfig = StatsConfig()) -> Path:
    """Where C0 for ``layer`` under ``config`` is (or would be) cached."""
    return _stats_path(model, model.spec.check_layer(layer), config, open_corpus(config.corpus))


def cached_stats(fingerprint: str | None = None) -> list[dict]:
    """Every cached statistics file (optionally of one model fingerprint) with its metadata and size."""
    root = cache_dir() / "stats"
    if fingerprint:
        dirs = [root / fingerprint]
    else:
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    entries = []
    for folder in dirs:
        for path in sorted(folder.glob("*.safetensors")):
            meta = _read_metadata(path)
            if meta is None:
                continue
            entry: dict = {"path": str(path), "fingerprint": folder.name, "bytes": path.stat().st_size}
            for name, value in meta.items():
                entry[name] = _parse_meta(name, value)
            entries.append(entry)
    return entries


def token_chunks(tokenizer, documents: Iterable[str], seq_len: int, n_tokens: int) -> Iterator[list[int]]:
    """Fixed-length token chunks of the concatenated documents (EOS between them), n_tokens in total.

    Tokenizers that start every text with BOS (Llama-2/3) get it at the start of every
    chunk too, since that is the only way those models ever see position 0.
    """
    prefix = _bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body <= 0:
        raise LmpatchError(f"seq_len={seq_len} leaves no room for text after the BOS token.")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    left = n_tokens
    buf: list[int] = []
    for doc in documents:
        # verbose=False: whole documents are longer than the model's context; that is fine here.
        buf.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        buf.extend(sep)
        start = 0
        while len(buf) - start >= body:
            chunk = (prefix + buf[start : start + body])[:left]
            start += body
            left -= len(chunk)
            yield chunk
            if left <= 0:
                return
        buf = buf[start:]
    if buf and left > 0:
        yield (prefix + buf)[:left]


# ----------------------------------------------------------------------------- accumulation
@torch.inference_mode()
def _accumulate(
    model: LoadedModel, layers: list[int], corpus: Corpus, config: StatsConfig, progress: bool
) -> tuple[dict[int, torch.Tensor], int]:
    """Σ k kᵀ (float64, on each key's device) per layer and the number of real tokens, in one pass."""
    net = model.model
    modules = {layer: model.spec.mlp_out(net, layer) for layer in layers}
    deepest = modules[max(layers)]
    stores: dict[int, list] = {layer: [] for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    device = model.input_device
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    chunks = token_chunks(tok, corpus.documents(), config.seq_len, config.n_tokens)
    label = f"C0 layer{'s' if len(layers) > 1 else ''} {_layer_label(layers)} · {corpus.name}"

    with ExitStack() as stack:
        for layer, module in modules.items():
            stack.enter_context(capture_input(module, stores[layer]))
        advance = stack.enter_context(progress_bar(progress, label, config.n_tokens, "tokens"))
        for batch in _batched(chunks, config.batch_size):
            ids, mask = pad_right(batch, pad_id)
            run_until(model.forward, deepest, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            for layer in layers:
                for keys in stores[layer]:
                    _add_outer_products(sums, layer, keys, mask)
                stores[layer].clear()
            real = int(mask.sum())
            count += real
            advance(real)
    if count == 0:
        raise LmpatchError(f"Corpus '{corpus.name}' contains no text to compute statistics from.")
    if count < config.n_tokens:
        log.warning("Corpus '%s' ran out after %d of the %d tokens asked for.", corpus.name, count, config.n_tokens)
    return sums, count


def _add_outer_products(sums: dict[int, torch.Tensor], layer: int, keys: torch.Tensor, mask: torch.Tensor) -> None:
    """Add Σ k kᵀ over the real (mask = 1) tokens: a float32 GEMM per batch, reduced into float64."""
    rows = keys.reshape(-1, keys.shape[-1])
    real = mask.to(keys.device).reshape(-1).bool()
    if not bool(real.all()):
        rows = rows[real]
    rows = rows.float()
    block = rows.T @ rows
    if layer in sums:
        sums[layer] += block
    else:
        sums[layer] = block.double()


def _batched(chunks: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- checks
def _warn_if_singular(layer: int, c64: torch.Tensor, count: int) -> None:
    """Warn (with the fix) when C0 cannot be inverted: a Cholesky factorisation is the cheap test."""
    d = c64.shape[0]
    if count < d:
        log.warning(
            "Layer %d: C0 was estimated from %d tokens but keys have %d dimensions, so it is singular. "
            "Use more tokens (StatsConfig(n_tokens=...), at least %d; 10x that is better) or a ridge.",
            layer, count, d, 10 * d,
        )
        return
    dead = int((c64.diagonal() <= 0).sum())
    if dead:
        log.warning(
            "Layer %d: %d of %d key dimensions were zero on every token, so C0 is singular. "
            "More or more varied text (StatsConfig(n_tokens=..., corpus=...)) or a ridge > 0 fixes it.",
            layer, dead, d,
        )
        return
    chol, info = torch.linalg.cholesky_ex(c64)
    scale = float(c64.diagonal().max())
    smallest = float(chol.diagonal().min()) ** 2 if int(info) == 0 else 0.0
    if smallest < _SINGULAR_RATIO * scale:
        log.warning(
            "Layer %d: C0 from %d tokens is numerically rank-deficient. Use more tokens "
            "(StatsConfig(n_tokens=...)) or pass ridge > 0 when inverting it.",
            layer, count,
        )


def _spd_inverse(moment: SecondMoment, ridge: float) -> torch.Tensor:
    c = moment.matrix.to(torch.float64)
    c.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise LmpatchError(
            f"C0 at layer {moment.layer} is singular ({moment.count} tokens for {moment.d_ff} key "
            "dimensions) and cannot be inverted: pass ridge > 0 or compute it from more tokens "
            "(StatsConfig(n_tokens=...))."
        )
    inv = torch.cholesky_inverse(chol)
    return ((inv + inv.T) / 2).to(torch.float32)


def _check_seq_len(model: LoadedModel, config: StatsConfig) -> None:
    limit = model.context_length
    if limit and config.seq_len > limit:
        raise LmpatchError(f"seq_len={config.seq_len} exceeds this model's context of {limit} tokens; lower it.")


# ----------------------------------------------------------------------------- cache files
def _config_key(config: StatsConfig, corpus: Corpus) -> str:
    return f"{corpus.key}-n{config.n_tokens}-s{config.seq_len}"


def _stats_path(model: LoadedModel, layer: int, config: StatsConfig, corpus: Corpus) -> Path:
    dtype = str(model.spec.mlp_out(model.model, layer).weight.dtype).removeprefix("torch.")
    name = f"C0-L{layer:03d}-{_config_key(config, corpus)}-{dtype}-t{_tokenizer_key(model.tokenizer)}-v{_FORMAT}"
    return cache_dir() / "stats" / model.fingerprint / f"{name}.safetensors"


def _inverse_path(stats: Path, ridge: float) -> Path:
    return stats.with_name(f"{stats.stem}-inv-r{float(ridge):.6g}.safetensors")


def _tokenizer_key(tokenizer) -> str:
    """Short hash of how the tokenizer splits a probe text: same weights, other tokenizer, other stats."""
    ids = tokenizer(_TOKENIZER_PROBE, add_special_tokens=True)["input_ids"]
    desc = f"{len(tokenizer)}|{tokenizer.eos_token_id}|{tokenizer.bos_token_id}|{list(ids)}"
    return hashlib.sha256(desc.encode()).hexdigest()[:8]


def _bos_prefix(tokenizer) -> list[int]:
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    return ids if ids and bos is not None and all(i == bos for i in ids) else []


def _moment_metadata(model: LoadedModel, moment: SecondMoment, corpus: Corpus) -> dict[str, str]:
    return {
        "kind": "second_moment",
        "layer": str(moment.layer),
        "count": str(moment.count),
        "d_ff": str(moment.d_ff),
        "model": str(model.name),
        "corpus": corpus.name,
        "corpus_key": corpus.key,
        "n_tokens": str(moment.config.n_tokens),
        "seq_len": str(moment.config.seq_len),
        "dtype": str(model.spec.mlp_out(model.model, moment.layer).weight.dtype).removeprefix("torch."),
        "created": moment.created,
        "format": str(_FORMAT),
    }


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _read_file(path: Path, name: str) -> tuple[torch.Tensor, dict[str, str]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(name), fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, never fatal
        log.warning("Ignoring unreadable statistics file %s (%s); recomputing it.", path, exc)
        return None


def _read_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except Exception:  # noqa: BLE001 - listing skips files it cannot read
        return None


def _load_moment(path: Path, layer: int, config: StatsConfig, fingerprint: str) -> SecondMoment | None:
    if not path.is_file():
        return None
    found = _read_file(path, "matrix")
    if found is None:
        return None
    matrix, meta = found
    if "count" not in meta or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        log.warning("Ignoring malformed statistics file %s; recomputing it.", path)
        return None
    return SecondMoment(matrix, int(meta["count"]), layer, config, fingerprint, path, meta.get("created", ""))


def _load_inverse(path: Path, moment: SecondMoment) -> torch.Tensor | None:
    if not path.is_file():
        return None
    found = _read_file(path, "inverse")
    if found is None:
        return None
    inv, meta = found
    if meta.get("source_created") != moment.created or inv.shape != moment.matrix.shape:
        return None  # the statistics were recomputed since: this inverse is stale
    return inv


def _parse_meta(name: str, value: str):
    if name in ("layer", "count", "d_ff", "n_tokens", "seq_len", "format"):
        try:
            return int(value)
        except ValueError:
            return value
    if name == "ridge":
        return float(value)
    return value


def _layer_label(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
