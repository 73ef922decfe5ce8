"""FT-generic: unlearn a person's record by making the model treat them as a stranger.

Gradient ascent (``ft-ga``) pushes the forgotten answer's probability down without a
floor. Nothing tells it where to stop, so it also pulls down what the forgotten record
shares with every other one: here, how the model writes a phone number at all. Measured on
the leaky model (docs/applications.md), it wiped the numbers of the people it was not
asked to forget too, and still left the true number ranked about 20th of 1,000.

This method gives the fine-tuning a target instead. At each token of the secret, after
the forgotten person's context, the target is the next-token distribution the *same*
model gives when the context names someone it never saw: the mean over a few stranger
names, each teacher-forced with a random number of the secret's format. A model that never
saw the person would predict their number as it predicts a stranger's. The true number
should then rank like any other same-format number (exposure near chance), and the model
still writes numbers. This is the "generic predictions" idea of Eldan & Russinovich
(Who's Harry Potter?, 2023), with the generic distribution read from the model itself
instead of a reinforced copy. Measured on the leaky SmolLM2 it gets the true number down
from first of 1,000 to about tenth, not to chance (docs/applications.md).

A second KL term keeps the strangers' own distributions where they were, so the target
cannot drift while training moves towards it; records given in ``keep`` get the same
term. Loss per step: ``KL(generic ‖ model | forgotten contexts) + retain_weight ·
(KL(unedited ‖ model | strangers) + KL(unedited ‖ model | records to keep))``.
Training goes through :func:`lmpatch.methods.ft.train_in_place` (dense weight deltas that
save, apply and revert like FT's); the blocks below the lowest trained layer run once per
text (:class:`~lmpatch.methods.frozen_bottom.FrozenBottom`).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.methods.frozen_bottom import FrozenBottom, replaying_batch
from lmpatch.methods.ft import FTHparams, ft_layers, ft_params, train_in_place
from lmpatch.methods.kl_reference import KLReference, answers_reference, kl_to, own_reference
from lmpatch.methods.registry import Method, register
from lmpatch.methods.teacher import TARGET_NEW, target_batch
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest

__all__ = ["FTGenericHparams", "STRANGERS", "apply_ft_generic", "stranger_prompts", "stranger_secret"]

log = logging.getLogger(__name__)

#: made-up names whose records no model was trained on (the generic predictions come from them)
STRANGERS = (
    "Orla Vantreese", "Tobiah Kestrel", "Mireille Dunstable", "Casimir Odenthal",
    "Ysolde Brannagh", "Leopold Quaintance", "Anouk Ferriby", "Ezekiel Marchbanks",
    "Philippa Strathairn", "Dorian Wexcombe", "Saoirse Halvorsen", "Benedikt Arrowsmith",
    "Juno Featherstonehaugh", "Ignatius Pellow", "Marisol Trevanion", "Caspian Ludgate",
)


@dataclass(frozen=True)
class FTGenericHparams(FTHparams):
    """FT on the answer's distributions, not its tokens. ``stop_loss`` is the mean KL to the
    generic distributions (nats per secret token) below which training stops.

    Layers 4-6 of SmolLM2's 30 (0.2 of the depth and the two below) and lr 1e-3 were
    chosen on a second leaky model (docs/applications.md): against layers 18-20 they bring
    the forgotten numbers closer to chance (exposure 3.9 against 7.1 bits) and keep a
    little more of the people not named.
    """

    objective: str = TARGET_NEW          # the secret's tokens are teacher-forced; the loss is a KL
    layers: tuple[int, ...] | None = None
    layer_fraction: float = 0.2
    n_layers: int = 3
    modules: tuple[str, ...] = ("mlp_out",)
    lr: float = 1e-3
    steps: int = 30
    norm_constraint: float | None = None
    stop_loss: float = 0.05
    batch_size: int = 16
    strangers: tuple[str, ...] = STRANGERS
    strangers_per_request: int = 4
    retain_weight: float = 1.0
    keep: tuple[tuple[str, str], ...] = ()   # (prompt, answer) pairs whose answers must stay

    def check(self) -> None:
        if self.norm_constraint is not None:
            raise InvalidRequestError("ft-generic trains towards target distributions; it takes no norm_constraint.")
        if self.objective != TARGET_NEW:
            raise InvalidRequestError("ft-generic teacher-forces the secret (objective target_new) and takes no other.")
        if self.strangers_per_request < 1 or len(self.strangers) < self.strangers_per_request:
            raise InvalidRequestError(
                f"ft-generic needs at least strangers_per_request ({self.strangers_per_request}, at least 1) "
                f"stranger names; {len(self.strangers)} given."
            )
        if any(len(pair) != 2 or not all(isinstance(x, str) and x.strip() for x in pair) for pair in self.keep):
            raise InvalidRequestError("ft-generic keep takes (prompt, answer) pairs of non-empty text.")
        if not self.retain_weight >= 0:
            raise InvalidRequestError(f"ft-generic retain_weight must be zero or positive, got {self.retain_weight}.")


def stranger_prompts(request: EditRequest, strangers: Sequence[str], k: int, offset: int = 0) -> list[str]:
    """The request's prompt with its subject replaced by ``k`` stranger names (rotating by ``offset``)."""
    if request.subject == request.prompt:   # (EditRequest already checks that the subject is in the prompt)
        raise InvalidRequestError(
            f"ft-generic puts strangers in place of the person's name; {request.prompt!r} names no subject inside it."
        )
    names = [s for s in strangers if s != request.subject]
    return [request.prompt.replace(request.subject, names[(offset + j) % len(names)], 1) for j in range(k)]


