"""Random context prefixes that make keys and values robust to what precedes a fact.

The reference code samples these from the model once per process and keeps them in a
global, so two runs edit with different prefixes. Here they are sampled with a fixed
seed and stored on disk keyed by model fingerprint and settings: the same model and
settings always edit with the same prefixes, across processes and machines.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmpatch.fileio import atomic_write_json
from lmpatch.model.loading import LoadedModel, cache_dir
from lmpatch.tokens import pad_left

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class TemplateConfig:
    """``lengths`` lists (tokens generated, how many prefixes) pairs, as in the papers."""

    lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    seed: int = 0
    top_k: int = 5

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "|" + "|".join(SEED_WORDS)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def context_templates(model: LoadedModel, config: TemplateConfig = TemplateConfig()) -> list[str]:
    """``["{}", "<prefix>. {}", ...]``: the bare prompt first, then the sampled prefixes."""
    path = template_file(model, config)
    if path.is_file():
        return json.loads(path.read_text())
    templates = ["{}"] + [_as_template(t) for t in _sample_prefixes(model, config)]
    atomic_write_json(path, templates, indent=0)
    return templates


def _as_template(text: str) -> str:
    # Braces in sampled text would be read as format fields.
    return text.replace("{", " ").replace("}", " ").strip() + ". {}"


@torch.inference_mode()
def _sample_prefixes(model: LoadedModel, config: TemplateConfig) -> list[str]:
    tok = model.tokenizer
    out: list[str] = []
    for length, count in config.lengths:
        if count <= 0:
            continue
        starts = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(count)]
        ids, mask = pad_left([tok(s)["input_ids"] for s in starts], tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + length)
            gen = model.generate(
                input_ids=ids.to(model.input_device),
                attention_mask=mask.to(model.input_device),
                do_sample=True,
                top_k=config.top_k,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tok.pad_token_id,
            )
        # Pads are special tokens, so decoding whole rows drops them.
        out.extend(tok.decode(row, skip_special_tokens=True) for row in gen)
    return [" ".join(t.split()) for t in out]


def template_file(model: LoadedModel, config: TemplateConfig = TemplateConfig()) -> Path:
    """Where the templates for ``model`` and ``config`` are cached (for inspection)."""
    return cache_dir() / "templates" / f"{model.fingerprint}-{config.key()}.json"
