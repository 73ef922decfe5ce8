"""WikiText-2 perplexity: a cheap, sensitive check that an edit left language modelling intact.

Protocol (every choice below is in the returned ``TaskScore.protocol``):

* **Text.** The shipped WikiText-2 *raw* test split (``wikitext-2-raw/wiki.test.raw.gz``),
  read as one string with its CRLF line ends normalised to ``\n``; WikiText's spaced
  punctuation (`` @-@ ``, `` , ``) is kept, as in the usual Hugging Face recipe. That recipe
  joins the dataset's rows with blank lines, which this copy does not have, so values are
  close to, not identical with, published ones. The raw split is preferred over the
  ``<unk>``-substituted "tokenized" WikiText: ``<unk>`` is not text a subword model ever
  sees. The same file is the default corpus for key statistics (``lmpatch.stats``). Those
  are second moments of MLP inputs, not fitted to predict tokens, so the overlap does not
  bias a before/after-edit comparison in any obvious way; pass ``text=`` for held-out text.
* **Tokens.** The whole text is tokenised once with the model's tokenizer (with its own
  special tokens, e.g. a leading BOS for Llama-2; SmolLM2 and GPT-2 add none) and cut to
  its first ``max_tokens + 1`` tokens: the first ``max_tokens`` tokens after the first
  are predicted. Tokenising the whole text (rather than a prefix) makes the cut exact.
* **Windows.** Predicted tokens are split into consecutive segments of ``stride`` tokens;
  each segment is scored in one forward pass over the ``window`` tokens that end with it.
  Every token is therefore predicted exactly once, with between ``window - stride`` and
  ``window - 1`` tokens of context. The default ``stride = window - 1`` is the cheapest
  ("non-overlapping") choice; ``stride = window // 2`` gives every token at least half a
  window of context at twice the cost (the Hugging Face guide's strided evaluation).
* **Number.** ``exp(mean NLL)`` over all predicted tokens, NLL in nats from a float32
  log-softmax (:mod:`lmpatch.eval.scoring`), accumulated in float64.

The default budget (16,384 predicted tokens, 17 windows of 1,024) takes 47 s for
SmolLM2-135M on 2 CPU cores (about twice that when other processes share the cores) and
gives the same value on every run. Before/after-edit comparisons score the very same
tokens, so their difference is far less noisy than the absolute value.
"""
from __future__ import annotations

import gzip
import math

import torch

from lmpatch.data.paths import shipped_path
from lmpatch.errors import InvalidRequestError
from lmpatch.eval.piqa import TaskScore
from lmpatch.eval.scoring import _score_batch
from lmpatch.model.loading import LoadedModel
from lmpatch.progress import progress_bar
from lmpatch.tokens import PromptTarget

DEFAULT_MAX_TOKENS = 16_384
DEFAULT_WINDOW = 1024
_WIKITEXT = ("wikitext-2-raw", "wiki.test.raw.gz")


def wikitext2_test_text() -> str:
    """The shipped WikiText-2 raw test split as one string."""
    with gzip.open(shipped_path(*_WIKITEXT), "rt", encoding="utf-8") as fh:
        return fh.read()


def token_windows(n_ids: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, first_scored, end)`` for each forward pass over ``ids[start:end]``.

    Tokens ``first_scored .. end-1`` are predicted in that pass; together the passes
    predict tokens ``1 .. n_ids-1`` exactly once, each with at least one token of context.
    """
    if window < 2:
        raise InvalidRequestError(f"window must be at least 2 tokens, got {window}.")
    if not 1 <= stride <= window - 1:
        raise InvalidRequestError(f"stride must be between 1 and window - 1 = {window - 1}, got {stride}.")
    spans = []
    for first in range(1, n_ids, stride):
        end = min(first + stride, n_ids)
        spans.append((max(0, end - window), first, end))
    return spans


def perplexity(
    model: LoadedModel,
    text: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> TaskScore:
    """Perplexity of ``model`` on ``text`` (default: WikiText-2 raw test), sliding windows.

    ``max_tokens=None`` predicts every token of the text. ``batch_size`` windows go
    through the model at once; each window's vocabulary projection is ``stride x vocab``
    float32 values, so keep it small on CPU (1 is as fast as larger batches there).
    """
    stride = window - 1 if stride is None else stride
    limit = model.context_length
    if limit is not None and window > limit:
        raise InvalidRequestError(
            f"window {window} exceeds the model's context of {limit} tokens; pass window<={limit}."
        )
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be at least 1, got {batch_size}.")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}.")
    source = "WikiText-2 raw test" if text is None else "the given text"
    ids = _token_ids(model, wikitext2_test_text() if text is None else text)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise InvalidRequestError("The text is shorter than two tokens; perplexity needs at least one predicted token.")
    spans = token_windows(len(ids), window, stride)

    total_nll, count = _total_nll(model, ids, spans, batch_size, progress)
    mean_nll = total_nll / count
    protocol = (
        f"{source}: first {count} predicted tokens (the model's tokenizer, vocab {len(model.tokenizer)}, applied to "
        f"the whole text), windows of {window} tokens scoring {stride} new tokens each (context {window - stride}.."
        f"{window - 1}); exp(mean NLL), float32 log-softmax; no chat template"
    )
    if model.spec.encoder_decoder:
        protocol += "; encoder-decoder: a window's context is the encoder's input, its scored tokens the decoder's"
    return TaskScore(
        name="wikitext2_perplexity" if text is None else "perplexity",
        value=math.exp(mean_nll),
        n=count,
        protocol=protocol,
        higher_is_better=False,
        details={"mean_nll": mean_nll, "bits_per_token": mean_nll / math.log(2), "windows": float(len(spans))},
    )


@torch.inference_mode()
def _total_nll(
    model: LoadedModel, ids: list[int], spans: list[tuple[int, int, int]], batch_size: int, progress: bool
) -> tuple[float, int]:
    """Summed NLL (nats) and count of the tokens the ``spans`` predict, ``batch_size`` windows per pass."""
    total, count = 0.0, 0
    with progress_bar(progress, "perplexity", len(ids) - 1, "tokens") as advance:
        for start in range(0, len(spans), batch_size):
            group = spans[start : start + batch_size]
            items = [PromptTarget(tuple(ids[a:f]), tuple(ids[f:e])) for a, f, e in group]
            for score in _score_batch(model, items, "right"):
                total -= math.fsum(score.logprobs)
                count += score.n_tokens
            advance(sum(e - f for _, f, e in group))
    return total, count


def _token_ids(model: LoadedModel, text: str) -> list[int]:
    # verbose=False: the "sequence longer than the model maximum" warning is expected here;
    # the windows, not the tokenizer, bound what the model sees.
    return list(model.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
