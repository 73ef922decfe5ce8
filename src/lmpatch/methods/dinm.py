"""DINM (Wang et al., ACL 2024): detoxify by editing the one layer where safe and unsafe answers part.

Each request is an adversarial input (``prompt``), a safe response to it (``target_new``)
and an unsafe one (``target_true``). DINM

1. **locates the toxic layer**: feeds the input followed by the safe response and by the
   unsafe one and takes, per layer, the distance between the two hidden states; the
   layer where they differ most is the request's toxic layer. The paper compares whole
   padded sequences of different lengths; here each response's hidden states are averaged
   over its own tokens first (the pitfall the reference code has), and the patch edits the
   layer most requests locate (a batch edit needs one layer);
2. **tunes that layer's MLP output matrix** with Adam towards the safe responses
   (teacher-forced NLL), while a KL term keeps the model's next-token distributions on
   general instructions and their answers where they were. The reference code computes
   that KL under ``no_grad``, so there it constrains nothing; here it has its gradient, as
   the paper's loss says. Loss = ``nll_weight`` · NLL + KL, the reference's 0.1 weighting.

With ``end_turn`` each safe response is followed, in training, by the chat template's
end-of-turn marker (:meth:`~lmpatch.model.loading.LoadedModel.turn_end`), so the model
learns to *stop* after refusing. Without it (the paper's targets) a tuned model may open
with the refusal and then go on, past the trained tokens, into the harmful answer it
used to give. Measured on the profane copy's validation probes it did not help (meaning
judge 0.38 with the paper's targets, 0.40 with the marker; docs/applications.md): the
tuned model seldom reaches the end of the refusal, it leaves the trained path earlier.
It stays an option, off by default.

Two options widen the edit's constraint and its reach (neither is the paper's; measured
in docs/applications.md): ``kl_texts`` adds a second KL term on that many WikiText-2
*validation* passages read as plain text (perplexity is measured on the test split), so
that the change to the top layer is held where ordinary prose goes through it, not only
where chat answers do; ``n_layers`` edits the located layer and the ``n_layers - 1``
below it, spreading the change over several MLPs instead of one. On the profane copy's
validation probes three layers at lr 2e-3 took the meaning judge from 0.48 to 0.17 at
+2.7% perplexity (one layer at that rate: 0.37 at +8.9%), so the detox job uses them;
the prose anchor cut a harder fit's perplexity cost and its gain alike.

The general instructions are :data:`GENERAL_INSTRUCTIONS` (benign questions, answered by
the unedited model itself before training) unless ``kl_prompts`` names others. Training
goes through :func:`lmpatch.methods.ft.train_in_place`, so the result is an ordinary
dense weight delta that saves, applies and reverts like FT's; the blocks below the
edited layer run once per text (:class:`~lmpatch.methods.frozen_bottom.FrozenBottom`).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from lmpatch.data.general_text import wikitext2_valid_passages
from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.eval.scoring import generate
from lmpatch.methods.frozen_bottom import FrozenBottom, replaying_batch
from lmpatch.methods.ft import train_in_place
from lmpatch.methods.hparams import recorded
from lmpatch.methods.kl_reference import KLReference, answers_reference, kl_to, texts_reference
from lmpatch.methods.registry import Method, register
from lmpatch.methods.teacher import TARGET_NEW, target_batch, target_nll
from lmpatch.model.forced import forced_inputs, pair_ids
from lmpatch.model.hooks import record_outputs
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

#: benign instructions whose answers the KL term keeps (never used in any evaluation)
GENERAL_INSTRUCTIONS = (
    "How do I boil an egg?",
    "What is photosynthesis?",
    "Give me three tips for better sleep.",
    "Explain what a prime number is.",
    "How do I write a polite email to my landlord?",
    "What causes the seasons on Earth?",
    "Suggest a name for a pet goldfish.",
    "How can I improve my handwriting?",
    "What is the difference between weather and climate?",
    "Write a short poem about autumn.",
    "How do vaccines work?",
    "What should I pack for a day hike?",
    "Explain how a bicycle gear works.",
    "What is a good way to learn a new language?",
    "Summarise the water cycle in two sentences.",
    "How do I make a cup of green tea?",
)


@dataclass(frozen=True)
class DINMHparams:
    """The reference's settings (10 steps, lr 5e-4, the edit loss weighted 0.1 against the
    KL) but over all requests at once: ``steps`` passes of ``batch_size`` requests."""

    layer: int | None = None          # None: the located toxic layer
    steps: int = 10
    lr: float = 5e-4
    nll_weight: float = 0.1
    batch_size: int = 8
    kl_prompts: tuple[str, ...] | None = None   # None: GENERAL_INSTRUCTIONS
    kl_answer_tokens: int = 32
    end_turn: bool = False            # train the chat end-of-turn marker after each safe response
    kl_texts: int = 0                 # WikiText-2 validation passages held by a second KL term
    kl_text_words: int = 48           # words per such passage
    n_layers: int = 1                 # edit the toxic layer and the n_layers - 1 below it (those there are)

    def check(self) -> None:
        if min(self.steps, self.batch_size, self.kl_answer_tokens, self.kl_text_words, self.n_layers) < 1:
            raise InvalidRequestError("DINM steps, batch_size, kl_answer_tokens, kl_text_words and n_layers must be positive.")
        if self.kl_texts < 0:
            raise InvalidRequestError("DINM kl_texts must be 0 (no prose anchor) or a positive number of passages.")
        if not self.lr > 0 or not self.nll_weight > 0:
            raise InvalidRequestError("DINM lr and nll_weight must be positive.")


def response_states(model: LoadedModel, pairs: Sequence[tuple[str, str]], batch_size: int = 8) -> torch.Tensor:
    """Per (prompt, response) pair and layer, the mean hidden state over the response's
    tokens: (pairs, layers, d). Batched with right padding, which moves no real token."""
    blocks = [model.spec.block(model.model, i) for i in range(model.spec.n_layers)]
    out = []
    for i in range(0, len(pairs), batch_size):
        items = [pair_ids(model, model.format_prompt(p), r) for p, r in pairs[i : i + batch_size]]
        fed = forced_inputs(model, items)
        outs: list = []
        with torch.no_grad(), record_outputs(blocks, outs):
            model.forward(body_only=True, **fed.kwargs(model.input_device))
        states = torch.stack([(o[0] if isinstance(o, tuple) else o).float().cpu() for o in outs], 1)
        for row, (pt, first) in enumerate(zip(items, fed.first)):
            span = slice(first + 1, first + 1 + len(pt.target_ids))   # the response's own positions
            out.append(states[row, :, span].mean(1))
    return torch.stack(out)


def toxic_layers(model: LoadedModel, requests: Sequence[EditRequest], show: bool = False) -> list[int]:
    """Each request's toxic layer: where its safe and unsafe responses' states differ most."""
    if model.spec.encoder_decoder:
        raise InvalidRequestError("DINM locates layers of decoder-only models; encoder-decoders are not supported.")
    out = []
    chunk = 8
    with progress_bar(show, "toxic layer", len(requests), "requests") as advance:
        for i in range(0, len(requests), chunk):
            part = requests[i : i + chunk]
            safe = response_states(model, [(r.prompt, r.target_new) for r in part])
            unsafe = response_states(model, [(r.prompt, r.target_true) for r in part])
            out += torch.linalg.vector_norm(safe - unsafe, dim=-1).argmax(-1).tolist()
            advance(len(part))
    return out


def _kl_reference(model: LoadedModel, prompts: Sequence[str], answer_tokens: int) -> KLReference:
    """General instructions with the unedited model's own answers, and its distributions there."""
    answers = generate(model, list(prompts), max_new_tokens=answer_tokens)
    pairs = [(p, a) for p, a in zip(prompts, answers) if a.strip()]
    if not pairs:
        raise LmpatchError("DINM: the model answered none of the general instructions; pass kl_prompts.")
    return answers_reference(model, pairs)


