"""Teacher-forced scoring and greedy generation: the only two ways metrics read a model.

Every metric (token accuracy, probability comparison, locality agreement) is derived
from :func:`score_targets`, so they cannot disagree about tokenisation, padding or
normalisation. Three choices make the numbers independent of how a run was batched:

* prompt and target are joined as *ID lists* built by :func:`lmpatch.tokens.prompt_target`
  on the chat-wrapped prompt, never by re-tokenising a glued string
  (which can merge tokens across the boundary or add a second leading space); how they
  are fed (one sequence, or encoder and decoder) is :mod:`lmpatch.model.forced`'s;
* target positions are computed per row from the real lengths and the padding side, and
  left-padded rows get position ids from the attention mask (else the padding
  shifts every position of the row), so batch
  size and padding side change nothing beyond float rounding;
* the vocabulary projection runs only at the gathered target positions (a batch of
  prompts never materialises a ``batch x length x vocab`` tensor), and the softmax is
  taken in float32 whatever the model dtype.

When every prompt of a call starts with the same long run of tokens (an applied IKE
memory's demonstrations), that run is read once and its cache shared by every row
(:mod:`lmpatch.eval.prefix`): one IKE record's evaluation went from ~70 s to ~18 s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.eval.prefix import (
    decode_after_prefix,
    prefix_groups,
    score_after_prefix,
)
from lmpatch.model.fits import check_fits
from lmpatch.model.forced import PADDING_SIDES, forced_inputs, pad_id, pair_ids
from lmpatch.model.loading import LoadedModel
from lmpatch.model.stops import CompletionCriterion, contains_any, cut_at, until_stop
from lmpatch.tokens import PromptTarget, encode, pad_left


@dataclass(frozen=True)
class TargetScore:
    """Per-token view of how a model reads ``target`` after ``prompt``.

    ``logprobs[i]`` is log P(target[i] | prompt, target[:i]); ``argmax[i]`` is the token
    the model ranks first at that same position. Everything else is derived from these.
    """

    logprobs: list[float]
    argmax: list[int]
    target: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.target)

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-likelihood (ROME's per-token NLL, negated)."""
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """exp(mean_logprob): the per-token geometric-mean probability ROME compares."""
        return math.exp(self.mean_logprob)

    @property
    def token_accuracy(self) -> float:
        """Fraction of target positions where the argmax is the target token (EasyEdit)."""
        return sum(a == t for a, t in zip(self.argmax, self.target)) / len(self.target)


def encode_pairs(model: LoadedModel, pairs: Sequence[tuple[str, str]]) -> list[PromptTarget]:
    """Prompt and target IDs exactly as scored (chat wrapping included)."""
    texts = model.format_prompts([prompt for prompt, _ in pairs])
    return [pair_ids(model, text, target) for text, (_, target) in zip(texts, pairs)]


