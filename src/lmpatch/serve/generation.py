"""Text generation for the service: one request's tokens, streamed as they are decoded.

A request holds the serving model (:meth:`ServedState.serving`) from the moment its
prompt is formatted - retrieval memories rewrite prompts, so the prompt belongs to a
state too - until its last token, so every answer is produced under exactly one ledger
generation, which it reports. The hold is owned by the generation thread, not by the
HTTP response, so a client that goes away cannot leave the model locked: the thread
notices (:meth:`Completion.cancel`) at the next token and lets go.

Decoding is ``transformers``' ``generate`` through :meth:`LoadedModel.generate`, greedy
by default with the same stop tokens as :func:`lmpatch.eval.scoring.generate` (so a
greedy answer here equals ``lmpatch generate``), or sampled with temperature/top_p.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lmpatch.errors import LmpatchError
from lmpatch.model.loading import LoadedModel
from lmpatch.tokens import encode

__all__ = ["Completion", "Sampling"]

#: below this a temperature is greedy decoding (smaller ones overflow the softmax into NaN)
MIN_TEMPERATURE = 1e-3
#: seconds a request may wait for the model (behind other requests and swaps) before it is refused
WAIT_LIMIT = 300.0


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy when ``temperature`` is 0 (the default) or below ``MIN_TEMPERATURE``."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class _TokenQueue:
    """A ``generate`` streamer that hands each new token ID to the reading thread and
    stops generation when the reader has cancelled."""

    def __init__(self) -> None:
        self.q: queue.Queue[int | None] = queue.Queue()
        self._first = True

    def put(self, value: torch.Tensor) -> None:
        if self._first:  # generate first streams the prompt (decoder-only) or the start token
            self._first = False
            return
        for tok in value.reshape(-1).tolist():
            self.q.put(int(tok))

    def end(self) -> None:
        self.q.put(None)


class _Cancelled:
    """A stopping criterion that ends ``generate`` once the request is cancelled."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Completion:
    """One running generation. Read :meth:`pieces`; afterwards ``finish_reason`` and the
    token counts are set. ``generation`` is known as soon as :meth:`start` returns."""

    sampling: Sampling
    generation: int = -1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    _tokens: _TokenQueue = field(default_factory=_TokenQueue)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _model: LoadedModel | None = None

    @classmethod
    def start(cls, state, build_prompt: Callable[[LoadedModel], str], sampling: Sampling) -> "Completion":
        """Queue for the serving model, format the prompt there, and start decoding in a thread."""
        job = cls(sampling=sampling)
        thread = threading.Thread(target=job._run, args=(state, build_prompt), daemon=True, name="lmpatch-generate")
        thread.start()
        if not job._ready.wait(WAIT_LIMIT):
            job.cancel()
            raise TimeoutError("the model stayed busy for too long")
        if job.error is not None:
            raise job.error
        return job

    def cancel(self) -> None:
        self._cancel.set()

    def _run(self, state, build_prompt: Callable[[LoadedModel], str]) -> None:
        try:
            with state.serving() as (model, generation):
                if self._cancel.is_set():
                    return
                self.generation, self._model = generation, model
                ids = encode(model.tokenizer, build_prompt(model))
                if not ids:
                    raise LmpatchError("The prompt is empty: give the text the answer should continue.")
                self.prompt_tokens = len(ids)
                _check_length(model, len(ids), self.sampling.max_tokens)
                self._ready.set()
                self._decode(model, ids)
        except BaseException as exc:  # a bad prompt (no chat template ...) or a failed decode
            self.error = exc
        finally:
            self._ready.set()
            self._tokens.end()

    def _decode(self, model: LoadedModel, ids: list[int]) -> None:
        from transformers import StoppingCriteriaList

        from lmpatch.model.forced import pad_id

        s = self.sampling
        extra: dict = {"do_sample": False}
        if s.temperature >= MIN_TEMPERATURE:
            extra = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
            if s.seed is not None:
                torch.manual_seed(s.seed)
        device = model.input_device
        with torch.inference_mode():
            model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=s.max_tokens, num_beams=1, pad_token_id=pad_id(model),
                eos_token_id=sorted(model.stop_ids), streamer=self._tokens,
                stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancel)]), **extra,
            )

    def pieces(self) -> Iterator[str]:
        """The answer's text as it grows (special tokens dropped, cut before a stop string)."""
        tok = self._model.tokenizer if self._model is not None else None
        stops = set(self._model.stop_ids) if self._model is not None else set()
        ids: list[int] = []
        sent, cut = "", None
        hold = max((len(x) for x in self.sampling.stop), default=1) - 1
        try:
            while cut is None:
                t = self._tokens.q.get()
                if t is None:
                    break
                if t in stops:
                    self.finish_reason = "stop"
                    continue
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
            self.cancel()  # the reader is gone or done: stop decoding

    def text(self) -> str:
        return "".join(self.pieces())


def _check_length(model: LoadedModel, prompt_tokens: int, max_tokens: int) -> None:
    """Refuse a request the model cannot hold (prompt + answer beyond its positions)."""
    cfg = model.model.config
    limit = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "seq_length")
                  if isinstance(getattr(cfg, k, None), int)), None)
    if limit is not None and prompt_tokens + max_tokens > limit:
        raise LmpatchError(f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's {limit} positions; shorten the prompt or lower max_tokens.")


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