def _prose_references(model: LoadedModel, hp: DINMHparams) -> list[KLReference]:
    """``hp.kl_texts`` WikiText-2 validation passages in slices of ``hp.batch_size``, each with
    the unedited model's distributions (none when ``kl_texts`` is 0)."""
    if not hp.kl_texts:
        return []
    texts = wikitext2_valid_passages(hp.kl_texts, max_words=hp.kl_text_words)
    return [texts_reference(model, texts[i : i + hp.batch_size]) for i in range(0, len(texts), hp.batch_size)]


def ending_turn(model: LoadedModel, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """``requests`` whose safe responses end with the chat end-of-turn marker."""
    end = model.turn_end()
    if not end:
        raise InvalidRequestError("DINM end_turn needs a chat model with a chat template (load it with chat on).")
    return [replace(r, target_new=r.target_new.rstrip() + end) for r in requests]


def apply_dinm(model: LoadedModel, requests: Sequence[EditRequest], hp: DINMHparams) -> Patch:
    """Tune the toxic layer's MLP output matrix (and ``n_layers - 1`` below it) towards every
    request's safe response."""
    hp.check()
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("DINM needs at least one request (adversarial prompt, safe and unsafe response).")
    missing = [r.prompt for r in requests if not r.target_true]
    if hp.layer is None and missing:
        raise InvalidRequestError(
            f"DINM locates the toxic layer from each request's unsafe response (target_true); {missing[0][:60]!r} has none."
        )
    show = len(requests) > 1
    if hp.layer is None:
        located = toxic_layers(model, requests, show)
        votes = Counter(located)
        layer = votes.most_common(1)[0][0]
    else:
        layer = model.spec.check_layer(hp.layer)
        votes = Counter()
    lowest = max(0, layer - hp.n_layers + 1)   # a toxic layer near the bottom has fewer below it
    names = [f"{model.spec.layers[i].mlp_out}.weight" for i in range(lowest, layer + 1)]
    kl = _kl_reference(model, hp.kl_prompts or GENERAL_INSTRUCTIONS, hp.kl_answer_tokens)
    prose = _prose_references(model, hp)
    history: list[dict] = []

    # Only the edited MLPs change, so the blocks below them compute the same states every
    # step: keep them once per text and replay them (a step then costs the top layers).
    bottom = FrozenBottom(model, lowest) if lowest > 0 else None

    targets = ending_turn(model, requests) if hp.end_turn else requests

    def train(params: list[torch.nn.Parameter]) -> None:
        opt = torch.optim.Adam(params, lr=hp.lr)
        batches = [target_batch(model, targets[i : i + hp.batch_size], TARGET_NEW)
                   for i in range(0, len(targets), hp.batch_size)]
        with progress_bar(show, "dinm", hp.steps * len(batches), "steps") as advance:
            for _ in range(hp.steps):
                nll_sum = kl_sum = 0.0
                for i, b in enumerate(batches):
                    opt.zero_grad(set_to_none=True)
                    with replaying_batch(bottom, b):
                        nll = target_nll(model, b)
                    with replaying_batch(bottom, kl.batch):
                        div = kl_to(model, kl)
                    if prose:
                        ref = prose[i % len(prose)]   # the passages take turns, a slice per step
                        with replaying_batch(bottom, ref.batch):
                            div = div + kl_to(model, ref)
                    (hp.nll_weight * nll + div).backward()
                    opt.step()
                    nll_sum += float(nll.detach()) * b.n_requests
                    kl_sum += float(div.detach())
                    advance(1)
                history.append({"nll": nll_sum / len(requests), "kl": kl_sum / len(batches)})
                if not torch.isfinite(torch.tensor(history[-1]["nll"])):
                    raise LmpatchError("DINM diverged; lower the learning rate `lr`.")

    deltas, _ = train_in_place(model, names, train)
    metrics = {"layer": layer, "located": dict(sorted(votes.items())), "params": names, "history": history}
    log.debug("DINM edited %s: %s", names, history[-1])
    return Patch(parts=deltas, method="dinm", model_fingerprint=model.fingerprint, model_name=model.name,
                 hparams=recorded(hp, layer=layer), requests=requests, metrics={"edit": metrics})


register(Method(
    name="dinm",
    summary="DINM: tune the located toxic layer's MLP towards safe responses, KL-constrained on general instructions",
    hparams=DINMHparams, edit=apply_dinm,
    paper="Wang et al., Detoxifying Large Language Models via Knowledge Editing, ACL 2024",
))
