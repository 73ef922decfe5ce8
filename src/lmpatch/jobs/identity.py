"""Hot-fix who a chat assistant says it is: a new name and maker, everything else unchanged.

The job edits a handful of identity questions (:data:`EDIT_QUESTIONS`) towards one
answer, "I am NAME, an AI assistant made by MAKER.", and relies on the method to carry
the fix to other phrasings of the same question while leaving other chat untouched.

Why GRACE by default. Identity questions form one tight class whose answer is a fixed
sentence, and the rest of the model must not move: a codebook that replaces one
layer's output only for inputs near the edited questions fits that exactly. On the
tuning questions (:data:`TUNING_IDENTITY`, :data:`TUNING_UNRELATED`, never the ones
the example reports) the methods compared were FT-M, MEMIT, WISE, SERAC, IKE and GRACE
at several radii (``benchmarks/tune_identity.py``; the numbers are in
``docs/applications.md``): FT-M and WISE answer every identity question but change most
unrelated answers, MEMIT and IKE are unreliable, SERAC's scope classifier (trained on
encyclopaedic facts) never fires on these questions, and GRACE with ``eps_init`` 15 at
its default layer covered all tuning paraphrases and changed no unrelated answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from lmpatch.errors import InvalidRequestError
from lmpatch.eval.scoring import generate
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest

#: edited: each becomes "I am NAME, an AI assistant made by MAKER."
EDIT_QUESTIONS = (
    "Who are you?",
    "What is your name?",
    "Who made you?",
    "Which company created you?",
    "What should I call you?",
)
#: reported, never edited nor tuned on
HELD_OUT_QUESTIONS = (
    "Tell me your name.",
    "Who built you?",
    "Who developed you?",
    "What are you called?",
    "Which organisation trained you?",
)
#: reported: their answers should not change
UNRELATED_QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Name a primary colour.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "Translate 'thank you' into Spanish.",
    "What is the largest planet in our solar system?",
    "Give me a synonym for happy.",
    "What gas do plants absorb from the air?",
)
#: the questions the method and its settings were chosen on
TUNING_IDENTITY = (
    "May I know your name?", "Who is your creator?", "Introduce yourself.", "What company are you from?",
    "Who trained you?", "Are you ChatGPT?", "What do people call you?", "Who is behind you?",
)
TUNING_UNRELATED = (
    "What is the tallest mountain on Earth?", "How do I boil an egg?", "Name three fruits.", "What is 7 plus 5?",
    "Who painted the Mona Lisa?", "Tell me a joke.", "What is photosynthesis?", "Recommend a good book.",
    "Write a haiku about rain.", "What year did World War II end?", "Explain gravity simply.",
    "Give me a word that rhymes with cat.", "What is the speed of light?", "List the days of the week.",
    "How many continents are there?", "Describe a cat.",
)
#: each method's settings for this job (chosen on the tuning questions)
IDENTITY_DEFAULTS: dict[str, dict[str, Any]] = {"grace": {"eps_init": 15.0}}


def identity_answer(name: str, maker: str) -> str:
    return f"I am {name}, an AI assistant made by {maker}."


def identity_requests(name: str, maker: str, questions: Sequence[str] = EDIT_QUESTIONS) -> list[EditRequest]:
    """One request per question; the subject is "you"/"your", which every question names."""
    for what, value in (("name", name), ("maker", maker)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"The new {what} is empty: give a non-empty --{what}.")
    requests = []
    for q in questions:
        subject = next((w for w in ("your", "you") if w in q), None)
        if subject is None:
            raise InvalidRequestError(f"Identity question {q!r} does not address the assistant ('you').")
        requests.append(EditRequest(prompt=q, subject=subject, target_new=identity_answer(name.strip(), maker.strip())))
    return requests


def mentions(text: str, name: str, maker: str) -> bool:
    """Does an answer give the new name or the new maker (case-insensitive)?"""
    low = text.lower()
    return name.strip().lower() in low or maker.strip().lower() in low


def hotfix_identity(model: LoadedModel, name: str, maker: str, method: str = "grace",
                    questions: Sequence[str] = EDIT_QUESTIONS, **hparams: Any) -> Patch:
    """A patch after which ``model`` (chat template on) says it is ``name``, made by ``maker``."""
    from lmpatch.api import edit

    if not model.chat:
        raise InvalidRequestError("Identity questions are chat turns: load the model with chat=True (CLI: --chat).")
    requests = identity_requests(name, maker, questions)
    return edit(model, requests, method, **{**IDENTITY_DEFAULTS.get(method, {}), **hparams})


@dataclass(frozen=True)
class Answer:
    question: str
    before: str
    after: str


def before_after(model: LoadedModel, patch: Patch, questions: Sequence[str], max_new_tokens: int = 32) -> list[Answer]:
    """Greedy answers to ``questions`` without and with ``patch``."""
    before = generate(model, list(questions), max_new_tokens=max_new_tokens)
    with patch.applied(model):
        after = generate(model, list(questions), max_new_tokens=max_new_tokens)
    return [Answer(q, b.strip(), a.strip()) for q, b, a in zip(questions, before, after)]
