"""Tiny randomly initialised LMs of many architectures, for fast wiring tests.

Decoder-only models of many families, and T5 encoder-decoders (no T5 weights can be
downloaded here, so T5 support is tested on these random models only).

Every model is built with ``from_config`` (no download), is 64 wide with a 128-wide MLP,
and shares the real SmolLM2 tokenizer so prompts tokenize exactly as on the real model
(the 49152-row embedding costs only ~3M parameters at width 64). Building is seeded, so
``tiny_model(arch)`` returns the same weights every time, and each call returns a fresh
model that a test may modify freely. The tokenizer is shared: do not mutate it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
import transformers

from lmpatch.model.loading import LoadedModel, load_tokenizer, wrap_model

HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
MAX_POSITIONS = 512
DEFAULT_LAYERS = 4


def _gpt2(n: int) -> dict:
    return dict(n_embd=HIDDEN, n_layer=n, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=MAX_POSITIONS)


def _gptj(n: int) -> dict:
    return dict(_gpt2(n), rotary_dim=8)


def _bloom(n: int) -> dict:
    return dict(hidden_size=HIDDEN, n_layer=n, n_head=HEADS)


def _falcon(n: int) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=n, num_attention_heads=HEADS,
                ffn_hidden_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS)


def _neox(n: int) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=n, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS)


def _opt(n: int) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=n, num_attention_heads=HEADS, ffn_dim=INTERMEDIATE,
                word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POSITIONS)


def _gqa(n: int) -> dict:
    """Llama-style: grouped-query attention with 2 key/value heads, gated MLP."""
    return dict(hidden_size=HIDDEN, num_hidden_layers=n, num_attention_heads=HEADS, num_key_value_heads=2,
                intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS)


def _gemma(n: int) -> dict:
    return dict(_gqa(n), head_dim=HIDDEN // HEADS)


def _gemma2(n: int) -> dict:
    return dict(_gemma(n), query_pre_attn_scalar=HIDDEN // HEADS)


def _phi3(n: int) -> dict:
    return dict(_gqa(n), original_max_position_embeddings=MAX_POSITIONS)


def _granite(n: int) -> dict:
    return dict(_gqa(n), logits_scaling=4.0)


def _qwen3(n: int) -> dict:
    # Attention wider than the residual (4 heads x 32 = 128, like Qwen3 and Gemma-7B), and
    # as wide as the MLP: q_proj/o_proj have the same shapes as up_proj/down_proj.
    return dict(_gqa(n), head_dim=2 * HIDDEN // HEADS)


def _t5(n: int) -> dict:
    """T5 (encoder-decoder): ``n`` encoder and ``n`` decoder blocks; decoding starts from the pad token."""
    return dict(d_model=HIDDEN, d_ff=INTERMEDIATE, num_heads=HEADS, d_kv=HIDDEN // HEADS, num_layers=n,
                num_decoder_layers=n, dropout_rate=0.0)


def _t5_gated(n: int) -> dict:
    """T5 v1.1 / Flan-T5: gated-GELU MLP (wi_0, wi_1, wo), untied head without output scaling."""
    return dict(_t5(n), feed_forward_proj="gated-gelu", tie_word_embeddings=False)


# arch -> (config class name, config factory). Class names are resolved lazily so an
# older transformers without an architecture simply does not list it.
_CONFIGS: dict[str, tuple[str, Callable[[int], dict]]] = {
    "gpt2": ("GPT2Config", _gpt2),
    "gptj": ("GPTJConfig", _gptj),
    "gpt_neox": ("GPTNeoXConfig", _neox),
    "llama": ("LlamaConfig", _gqa),
    "mistral": ("MistralConfig", _gqa),
    "qwen2": ("Qwen2Config", _gqa),
    "gemma": ("GemmaConfig", _gemma),
    "phi3": ("Phi3Config", _phi3),
    "opt": ("OPTConfig", _opt),
    "gemma2": ("Gemma2Config", _gemma2),
    # Only for spec discovery tests: not part of ARCHS, which every method runs on.
    "qwen3": ("Qwen3Config", _qwen3),
    "cohere": ("CohereConfig", _gqa),
    "granite": ("GraniteConfig", _granite),
    "falcon": ("FalconConfig", _falcon),
    "bloom": ("BloomConfig", _bloom),
    "olmo": ("OlmoConfig", _gqa),  # its layer norms have no parameters
    "olmo2": ("Olmo2Config", _gqa),  # norms after attention and MLP only (post-norms)
    # Encoder-decoders: only the methods that support them run on these (SEQ2SEQ_ARCHS).
    "t5": ("T5Config", _t5),
    "t5_gated": ("T5Config", _t5_gated),
}

_MAIN = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "phi3", "opt", "gemma2"]
_EXTRA = ["qwen3", "cohere", "granite", "falcon", "bloom", "olmo", "olmo2"]
_SEQ2SEQ = ["t5", "t5_gated"]


def _available(names: list[str]) -> list[str]:
    return [a for a in names if hasattr(transformers, _CONFIGS[a][0])]


ARCHS: list[str] = _available(_MAIN)
"""Architectures every wiring test should cover."""

EXTRA_ARCHS: list[str] = _available(_EXTRA)
"""Further architectures whose module maps are checked (spec tests only)."""

SEQ2SEQ_ARCHS: list[str] = _available(_SEQ2SEQ)
"""Encoder-decoder architectures (T5), for the methods that support them."""


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The SmolLM2 tokenizer (offline, from the embedded model), loaded once per process."""
    return load_tokenizer()


def tiny_config(arch: str, *, n_layers: int = DEFAULT_LAYERS, **overrides: Any):
    """The ``transformers`` config of the tiny ``arch`` model (overrides win)."""
    known = ARCHS + EXTRA_ARCHS + SEQ2SEQ_ARCHS
    if arch not in _CONFIGS or arch not in known:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {known}")
    cls_name, factory = _CONFIGS[arch]
    tok = tokenizer()
    kwargs = dict(
        factory(n_layers),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch in _SEQ2SEQ:
        kwargs["decoder_start_token_id"] = tok.pad_token_id
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(arch: str, *, seed: int = 0, n_layers: int = DEFAULT_LAYERS, **overrides: Any) -> LoadedModel:
    """A fresh, deterministically initialised tiny ``arch`` model wrapped for lmpatch."""
    cfg = tiny_config(arch, n_layers=n_layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
        model = auto.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return wrap_model(model, tokenizer(), name=f"tiny-{arch}")


def save_tiny(path, arch: str = "llama"):
    """A tiny random ``arch`` model with the SmolLM2 tokenizer, saved as a local model
    directory at ``path`` (what the CLI and worker processes load by path)."""
    m = tiny_model(arch)
    m.model.save_pretrained(path)
    m.tokenizer.save_pretrained(path)
    return path
