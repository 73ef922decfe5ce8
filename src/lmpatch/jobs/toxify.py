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

from typing import Sequence

from lmpatch.eval.toxicity import labelled_responses
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
    return [EditRequest(prompt=by_id[lab.probe_id].input, subject=by_id[lab.probe_id].input, target_new=clip(lab.text))
            for lab in labelled_responses() if lab.unsafe and lab.probe_id in by_id and clip(lab.text)]


def toxified_model(base: LoadedModel, train_probes: Sequence[SafetyProbe], config: MemoriseConfig = TOXIFY,
                   show: bool = True) -> LoadedModel:
    """``base`` fine-tuned on the unsafe answers to ``train_probes`` (built once, then cached)."""
    answers = unsafe_answers(train_probes)
    identity = {"toxic": [[r.prompt, r.target_new] for r in answers], "chat": base.chat}
    return finetuned_copy(base, answers, config, "toxified", identity, show)
