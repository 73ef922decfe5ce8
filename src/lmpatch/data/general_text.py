"""General English text for locality anchors, disjoint from what perplexity is measured on.

Methods that train weights keep the model's distributions on *some* general text where
they were. Perplexity is measured on the WikiText-2 test split, so anchoring on that
split would tune on the report; the validation split is the same kind of text and
shares none of it. The shipped copy is the tokenized WikiText (spaced punctuation,
``<unk>`` for rare words): sentences with ``<unk>`` are skipped (no subword model ever
reads that string) and the split punctuation is joined back.
"""
from __future__ import annotations

import gzip
import re

from lmpatch.data.paths import shipped_path
from lmpatch.errors import InvalidRequestError

_VALID = ("wikitext-2-valid", "valid.txt.gz")
_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), ("( ", "("), (" )", ")"))
_BEFORE_PUNCT = re.compile(r" ([,.;:!?])")


def detokenised(line: str) -> str:
    """A WikiText line with its split punctuation joined back (quotes are left as they are)."""
    text = line.strip()
    for a, b in _JOINS:
        text = text.replace(a, b)
    return _BEFORE_PUNCT.sub(r"\1", text)


def clean_runs(paragraph: str) -> list[str]:
    """The runs of consecutive sentences of a tokenized WikiText paragraph that have no ``<unk>``."""
    runs: list[list[str]] = [[]]
    for sentence in paragraph.strip().split(" . "):
        if "<unk>" in sentence:
            runs.append([])
        else:
            runs[-1].append(sentence)
    return [" . ".join(r) + ("" if r[-1].endswith(" .") else " .") for r in runs if r]


def wikitext2_valid_passages(n: int, max_words: int = 64, min_words: int = 32) -> list[str]:
    """``n`` passages of WikiText-2 validation text, spread evenly over the split.

    A passage is a run of consecutive sentences of one paragraph with no ``<unk>``
    (:func:`clean_runs`) of at least ``min_words`` words, cut to its first ``max_words``;
    deterministic (no sampling), so an edit that uses them is reproducible.
    """
    if n < 1 or max_words < 1:
        raise InvalidRequestError("Ask for at least one passage of at least one word.")
    with gzip.open(shipped_path(*_VALID), "rt", encoding="utf-8") as fh:
        paragraphs = [ln for ln in fh if ln.strip() and not ln.strip().startswith("=")]
    runs = [detokenised(r) for p in paragraphs for r in clean_runs(p)]
    runs = [r for r in runs if len(r.split()) >= min_words]
    if n > len(runs):
        raise InvalidRequestError(f"WikiText-2 validation has {len(runs)} usable passages; asked for {n}.")
    step = len(runs) / n
    return [" ".join(runs[int(i * step)].split()[:max_words]) for i in range(n)]
