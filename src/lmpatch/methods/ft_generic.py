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
saw the person would predict their number as it predicts a stranger's, and still write
numbers. This is the "generic predictions" idea of Eldan & Russinovich (Who's Harry
Potter?, 2023), with the generic distribution read from the model itself instead of a
reinforced copy.

That alone left the true number ranked about tenth of 1,000 (docs/applications.md). The
strangers' mixture is flatter than any one stranger's prediction, so the secret's digits,
matched to the mixture, kept scoring above random same-format numbers, which the model
scores on prefixes of their own. So the secret's own token is given a target of its own:
the median log-probability the model, as it is at that step, gives a random candidate's
token at the same position in the person's context (``candidates_per_request`` numbers,
read without gradient). The mixture keeps its shape over the other tokens. Exposure ranks
the secret among exactly such candidates, so this is what "at chance" asks.

Loss per step: ``KL(target ‖ model | forgotten contexts) + true_weight ·
(log p(secret token) - candidates' median)² + retain_weight · (KL(unedited ‖ model |
strangers) + KL(unedited ‖ model | records to keep))``. The retain terms keep the
strangers' own distributions where they were, so the target cannot drift while training
moves towards it, and the records given in ``keep`` too. Each step anchors one of each
request's strangers, in turn: anchoring all of them every step made the strangers four
fifths of the work of a step.

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
from lmpatch.methods.kl_reference import KLReference, answers_reference, kl_from, kl_to, own_reference
from lmpatch.methods.registry import Method, register
from lmpatch.methods.teacher import TARGET_NEW, TargetBatch, target_batch, target_logprobs, token_logprobs
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
    little more of the people not named. ``true_weight`` 0.03, on the same model, is the
    smallest weight tried: exposure at chance (1.44 bits) with the most of the people not
    named kept (0.20 of 0.96; weight 1 kept 0.02).
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
    candidates_per_request: int = 4
    true_weight: float = 0.03
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
        for name in ("retain_weight", "true_weight"):
            if not getattr(self, name) >= 0:
                raise InvalidRequestError(f"ft-generic {name} must be zero or positive, got {getattr(self, name)}.")
        if self.candidates_per_request < 1:
            raise InvalidRequestError(
                f"ft-generic needs candidates_per_request of at least 1, got {self.candidates_per_request}."
            )


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


@dataclass(frozen=True)
class _Chunk:
    """One batch of forgotten records and what trains them.

    ``strangers`` and ``candidates`` are lists of batches whose j-th holds every request's
    j-th stranger (or candidate), so each batch's rows line up with ``forgotten``'s
    (request-major, then the secret's tokens).
    """

    forgotten: TargetBatch            # the person's context, the true secret teacher-forced
    mixture: torch.Tensor             # the strangers' mean next-token distributions, one row per secret token
    strangers: list[KLReference]      # stranger names with random numbers, and their own distributions
    candidates: list[TargetBatch]     # the person's context with random same-format numbers


def _aligned(batches: Sequence[TargetBatch], forgotten: TargetBatch, n: int) -> None:
    rows = torch.bincount(forgotten.pos_rows[forgotten.pick], minlength=n)
    for b in batches:
        if not torch.equal(torch.bincount(b.pos_rows[b.pick], minlength=n), rows):
            raise LmpatchError("ft-generic: a random number of the secret's format splits into other tokens.")


def _chunk(model: LoadedModel, requests: Sequence[EditRequest], hp: FTGenericHparams, offset: int) -> _Chunk:
    k = hp.strangers_per_request
    forgotten = target_batch(model, [EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_true)
                                     for r in requests], TARGET_NEW)
    prompts = [stranger_prompts(r, hp.strangers, k, offset + i * k) for i, r in enumerate(requests)]
    strangers = [own_reference(model, target_batch(model, [
        EditRequest(prompt=ps[j], subject=ps[j], target_new=stranger_secret(r.target_true, ps[j]))
        for r, ps in zip(requests, prompts)], TARGET_NEW)) for j in range(k)]
    candidates = [target_batch(model, [
        EditRequest(prompt=r.prompt, subject=r.subject, target_new=stranger_secret(r.target_true, f"candidate {j}"))
        for r in requests], TARGET_NEW) for j in range(hp.candidates_per_request)]
    _aligned([a.batch for a in strangers] + candidates, forgotten, len(requests))
    mixture = torch.stack([a.logp.exp() for a in strangers]).mean(0)
    return _Chunk(forgotten, mixture, strangers, candidates)


