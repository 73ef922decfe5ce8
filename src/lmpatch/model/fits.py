"""Does a text fit in what a model can read? One check for every entry point.

Beyond its positions a model with learned position embeddings (GPT-2) fails with an
IndexError deep in torch, and a rotary one (Llama, SmolLM2) reads on at positions it was
never trained on, for as long as it is asked to: ``generate --max-new-tokens 99999999999``
ran for minutes before anyone stopped it, and a served edit with a 9,000-token prompt
could not even be cancelled. So ``generate``, ``edit`` and the service refuse such input
at once, in the same words.
"""
from __future__ import annotations

from typing import Iterable

from lmpatch.errors import InvalidRequestError
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest
from lmpatch.tokens import encode


def check_fits(model: LoadedModel, prompt_tokens: int, new_tokens: int, budget: str = "max_new_tokens",
               what: str = "The prompt") -> None:
    """Refuse ``prompt_tokens`` + ``new_tokens`` beyond the model's positions (when its config says)."""
    limit = model.context_length
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise InvalidRequestError(f"{what} ({prompt_tokens} tokens) plus {budget} ({new_tokens}) exceeds the "
                                  f"model's {limit} positions; shorten the prompt or lower {budget}.")


def check_requests_fit(model: LoadedModel, requests: Iterable[EditRequest]) -> None:
    """Each request's texts (edit prompt, rephrasings, probes, each with its answer) within
    the model's positions. A method may add a context prefix of a few dozen tokens; the
    texts the user gave must at least fit themselves."""
    limit = model.context_length
    if limit is None:
        return
    for k, request in enumerate(requests):
        texts = [f"{request.prompt} {request.target_new}"] + [f"{r} {request.target_new}" for r in request.rephrase]
        texts += [f"{p.prompt} {p.answer}" for p in (*request.locality, *request.portability)]
        for text in model.format_prompts(texts):
            n = len(encode(model.tokenizer, text))
            if n > limit:
                raise InvalidRequestError(f"Edit request {k + 1} has a text of {n} tokens (with its answer), beyond "
                                          f"the model's {limit} positions; shorten it.")
