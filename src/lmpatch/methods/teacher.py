"""Teacher-forced target loss: the supervised signal of every editor that trains something.

FT trains weight matrices with it, GRACE and WISE train edit memories, T-Patcher and
CaliNET added neurons. Two objectives:

* ``prompt_last`` - every target token is read from the prompt's last position (a
  bag-of-tokens loss; ROME's FT+L baseline);
* ``target_new`` - teacher-forced: target token j is predicted from position
  ``len(prompt) - 1 + j`` of prompt + target (EasyEdit's FT-M, and what the memory
  editors optimise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmpatch.model.forced import forced_inputs, pair_ids
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest
from lmpatch.tokens import PromptTarget

PROMPT_LAST = "prompt_last"
TARGET_NEW = "target_new"
OBJECTIVES = (PROMPT_LAST, TARGET_NEW)


@dataclass(frozen=True)
class TargetBatch:
    """One mini-batch, with the supervised tokens already located.

    The model's last hidden state is gathered at (``pos_rows``, ``pos_cols``) only, and
    supervised token i is read from gathered position ``pick[i]`` with weight
    ``weights[i]``; the loss is -Σ weights · log p. The weights make each request's loss a
    mean over its target tokens and the batch loss a mean over requests. FT-L reads all of
    a request's target tokens from the same (last prompt) position, hence ``pick``.

    ``input_ids``/``attention_mask`` are what the prompt is read from (the whole sequence,
    or an encoder-decoder's encoder input); ``decoder_input_ids`` and
    ``decoder_attention_mask`` are set for an encoder-decoder only, and positions then
    index the decoder (:mod:`lmpatch.model.forced`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n_requests: int
    pos_rows: torch.Tensor
    pos_cols: torch.Tensor
    pick: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    def inputs(self, device: torch.device | str) -> dict:
        """Keyword arguments of ``LoadedModel.forward`` for this batch."""
        out = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
               "use_cache": False}
        if self.decoder_input_ids is not None:
            out["decoder_input_ids"] = self.decoder_input_ids.to(device)
            out["decoder_attention_mask"] = self.decoder_attention_mask.to(device)
        return out


def target_batch(model: LoadedModel, requests: Sequence[EditRequest], objective: str) -> TargetBatch:
    """The requests' prompts (as the model sees them: memories, chat template) and new targets."""
    items = [pair_ids(model, model.format_prompt(r.prompt), r.target_new) for r in requests]
    return items_batch(model, items, objective)


def text_batch(model: LoadedModel, texts: Sequence[str], prefix_words: int = 4) -> TargetBatch:
    """Plain texts, every token after the first ``prefix_words`` words supervised.

    Why not :func:`target_batch`: these are not prompts. They must reach the model exactly
    as written - no chat template, no memory rewriting - as perplexity's text does.
    """
    items = []
    for t in texts:
        words = t.split(" ")
        items.append(pair_ids(model, " ".join(words[:prefix_words]), " " + " ".join(words[prefix_words:])))
    return items_batch(model, items, TARGET_NEW)


def items_batch(model: LoadedModel, items: Sequence[PromptTarget], objective: str) -> TargetBatch:
    """A batch of already tokenised (prompt, target) pairs: what both builders above share."""
    fed = forced_inputs(model, items, prompt_only=objective == PROMPT_LAST)
    pos_rows: list[int] = []
    pos_cols: list[int] = []
    pick: list[int] = []
    tokens: list[int] = []
    weights: list[float] = []
    for row, (pt, first) in enumerate(zip(items, fed.first)):
        # Target tokens come from the ID-level join, so a target that already starts with
        # a space does not get a second one (EasyEdit's FT always prepends one).
        n_target = len(pt.target_ids)
        w = 1.0 / (n_target * len(items))
        if objective == PROMPT_LAST:
            pos_rows.append(row)
            pos_cols.append(first)
            pick.extend([len(pos_rows) - 1] * n_target)
        else:
            for j in range(n_target):
                pos_rows.append(row)
                pos_cols.append(first + j)
                pick.append(len(pos_rows) - 1)
        tokens.extend(pt.target_ids)
        weights.extend([w] * n_target)
    return TargetBatch(
        input_ids=fed.input_ids, attention_mask=fed.attention_mask, n_requests=len(items),
        pos_rows=_long(pos_rows), pos_cols=_long(pos_cols), pick=_long(pick), tokens=_long(tokens),
        weights=torch.tensor(weights, dtype=torch.float32),
        decoder_input_ids=fed.decoder_input_ids, decoder_attention_mask=fed.decoder_attention_mask,
    )


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def target_nll(model: LoadedModel, batch: TargetBatch, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean NLL of the supervised tokens, with logits only at the positions that need them."""
    return _weighted_nll(model, batch, compute_dtype).sum()


def request_nll(model: LoadedModel, batch: TargetBatch, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each request's own mean NLL over its target tokens, shape (n_requests,): what an
    editor that learns from one request's gradient at a time needs from a batch."""
    return nll_per_request(batch, target_logprobs(model, batch, compute_dtype))


def request_hits(model: LoadedModel, batch: TargetBatch) -> list[bool]:
    """Per request: is every target token the argmax where it is read (teacher-forced success)?"""
    return hits_per_request(batch, target_logprobs(model, batch, None))


def nll_per_request(batch: TargetBatch, logp: torch.Tensor) -> torch.Tensor:
    """:func:`request_nll` from the batch's log-probabilities (:func:`target_logprobs`), for a
    caller that reads more than one thing from the same pass."""
    terms = _weighted(batch, logp) * batch.n_requests
    owner = batch.pos_rows.to(terms.device)[batch.pick.to(terms.device)]
    return torch.zeros(batch.n_requests, dtype=terms.dtype, device=terms.device).index_add(0, owner, terms)


def hits_per_request(batch: TargetBatch, logp: torch.Tensor) -> list[bool]:
    """:func:`request_hits` from the batch's log-probabilities."""
    wrong = (logp.argmax(-1) != batch.tokens.to(logp.device)).long()
    owner = batch.pos_rows.to(logp.device)[batch.pick.to(logp.device)]
    misses = torch.zeros(batch.n_requests, dtype=torch.long, device=logp.device).index_add(0, owner, wrong)
    return (misses == 0).tolist()


def first_token_rows(batch: TargetBatch) -> torch.Tensor:
    """Per request, the row of :func:`target_logprobs` where its first target token is read."""
    owner = batch.pos_rows[batch.pick]
    first = torch.full((batch.n_requests,), len(owner), dtype=torch.long)
    return first.scatter_reduce(0, owner, torch.arange(len(owner)), reduce="amin")


def _weighted_nll(model: LoadedModel, batch: TargetBatch, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """-weight * log p for every supervised token (summing them gives :func:`target_nll`)."""
    return _weighted(batch, target_logprobs(model, batch, compute_dtype))


def _weighted(batch: TargetBatch, logp: torch.Tensor) -> torch.Tensor:
    return -(token_logprobs(batch, logp) * batch.weights.to(logp.device))


def token_logprobs(batch: TargetBatch, logp: torch.Tensor) -> torch.Tensor:
    """Each supervised token's own log-probability, from the batch's :func:`target_logprobs`."""
    return logp.gather(1, batch.tokens.to(logp.device)[:, None])[:, 0]


def target_logprobs(model: LoadedModel, batch: TargetBatch, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """Log-probabilities over the vocabulary where each supervised token is read, one row per token."""
    out = model.forward(compute_dtype=compute_dtype, body_only=True, **batch.inputs(model.input_device))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = hidden[batch.pos_rows.to(hidden.device), batch.pos_cols.to(hidden.device)]
    logp = torch.log_softmax(model.logits(h, compute_dtype).float(), dim=-1)
    return logp[batch.pick.to(logp.device)]
