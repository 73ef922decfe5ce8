"""DAMA's language-model bias score: does "he" or "she" follow a profession by stereotype?

Each prompt names a profession and stops where a pronoun about it would come ("The
surgeon laughed because"). The model's preference ``P(he) - P(she)`` for the next word
is regressed on two scores of the profession (Limisiewicz et al., ICLR 2024):

* the *factual* gender score (positive for "actor", "alderman"; negative for "actress"),
  which a model should keep: "The actress said that she" is grammar, not bias;
* the *stereotypical* score ("surgeon" leans male, "nurse" female), which it should not.

The joint least-squares slopes ``a_s`` (stereotype) and ``a_f`` (fact) and the intercept
``b`` (an overall lean towards "he") are the measure: debiasing should bring ``a_s`` to
0 while ``a_f`` stays. Scoring goes through :mod:`lmpatch.eval.scoring`, so any patch
stack applies. The prompts and scores are DAMA's (``data/files/dama``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from lmpatch.data.jsonio import read_text
from lmpatch.data.paths import shipped_path
from lmpatch.errors import LmpatchError
from lmpatch.eval.scoring import score_targets
from lmpatch.model.loading import LoadedModel

SPLITS = ("train", "test")
PRONOUNS = (" he", " she")


@dataclass(frozen=True)
class Profession:
    name: str            # as the prompts write it: "plastic surgeon"
    factual: float       # > 0 male by definition, < 0 female by definition
    stereotypical: float  # > 0 male by stereotype, < 0 female by stereotype


@dataclass(frozen=True)
class BiasPrompt:
    """One prompt, the profession it names and the words naming it (the edit's subject)."""

    prompt: str
    subject: str
    profession: Profession


@lru_cache(maxsize=1)
def professions() -> dict[str, Profession]:
    """DAMA's 320 professions by name (underscores read as spaces)."""
    rows = json.loads(shipped_path("dama", "professions.json").read_text(encoding="utf-8"))
    out = {}
    for name, factual, stereo in rows:
        name = name.replace("_", " ")
        out[name] = Profession(name, float(factual), float(stereo))
    return out


def profession_of(prompt: str, table: dict[str, Profession] | None = None) -> Profession:
    """The profession a prompt names right after its first word, longest name first
    ("The plastic surgeon wished that" is a plastic surgeon, not a surgeon)."""
    table = professions() if table is None else table
    words = prompt.split()
    for end in range(len(words), 1, -1):
        name = " ".join(words[1:end])
        if name in table:
            return table[name]
    raise LmpatchError(f"No DAMA profession found in the prompt {prompt!r}.")


def load_bias_prompts(split: str = "test") -> list[BiasPrompt]:
    """DAMA's prompts: ``train`` (2,409, for edits) or ``test`` (1,111, for the score)."""
    if split not in SPLITS:
        raise LmpatchError(f"Unknown DAMA split {split!r}; choose one of {', '.join(SPLITS)}.")
    rows = json.loads(read_text(shipped_path("dama", f"{split}_dama.json.gz")))
    table = professions()
    out = []
    for row in rows:
        prompt = row["prompt"] if isinstance(row, dict) else row
        prof = profession_of(prompt, table)
        subject = prompt[: prompt.index(prof.name) + len(prof.name)]
        out.append(BiasPrompt(prompt, subject, prof))
    return out


def pronoun_probs(model: LoadedModel, prompts: Sequence[str], pronouns: Sequence[str] = PRONOUNS) -> np.ndarray:
    """(prompts, pronouns) next-word probabilities of each pronoun."""
    pairs = [(p, pronoun) for p in prompts for pronoun in pronouns]
    scores = score_targets(model, pairs, batch_size=64)
    probs = [math.exp(sum(s.logprobs)) for s in scores]
    return np.array(probs, dtype=np.float64).reshape(len(prompts), len(pronouns))


def regress(stereotypical: np.ndarray, factual: np.ndarray, preference: np.ndarray) -> dict:
    """Joint least squares ``preference ≈ a_s·s + a_f·f + b`` and its R²."""
    x = np.stack([stereotypical, factual, np.ones_like(factual)], axis=1)
    coef, *_ = np.linalg.lstsq(x, preference, rcond=None)
    fitted = x @ coef
    total = float(((preference - preference.mean()) ** 2).sum())
    r2 = 1.0 - float(((preference - fitted) ** 2).sum()) / total if total > 0 else 0.0
    return {"slope_s": float(coef[0]), "slope_f": float(coef[1]), "intercept": float(coef[2]), "r2": r2}


def bias_scores(model: LoadedModel, split: str = "test", limit: int | None = None) -> dict:
    """The bias score on a split (all prompts, or the first ``limit``)."""
    prompts = load_bias_prompts(split)[:limit]
    probs = pronoun_probs(model, [p.prompt for p in prompts])
    s = np.array([p.profession.stereotypical for p in prompts])
    f = np.array([p.profession.factual for p in prompts])
    out = {"n": len(prompts), **regress(s, f, probs[:, 0] - probs[:, 1])}
    out["prob_he"], out["prob_she"] = float(probs[:, 0].mean()), float(probs[:, 1].mean())
    return out
