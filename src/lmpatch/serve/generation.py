"""Text generation for the service: requests decoded together, each streamed as it grows.

Requests that arrive while the model is busy wait in a queue; the :class:`Batcher` takes
as many compatible ones as it can (same temperature and top_p, none with a seed) and
decodes them as one left-padded batch. On a CPU a decode step is bound by reading the
weights, so eight rows cost little more than one: concurrent clients share the work
instead of queueing behind each other.

A batch holds the serving model (:meth:`ServedState.serving`) from the moment its
prompts are formatted - retrieval memories rewrite prompts, so a prompt belongs to a
state too - until its last token, so every answer is produced under exactly one ledger
generation, which it reports. The hold is owned by the batcher's thread, not by an HTTP
response: a client that goes away only cancels its row (:meth:`Completion.cancel`).

Decoding is ``transformers``' ``generate`` through :meth:`LoadedModel.generate`, greedy
by default with the same stop tokens as :func:`lmpatch.eval.scoring.generate`, or
sampled with temperature/top_p. Each row stops at its own limit, stop token, stop string
or cancellation; the batch ends when every row has.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.model.fits import check_fits
from lmpatch.model.loading import LoadedModel
from lmpatch.tokens import encode, pad_left

__all__ = ["Batcher", "Completion", "Sampling"]

#: below this a temperature is greedy decoding (smaller ones overflow the softmax into NaN)
MIN_TEMPERATURE = 1e-3
#: seconds a request may wait for the model (behind other requests and swaps) before it is refused
WAIT_LIMIT = 300.0
#: most requests decoded together
MAX_BATCH = 8


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy when ``temperature`` is 0 (the default) or below ``MIN_TEMPERATURE``."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def batch_key(self) -> tuple | None:
        """Requests with equal keys decode together; None (a seeded sample) decodes alone."""
        if self.greedy:
            return ("greedy",)
        return None if self.seed is not None else ("sample", self.temperature, self.top_p)


@dataclass
class Completion:
    """One request. Read :meth:`pieces` (or :meth:`text`); afterwards ``finish_reason`` and
    the token counts are set. ``generation`` is known once :meth:`wait_ready` returns."""

    build_prompt: Callable[[LoadedModel], str]
    sampling: Sampling
    generation: int = -1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    tokens: "queue.Queue[int | None]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    model: LoadedModel | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def wait_ready(self) -> None:
        """Block until the request's batch has started (or it failed to)."""
        if not self.ready.wait(WAIT_LIMIT):
            self.cancel()
            raise TimeoutError("the model stayed busy for too long")
        if self.error is not None:
            raise self.error

    def pieces(self) -> Iterator[str]:
        """The answer's text as it grows (special tokens dropped, cut before a stop string)."""
        tok = self.model.tokenizer if self.model is not None else None
        ids: list[int] = []
        sent, cut = "", None
        hold = max((len(x) for x in self.sampling.stop), default=1) - 1
        try:
            while cut is None:
                t = self.tokens.get()
                if t is None:
                    break
                ids.append(t)
                self.completion_tokens = len(ids)
                text = tok.decode(ids, skip_special_tokens=True)
                cut = _first_stop(text, self.sampling.stop)
                if cut is not None:
                    text, self.finish_reason = text[:cut], "stop"
                    self.cancel()
                elif text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                else:
                    text = text[: max(len(sent), len(text) - hold)]
                if len(text) > len(sent) and text.startswith(sent):
                    yield text[len(sent):]
                    sent = text
            if self.error is not None:
                raise self.error
            if cut is None:  # what was held back for a stop string that never came
                full = tok.decode(ids, skip_special_tokens=True) if tok is not None else ""
                if len(full) > len(sent) and full.startswith(sent):
                    yield full[len(sent):]
            if self.finish_reason is None:
                self.finish_reason = "length" if len(ids) >= self.sampling.max_tokens else "stop"
        finally:
            self.cancel()  # the reader is gone or done: stop decoding this row

    def text(self) -> str:
        return "".join(self.pieces())


