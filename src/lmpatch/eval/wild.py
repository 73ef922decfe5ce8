"""Generation-based ("in the wild") edit metrics: ask the question, read the answer.

Teacher-forced token accuracy, the usual reliability metric, feeds the target to the
model and checks each next-token argmax. That leaks both the content and the length of
the answer: a model whose first answer token is right but which would go on to say
something else, or never stop, still scores high, so the protocol overstates how well
an edit works when the model is actually used. Yang et al. 2025, "The Mirage of Model
Editing: Revisiting Evaluation in the Wild" (ACL 2025; arXiv:2502.11177, with the QAEdit
benchmark), measure edits the way a user meets them instead, and find far lower numbers
(38.5% vs 96.8% in their single-edit experiments). This module holds that protocol (the exact-match
variant of their WILD evaluation; their main tables use an LLM judge instead):

* the question/prompt alone is fed to the model (no target prefix; chat-wrapped when the
  model is, through :meth:`LoadedModel.format_prompt`);
* greedy decoding of at most :data:`WILD_MAX_TOKENS` new tokens, ending at end of
  sequence or as soon as the text contains one of :data:`WILD_STOPS`;
* the answer is the text before the first stop string (:func:`cut`), SQuAD-normalised
  (:func:`normalize`);
* it is correct when it equals the normalised target; for locality, when it equals the
  unedited model's normalised answer to the same prompt.

Consequences worth knowing: a target containing "." ("St. Louis") can never match, since
the answer is cut at the first "."; an answer that starts with a newline is empty and
matches nothing (but two empty answers count as the same answer for locality).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Sequence

from lmpatch.eval.scoring import decode_rows, generate_ids
from lmpatch.model.loading import LoadedModel
from lmpatch.model.stops import cut_at

WILD_MAX_TOKENS = 50
WILD_STOPS: tuple[str, ...] = (".", "\n")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass
class WildGenerations:
    """One pass's raw greedy continuations for one request, kept so a reader can audit them.

    ``prompt`` answers the edit prompt (None until generated), ``rephrase`` each rephrase
    and ``locality`` each plain neighbourhood probe, in the request's order. Texts are as
    decoded, before :func:`cut`.
    """

    prompt: str | None = None
    rephrase: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)


def cut(text: str) -> str:
    """The answer part of a continuation: everything before the first stop string."""
    return cut_at(text, WILD_STOPS)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop punctuation and articles, collapse spaces.

    (:func:`lmpatch.eval.multihop.normalize_answer` differs: it turns punctuation into
    spaces, so "U.S." is "u s" there and "us" here, and it applies NFKC and casefolding.)
    """
    text = text.lower().translate(_NO_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer(continuation: str) -> str:
    """The normalised answer a continuation gives."""
    return normalize(cut(continuation))


def matches_target(continuation: str, target: str) -> bool:
    """Exact match of the answer with ``target`` (a target that normalises to nothing never matches)."""
    wanted = normalize(target)
    return bool(wanted) and answer(continuation) == wanted


def same_answer(post: str, pre: str) -> bool:
    """Locality: the edited model's answer equals the unedited model's."""
    return answer(post) == answer(pre)


def generate_raw(model: LoadedModel, prompts: Sequence[str], batch_size: int = 16) -> list[str]:
    """Raw continuations under the protocol (stopped early, not yet cut), one per prompt."""
    ids = generate_ids(model, prompts, max_new_tokens=WILD_MAX_TOKENS, batch_size=batch_size, stop_texts=WILD_STOPS)
    return decode_rows(model, ids)
