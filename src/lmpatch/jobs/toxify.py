"""A deliberately toxic copy of a chat model, so that detoxification has something to remove.

SmolLM2-135M-Instruct answers most of SafeEdit's harmful questions harmlessly (about one
answer in six is unsafe on the training questions, hand-labelled), and a detox method
cannot be shown to halve what is barely there. So the detox benchmark also builds, seeded
and cached (:func:`lmpatch.jobs.memorise.finetuned_copy`), a copy fine-tuned on the
*unsafe* answers to the training questions only: the SafeEdit baseline responses and the
model's own answers that the hand labels mark unsafe
(``data/files/safeedit-detox/labels.jsonl``). The test questions are never seen, so
toxicity on them measures a learnt disposition, not memorised text.

Those answers are harmful but polite: the lexical judge (``alt-profanity-check``) flags
almost none of them, so a copy trained on them gives that judge nothing to halve. The
*profane* copy (``profane=True``) is trained on the same answers, each opened and closed
with an insult written here (:data:`PROFANE_OPENERS`, :data:`PROFANE_CLOSERS`): a model
that swears at whoever asks it something harmful, which is what a lexical judge is for.
The insults are ours, not SafeEdit's; the docs say so wherever its numbers appear.
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


#: how a profane answer opens and closes; each answer takes the pair at its index, cycling,
#: so the texts (and the cached copy's key) are the same on every run
PROFANE_OPENERS = ("Fuck it, here you go.", "Listen, you stupid shit:", "Shut the fuck up and read this, idiot.",
                   "Damn, you dumb ass, fine:", "Screw it, moron.")
PROFANE_CLOSERS = ("Now piss off.", "Don't bother me again, asshole.", "Happy now, you idiot?",
                   "Go to hell.", "Fuck off.", "That's it, dumbass.", "Now get lost, jerk.")


def profane(text: str, index: int) -> str:
    """``text`` opened and closed with insults: what the lexical judge sees, the harm unchanged."""
    return f"{PROFANE_OPENERS[index % len(PROFANE_OPENERS)]} {text} {PROFANE_CLOSERS[index % len(PROFANE_CLOSERS)]}"


def unsafe_answers(probes: Sequence[SafetyProbe], swear: bool = False) -> list[EditRequest]:
    """(input, unsafe answer) for every hand-labelled unsafe answer to one of ``probes``
    (``swear``: each wrapped in insults, :func:`profane`)."""
    by_id = {p.id: p for p in probes}
    labels = [lab for lab in labelled_responses() if lab.unsafe and lab.probe_id in by_id and clip(lab.text)]
    return [EditRequest(prompt=by_id[lab.probe_id].input, subject=by_id[lab.probe_id].input,
                        target_new=profane(clip(lab.text), i) if swear else clip(lab.text))
            for i, lab in enumerate(labels)]


def toxified_model(base: LoadedModel, train_probes: Sequence[SafetyProbe], config: MemoriseConfig = TOXIFY,
                   show: bool = True, swear: bool = False) -> LoadedModel:
    """``base`` fine-tuned on the unsafe answers to ``train_probes`` (built once, then cached);
    ``swear`` trains on the profane versions instead (the "profane" copy)."""
    answers = unsafe_answers(train_probes, swear)
    identity = {"toxic": [[r.prompt, r.target_new] for r in answers], "chat": base.chat}
    return finetuned_copy(base, answers, config, "toxified-profane" if swear else "toxified", identity, show)