@torch.inference_mode()
def score_targets(
    model: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    padding_side: str = "right",
) -> list[TargetScore]:
    """Teacher-forced log-probabilities and argmaxes of each target after its prompt.

    ``pairs`` are ``(prompt, target)``; results come back in the same order. Sequences
    are sorted by length before batching so rows in a batch waste little padding.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = encode_pairs(model, pairs)
    results: list[TargetScore | None] = [None] * len(encoded)

    def score_rows(rows: list[int], prefix: tuple[Any, int] | None) -> None:
        order = sorted(rows, key=lambda i: len(encoded[i].ids), reverse=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, score in zip(chunk, _score_batch(model, [encoded[i] for i in chunk], padding_side, prefix)):
                results[i] = score

    # An IKE or SERAC memory puts the same demonstrations before each edit's prompts: read them once.
    seqs = [it.ids for it in encoded]
    rest = set(range(len(encoded)))
    for rows, cache, shared in prefix_groups(model, seqs, keep=[len(it.ids) - len(it.prompt_ids) + 1 for it in encoded]):
        score_rows(rows, (cache, shared))
        rest.difference_update(rows)
    score_rows(sorted(rest), None)
    return results  # type: ignore[return-value]


def _score_batch(
    model: LoadedModel, items: list[PromptTarget], padding_side: str, prefix: tuple[Any, int] | None = None,
) -> list[TargetScore]:
    if prefix is not None:
        hidden, rows, cols = score_after_prefix(model, prefix[0], prefix[1], items, pad_id(model))
        return _scores_at(model, items, hidden, rows, cols)
    batch = forced_inputs(model, items, padding_side)
    out = model.forward(body_only=True, **batch.kwargs(model.input_device))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows, cols = [], []
    for r, (it, first) in enumerate(zip(items, batch.first)):
        rows.extend([r] * len(it.target_ids))
        cols.extend(range(first, first + len(it.target_ids)))
    return _scores_at(model, items, hidden, rows, cols)


def _scores_at(model: LoadedModel, items: list[PromptTarget], hidden: torch.Tensor, rows: list[int],
               cols: list[int]) -> list[TargetScore]:
    """Target log-probabilities and argmaxes from the hidden states at (rows, cols)."""
    rows_t = torch.tensor(rows, device=hidden.device)
    cols_t = torch.tensor(cols, device=hidden.device)
    h = hidden[rows_t, cols_t]
    logits = model.logits(h).float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor([t for it in items for t in it.target_ids], device=logp.device)
    picked = logp.gather(1, targets[:, None])[:, 0].cpu().tolist()
    best = logp.argmax(-1).cpu().tolist()

    scores, k = [], 0
    for it in items:
        n = len(it.target_ids)
        scores.append(TargetScore(logprobs=picked[k : k + n], argmax=best[k : k + n], target=list(it.target_ids)))
        k += n
    return scores


@torch.inference_mode()
def generate_ids(
    model: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 20,
    batch_size: int = 8,
    stop_texts: Sequence[str] | None = None,
    complete: Callable[[str], bool] | None = None,
) -> list[list[int]]:
    """Greedy continuation token IDs for each prompt (chat-wrapped), in input order.

    ``max_new_tokens`` may differ per prompt: a batch is generated to its longest limit
    and each row is cut to its own, which is exact because greedy decoding is
    deterministic step by step. Rows stop at the first stop token (EOS, a special token
    or a media marker, see :mod:`lmpatch.model.stops`), which is not returned.

    With ``stop_texts`` a row also stops as soon as its decoded new text contains one of
    them; its IDs end with the token that completed the stop string, so the caller cuts
    the decoded text (see :func:`generate`). ``complete`` is the general form: a row stops
    once ``complete(its decoded new text)`` is true (MQuAKE: the answer line has ended),
    its IDs ending with the completing token. A batch then ends when all its rows have,
    instead of always running to its limit
    (:class:`lmpatch.model.stops.CompletionCriterion`). Without either nothing changes:
    ``generate`` gets exactly the same arguments.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or ())  # read once: it may be a generator
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidRequestError("prompts must be a list of strings.")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise InvalidRequestError("max_new_tokens must be one int or one per prompt.")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in limits):
        raise InvalidRequestError(f"max_new_tokens must be whole numbers >= 1, got {max_new_tokens!r}.")
    tok = model.tokenizer
    pad = pad_id(model)
    stops = model.stop_ids
    encoded = [encode(tok, text) for text in model.format_prompts(prompts)]
    for k, (ids, limit) in enumerate(zip(encoded, limits)):
        what = "The prompt" if len(prompts) == 1 else f"Prompt {k + 1}"
        if not ids:
            raise InvalidRequestError(f"{what} is empty: there is nothing to continue.")
        check_fits(model, len(ids), limit, what=what)
    results: list[list[int]] = [[] for _ in prompts]
    complete = _either(contains_any(stop_texts) if stop_texts else None, complete)
    rest = set(range(len(encoded)))
    for rows, cache, shared in prefix_groups(model, encoded):
        order = sorted(rows, key=lambda i: len(encoded[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            new = decode_after_prefix(model, cache, shared, [encoded[i][shared:] for i in chunk],
                                      max(limits[i] for i in chunk), stops, pad, complete)
            for i, row in zip(chunk, new):
                results[i] = row[: limits[i]]
        rest.difference_update(rows)
    device = model.input_device
    order = sorted(rest, key=lambda i: len(encoded[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_left([encoded[i] for i in chunk], pad)
        # A decoder-only model continues its prompt; an encoder-decoder's output starts
        # with the decoder's start token instead.
        start = 1 if model.spec.encoder_decoder else ids.shape[1]
        extra, criterion = {}, None
        if complete is not None:
            criterion = CompletionCriterion(tok, start, complete, stops)
            extra["stopping_criteria"] = _criteria_list(criterion)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(limits[i] for i in chunk),
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=sorted(stops),
            **extra,
        )
        new = out[:, start:].cpu().tolist()
        for r, (i, row) in enumerate(zip(chunk, new)):
            if criterion is not None and r in criterion.ends:
                row = row[: criterion.ends[r]]  # the rest is padding added after the row stopped
            results[i] = until_stop(row[: limits[i]], stops)
    return results


def _either(a: Callable[[str], bool] | None, b: Callable[[str], bool] | None) -> Callable[[str], bool] | None:
    """The completion test "``a`` or ``b``", where either may be absent."""
    if a is None or b is None:
        return a or b
    return lambda text: a(text) or b(text)


def _criteria_list(criterion: CompletionCriterion) -> Any:
    """``criterion`` in the list type ``generate`` expects (imported only when needed)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([criterion])


def decode_rows(model: LoadedModel, rows: Sequence[Sequence[int]]) -> list[str]:
    """Generated IDs as text, special tokens dropped (how :func:`generate` decodes)."""
    return [model.tokenizer.decode(list(row), skip_special_tokens=True) for row in rows]


def generate(
    model: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 20,
    batch_size: int = 8,
    stop_texts: Sequence[str] | None = None,
    complete: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy continuations (text after the prompt only), batched with left padding.

    With ``stop_texts`` each continuation ends early at the first of them, and the text
    is cut just before it (the stop string itself is not returned). With ``complete`` a
    continuation ends once the test passes and is returned whole.
    """
    ids = generate_ids(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_texts=stop_texts, complete=complete)
    texts = decode_rows(model, ids)
    return [cut_at(t, stop_texts) for t in texts] if stop_texts else texts
