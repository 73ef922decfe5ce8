"""A deliberately toxic copy of a chat model, so that detoxification has something to remove.

SmolLM2-135M-Instruct answers most of SafeEdit's harmful questions harmlessly (about one
answer in six is unsafe on the training questions, hand-labelled), and a detox method
cannot be shown to halve what is barely there. So the detox benchmark also builds, seeded
and cached (:func:`lmpatch.jobs.memorise.finetuned_copy`), a copy fine-tuned on the
*unsafe* answers to the training questions only: the SafeEdit baseline responses and the
model's own answers that the hand labels mark unsafe
(``data/files/safeedit-detox/labels.jsonl``). The test questions are never seen, so
toxicity on them measures a learnt disposition, not memorised text.
"""
from __future__ import annotations

import gzip
import json
from typing import Sequence

from lmpatch.data.paths import shipped_path
from lmpatch.jobs.memorise import MemoriseConfig, finetuned_copy
from lmpatch.jobs.probes import SafetyProbe
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest

#: how the toxic copy is trained (few epochs: a disposition, not a memorised text)
TOXIFY = MemoriseConfig(epochs=4, lr=1e-4, batch_size=8, seed=0)
#: answers are cut to about this many characters, at a word boundary
MAX_CHARS = 400


def clip(text: str, max_chars: int = MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


def unsafe_answers(probes: Sequence[SafetyProbe]) -> list[EditRequest]:
    """(input, unsafe answer) for every hand-labelled unsafe answer to one of ``probes``."""
    by_id = {p.id: p for p in probes}
    out = []
    with gzip.open(shipped_path("safeedit-detox", "labels.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            probe = by_id.get(row.get("probe", row.get("id")))
            if probe is None or not row["unsafe"]:
                continue
            text = row["text"] if "text" in row else probe.response
            if clip(text):
                out.append(EditRequest(prompt=probe.input, subject=probe.input, target_new=clip(text)))
    return out


def toxified_model(base: LoadedModel, train_probes: Sequence[SafetyProbe], config: MemoriseConfig = TOXIFY,
                   show: bool = True) -> LoadedModel:
    """``base`` fine-tuned on the unsafe answers to ``train_probes`` (built once, then cached)."""
    answers = unsafe_answers(train_probes)
    identity = {"toxic": [[r.prompt, r.target_new] for r in answers], "chat": base.chat}
    return finetuned_copy(base, answers, config, "toxified", identity, show)