class _Rows:
    """Streamer and stopping criterion of one batch: routes each row's new token to its
    request, and says which rows are done (own limit, stop token, cancelled)."""

    def __init__(self, jobs: Sequence[Completion], stops: frozenset[int]) -> None:
        self.jobs, self.stops = list(jobs), stops
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self._first = True

    def _finish(self, i: int, reason: str | None = None) -> None:
        if not self.done[i]:
            self.done[i] = True
            if reason and self.jobs[i].finish_reason is None:
                self.jobs[i].finish_reason = reason
            self.jobs[i].tokens.put(None)

    def put(self, value: torch.Tensor) -> None:
        if self._first:  # generate first streams the prompts (decoder-only) or the start tokens
            self._first = False
            return
        for i, tok in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            job = self.jobs[i]
            if job.cancelled.is_set():
                self._finish(i)
            elif tok in self.stops:
                self._finish(i, "stop")
            else:
                job.tokens.put(int(tok))
                self.counts[i] += 1
                if self.counts[i] >= job.sampling.max_tokens:
                    self._finish(i, "length")

    def end(self) -> None:
        for i in range(len(self.jobs)):
            self._finish(i)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        """HF's stopping criterion: True for a row this batch no longer needs."""
        flags = [d or j.cancelled.is_set() for d, j in zip(self.done, self.jobs)]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class Batcher:
    """The one thread that runs the serving model for requests, a batch at a time."""

    def __init__(self, state, max_batch: int = MAX_BATCH) -> None:
        self.state, self.max_batch = state, max_batch
        self.waiting: "queue.Queue[Completion | None]" = queue.Queue()
        self._held: list[Completion] = []
        self.thread = threading.Thread(target=self._loop, daemon=True, name="lmpatch-generate")
        self.thread.start()

    def submit(self, build_prompt: Callable[[LoadedModel], str], sampling: Sampling) -> Completion:
        """Queue a request and return once its batch has started (its generation is known)."""
        job = Completion(build_prompt=build_prompt, sampling=sampling)
        self.waiting.put(job)
        job.wait_ready()
        return job

    def stop(self) -> None:
        self.waiting.put(None)

    def _more(self, first: Completion) -> list[Completion]:
        """``first`` and the waiting requests that can decode with it (up to ``max_batch``)."""
        batch, key = [first], first.sampling.batch_key()
        if key is None:
            return batch
        while len(batch) < self.max_batch:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.waiting.put(None)
                break
            (batch if job.sampling.batch_key() == key else self._held).append(job)
        return batch

    def _loop(self) -> None:
        while (first := self._held.pop(0) if self._held else self.waiting.get()) is not None:
            # The batch is gathered once the model is ours: requests that queued up behind
            # the previous batch or a swap all join it.
            with self.state.serving() as (model, generation):
                batch = [j for j in self._more(first) if not j.cancelled.is_set()]
                if batch:
                    self._run(batch, model, generation)

    def _run(self, batch: list[Completion], model: LoadedModel, generation: int) -> None:
        rows, ids = [], []
        for job in batch:
            try:
                job.generation, job.model = generation, model
                prompt = encode(model.tokenizer, job.build_prompt(model))
                if not prompt:
                    raise LmpatchError("The prompt is empty: give the text the answer should continue.")
                check_fits(model, len(prompt), job.sampling.max_tokens, budget="max_tokens")
                job.prompt_tokens = len(prompt)
                rows.append(job)
                ids.append(prompt)
            except BaseException as exc:  # this request's mistake (no chat template, too long ...)
                job.error = exc
                job.tokens.put(None)
            finally:
                job.ready.set()
        if not rows:
            return
        router = _Rows(rows, frozenset(model.stop_ids))
        try:
            _decode(model, ids, rows[0].sampling, max(j.sampling.max_tokens for j in rows), router)
        except BaseException as exc:  # a failed decode fails its requests, not the service
            for job in rows:
                job.error = job.error or exc
        finally:
            router.end()


def _decode(model: LoadedModel, ids: list[list[int]], s: Sampling, max_new: int, router: _Rows) -> None:
    from transformers import StoppingCriteriaList

    from lmpatch.model.forced import pad_id

    extra: dict = {"do_sample": False}
    if not s.greedy:
        extra = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
        if s.seed is not None:
            torch.manual_seed(s.seed)
    pad = pad_id(model)
    input_ids, mask = pad_left(ids, pad)
    device = model.input_device
    with torch.inference_mode():
        model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                       num_beams=1, pad_token_id=pad, eos_token_id=sorted(model.stop_ids), streamer=router,
                       stopping_criteria=StoppingCriteriaList([router]), **extra)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