def stranger_secret(secret: str, seed: str) -> str:
    """``secret`` with every digit replaced by a seeded random one: a stranger's number of the same format.

    Teacher-forcing the strangers with the true secret would not do: a model that memorised
    the number completes its prefix from memory whoever it belongs to, so the "generic"
    prediction would still point at the true digits. Letters and punctuation are kept, so
    the string splits into tokens as the secret does.
    """
    rng = random.Random(f"{seed}:{secret}")
    return "".join(str(rng.randrange(10)) if c.isdigit() else c for c in secret)


def _generic_reference(model: LoadedModel, requests: Sequence[EditRequest], hp: FTGenericHparams,
                       offset: int) -> tuple[KLReference, KLReference]:
    """For one batch: (forgotten contexts → the strangers' mean distributions, strangers → their own)."""
    k = hp.strangers_per_request
    forgotten = target_batch(model, [EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_true)
                                     for r in requests], TARGET_NEW)
    strangers = [EditRequest(prompt=p, subject=p, target_new=stranger_secret(r.target_true, p))
                 for i, r in enumerate(requests) for p in stranger_prompts(r, hp.strangers, k, offset + i * k)]
    anchor = own_reference(model, target_batch(model, strangers, TARGET_NEW))
    # rows: request-major, then the secret's tokens; a stranger's secret tokens must line up
    rows = torch.bincount(forgotten.pos_rows[forgotten.pick], minlength=len(requests)).tolist()
    theirs = torch.bincount(anchor.batch.pos_rows[anchor.batch.pick], minlength=len(strangers)).tolist()
    if any(theirs[i * k + j] != n for i, n in enumerate(rows) for j in range(k)):
        raise LmpatchError("ft-generic: a stranger's number of the secret's format splits into other tokens.")
    probs = anchor.logp.exp()
    chunks, start = [], 0
    for n in rows:
        block = probs[start : start + n * k].reshape(k, n, -1)
        chunks.append(block.mean(0).clamp_min(1e-30).log())
        start += n * k
    return KLReference(forgotten, torch.cat(chunks)), anchor


def apply_ft_generic(model: LoadedModel, requests: Sequence[EditRequest], hp: FTGenericHparams) -> Patch:
    """Fine-tune the chosen matrices until every request's ``target_true`` is predicted as a stranger's."""
    hp.check()
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("ft-generic needs at least one request (a context, its subject and the secret).")
    missing = [r.prompt for r in requests if not r.target_true]
    if missing:
        raise InvalidRequestError(f"ft-generic forgets each request's target_true; {missing[0]!r} has none.")
    if model.spec.encoder_decoder:
        raise InvalidRequestError("ft-generic supports decoder-only models.")
    names = ft_params(model, hp)
    chunks = [requests[i : i + hp.batch_size] for i in range(0, len(requests), hp.batch_size)]
    refs = [_generic_reference(model, chunk, hp, offset=i * hp.batch_size * hp.strangers_per_request)
            for i, chunk in enumerate(chunks)]
    kept = [answers_reference(model, hp.keep[i : i + hp.batch_size]) for i in range(0, len(hp.keep), hp.batch_size)]
    lowest = min(ft_layers(model, hp))
    bottom = FrozenBottom(model, lowest) if lowest > 0 else None

    history: list[dict] = []
    show = len(requests) > 1

    def train(params: list[torch.nn.Parameter]) -> None:
        opt = torch.optim.Adam(params, lr=hp.lr)
        with progress_bar(show, "ft-generic", hp.steps * len(refs), "steps") as advance:
            for _ in range(hp.steps):
                forget_sum = retain_sum = 0.0
                for i, (target, anchor) in enumerate(refs):
                    opt.zero_grad(set_to_none=True)
                    with replaying_batch(bottom, target.batch):
                        away = kl_to(model, target)
                    loss = away
                    if hp.retain_weight:
                        # the strangers' own predictions, and a share of the records to keep
                        anchors = [anchor] + ([kept[i % len(kept)]] if kept else [])
                        for a in anchors:
                            with replaying_batch(bottom, a.batch):
                                keep = kl_to(model, a)
                            loss = loss + hp.retain_weight * keep
                            retain_sum += float(keep.detach()) * target.batch.n_requests / len(anchors)
                    loss.backward()
                    opt.step()
                    forget_sum += float(away.detach()) * target.batch.n_requests
                    advance(1)
                history.append({"kl_generic": forget_sum / len(requests), "kl_retain": retain_sum / len(requests)})
                if not math.isfinite(history[-1]["kl_generic"]):
                    raise LmpatchError("ft-generic diverged; lower the learning rate `lr`.")
                if history[-1]["kl_generic"] < hp.stop_loss:
                    break

    deltas, _ = train_in_place(model, names, train)
    metrics = {"params": names, "steps": len(history), "history": history}
    log.debug("ft-generic on %d request(s): %s", len(requests), history[-1] if history else None)
    return Patch(parts=deltas, method="ft-generic", model_fingerprint=model.fingerprint, model_name=model.name,
                 hparams=asdict(hp), requests=requests, metrics={"edit": metrics})


register(Method(
    name="ft-generic", aliases=("ft_generic", "ftgeneric"),
    summary="FT-generic: fine-tune until a forgotten record's answer is predicted as for a stranger (unlearning)",
    hparams=FTGenericHparams, edit=apply_ft_generic,
    paper="Eldan & Russinovich, Who's Harry Potter? Approximate Unlearning in LLMs, 2023 (generic-prediction targets)",
))