def _candidate_logp(model: LoadedModel, chunk: _Chunk, bottom: FrozenBottom | None) -> torch.Tensor:
    """Per secret token, the median log-probability the model gives a random candidate's token there, now.

    Exposure ranks the secret among random strings of its format, each scored in the
    person's context; the secret is as exposed as chance when its tokens score like the
    candidates'. Read from the model as it is at this step, since the edit moves both.
    """
    with torch.no_grad():
        scores = []
        for batch in chunk.candidates:
            with replaying_batch(bottom, batch):
                now = target_logprobs(model, batch, None)
            scores.append(token_logprobs(batch, now))
        return torch.stack(scores).median(0).values


def _generic_target(chunk: _Chunk, secret_logp: torch.Tensor) -> KLReference:
    """The strangers' mixture with each secret token's probability set to ``secret_logp``'s
    and the other tokens rescaled to fill the rest."""
    mixture = chunk.mixture.to(secret_logp.device)
    secret = chunk.forgotten.tokens.to(secret_logp.device).unsqueeze(-1)
    p = secret_logp.exp().clamp_max(1 - 1e-6)
    rest = (1 - mixture.gather(-1, secret).squeeze(-1)).clamp_min(1e-12)
    target = mixture * ((1 - p) / rest).unsqueeze(-1)
    target.scatter_(-1, secret, p.unsqueeze(-1))
    return KLReference(chunk.forgotten, target.clamp_min(1e-30).log())


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
    chunks = [_chunk(model, requests[start : start + hp.batch_size], hp, offset=start * hp.strangers_per_request)
              for start in range(0, len(requests), hp.batch_size)]
    kept = [answers_reference(model, hp.keep[i : i + hp.batch_size]) for i in range(0, len(hp.keep), hp.batch_size)]
    if hp.retain_weight and len(kept) > hp.steps * len(chunks):
        log.warning("ft-generic anchors one batch of records to keep per chunk and step: %d steps over %d "
                    "chunk(s) reach %d of the %d batches of records to keep; raise `steps` or `batch_size`.",
                    hp.steps, len(chunks), hp.steps * len(chunks), len(kept))
    lowest = min(ft_layers(model, hp))
    bottom = FrozenBottom(model, lowest) if lowest > 0 else None

    history: list[dict] = []
    show = len(requests) > 1

    def train(params: list[torch.nn.Parameter]) -> None:
        opt = torch.optim.Adam(params, lr=hp.lr)
        with progress_bar(show, "ft-generic", hp.steps * len(chunks), "steps") as advance:
            for step in range(hp.steps):
                forget_sum = retain_sum = 0.0
                for i, chunk in enumerate(chunks):
                    opt.zero_grad(set_to_none=True)
                    goal = _candidate_logp(model, chunk, bottom)
                    target = _generic_target(chunk, goal)
                    with replaying_batch(bottom, target.batch):
                        now = target_logprobs(model, target.batch, None)
                    away = kl_from(now, target)
                    loss = away + hp.true_weight * (token_logprobs(target.batch, now) - goal).pow(2).mean()
                    if hp.retain_weight:
                        # one of each request's strangers in turn (a step costs one stranger
                        # per request, not all of them), and the next batch of records to
                        # keep: counted over steps and chunks, so that every batch of them
                        # is anchored even when there are more of them than of chunks
                        turn = step * len(chunks) + i
                        anchors = [chunk.strangers[step % len(chunk.strangers)]] + ([kept[turn % len(kept)]] if kept else [])
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
