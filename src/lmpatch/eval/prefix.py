"""Prompts that share a long beginning read it once: greedy decoding and teacher-forced scoring.

Two kinds of evaluation put the same long text in front of many prompts: MQuAKE's few-shot
block (~320 tokens) and an applied IKE or SERAC memory (k demonstrations and the fact,
~1,300 tokens at k = 32), where one edit's scored and generated prompts differ only in
their last dozen tokens. Reading the shared part once and handing its key/value cache to
every row makes such an evaluation about as cheap as one without the prefix. With many
edits in one memory, a call holds many such groups (:func:`group_by_prefix`); each is
read once.

Both functions here take prompts already formatted and tokenised whole (so the shared
prefix is a common run of token IDs and no tokenisation seam is introduced), copy the
prefix cache into each batch, and give every row the positions it would have alone:

* :func:`decode_after_prefix` - each row's own tokens follow the prefix after left padding
  placed *between* prefix and row, masked out, with positions counted over real tokens;
* :func:`score_after_prefix` - rows are right-padded after the prefix, and each target's
  log-probabilities are read at the same positions as in a full forward pass.

Results equal the full computation up to float rounding (the attention over the prefix
is summed in another order). Callers decide when to use them; :func:`shareable` says
when it is safe.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterator, Sequence

import torch

from lmpatch.model.compat import output_cache, with_cache
from lmpatch.model.loading import LoadedModel
from lmpatch.tokens import pad_left, pad_right

log = logging.getLogger(__name__)

#: Below this many shared tokens, scoring and generation take their ordinary path (the
#: saving would be small, and ordinary prompts keep bit-identical results).
MIN_SHARED = 128


def common_prefix_length(encoded: Sequence[Sequence[int]], keep: Sequence[int] | int = 1) -> int:
    """Tokens shared by every sequence, leaving sequence ``i`` at least ``keep[i]`` of its own."""
    keeps = [keep] * len(encoded) if isinstance(keep, int) else list(keep)
    limit = min(len(e) - k for e, k in zip(encoded, keeps))
    first = encoded[0]
    for j in range(max(limit, 0)):
        if any(e[j] != first[j] for e in encoded):
            return j
    return max(limit, 0)


def shareable(model: LoadedModel) -> bool:
    """Whether rows may skip the prefix: not when an added module runs, since a module that
    summarises a whole sequence (WISE's router) would then see only each row's own tokens;
    and not for an encoder-decoder, whose prompt is read by a bidirectional encoder."""
    return not model.stack.additions() and not model.spec.encoder_decoder


def read_prefix(model: LoadedModel, ids: Sequence[int]) -> Any | None:
    """The key/value cache of ``ids``, or None when this model's cache cannot be shared."""
    out = model.forward(body_only=True, input_ids=torch.tensor([list(ids)], device=model.input_device),
                        use_cache=True)
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        log.debug("%s returns no shareable cache; running without a prefix cache", model.name)
        return None
    return cache


def group_by_prefix(
    seqs: Sequence[Sequence[int]], keep: Sequence[int] | int = 1, min_shared: int | None = None,
) -> list[tuple[list[int], int]]:
    """Groups of two or more sequences that begin with the same ``min_shared`` (default
    :data:`MIN_SHARED`) or more tokens: (their indices, the length they share).

    Sequence ``i`` keeps at least ``keep[i]`` tokens of its own. Sorting the sequences
    puts those with a common beginning next to each other; a sequence joins the group
    before it when that saves more tokens than it costs - the group's shared length may
    only shrink by what the newcomer saves, so two memories' groups (1,300 tokens each,
    alike in their first 150) stay apart. Sequences in no group are not returned.
    """
    floor = MIN_SHARED if min_shared is None else min_shared
    keeps = [keep] * len(seqs) if isinstance(keep, int) else list(keep)
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    groups: list[tuple[list[int], int]] = []
    members: list[int] = []
    shared = 0
    for i in order:
        if members:
            first = members[0]
            common = common_prefix_length([seqs[first], seqs[i]], [keeps[first], keeps[i]])
            joined = common if len(members) == 1 else min(shared, common)
            if joined >= floor and (len(members) == 1 or joined >= len(members) * (shared - joined)):
                members.append(i)
                shared = joined
                continue
            if len(members) > 1:
                groups.append((members, shared))
        members, shared = [i], 0
    if len(members) > 1:
        groups.append((members, shared))
    return groups


def prefix_groups(
    model: LoadedModel, seqs: Sequence[Sequence[int]], keep: Sequence[int] | int = 1,
) -> Iterator[tuple[list[int], Any, int]]:
    """(row indices, prefix cache, shared length) for each :func:`group_by_prefix` group of
    ``seqs``, when ``model`` may share prefixes (:func:`shareable`).

    Each group's prefix is read only when the caller reaches it, so a hundred groups never
    hold a hundred caches at once. Nothing is yielded once the model turns out to return no
    shareable cache: the rows the caller has not seen take its ordinary path.
    """
    if len(seqs) < 2 or not shareable(model):
        return
    for rows, shared in group_by_prefix(seqs, keep):
        cache = read_prefix(model, seqs[rows[0]][:shared])
        if cache is None:
            return
        yield rows, cache, shared


def _batch_cache(prefix_cache: Any, rows: int) -> Any:
    cache = copy.deepcopy(prefix_cache)  # the prefix cache is reused by later batches
    cache.batch_repeat_interleave(rows)
    return cache


@torch.inference_mode()
def decode_after_prefix(
    model: LoadedModel, prefix_cache: Any, shared: int, suffixes: list[list[int]], max_new_tokens: int,
    eos: frozenset[int] | set[int], pad_id: int, complete: Callable[[str], bool] | None = None,
) -> list[list[int]]:
    """Greedy new token IDs for each row (prefix + ``suffixes[i]``); a row stops at a stop
    token (not returned) or once ``complete(its text so far)`` (the completing token kept)."""
    base = model.spec.base_model(model.model)
    device = model.input_device
    rows = len(suffixes)
    cache = _batch_cache(prefix_cache, rows)
    ids, mask = pad_left(suffixes, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    attention = torch.cat([torch.ones(rows, shared, dtype=mask.dtype, device=device), mask], dim=1)
    positions = (shared + mask.cumsum(-1) - 1).clamp(min=shared)
    hidden = model.forward(body_only=True, input_ids=ids, attention_mask=attention, position_ids=positions,
                           use_cache=True, **with_cache(base, cache)).last_hidden_state[:, -1]
    last = positions[:, -1]
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    tok = model.tokenizer
    for step in range(max_new_tokens):
        nxt = model.logits(hidden).argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if t in eos:
                done[r] = True
                continue
            generated[r].append(t)
            if complete is not None and complete(tok.decode(generated[r], skip_special_tokens=True)):
                done[r] = True
        if all(done) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones(rows, 1, dtype=attention.dtype, device=device)], dim=1)
        last = last + 1
        hidden = base(input_ids=nxt[:, None].to(device), attention_mask=attention, position_ids=last[:, None],
                      use_cache=True, **with_cache(base, cache)).last_hidden_state[:, -1]
    return generated


@torch.inference_mode()
def score_after_prefix(
    model: LoadedModel, prefix_cache: Any, shared: int, items: Sequence[Any], pad_id: int,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Hidden states at each item's target-predicting positions, for items (``PromptTarget``)
    whose first ``shared`` tokens are the cached prefix; returns (hidden, rows, cols) as
    :func:`lmpatch.eval.scoring._score_batch` gathers them, with cols counted in the suffix."""
    base = model.spec.base_model(model.model)
    device = model.input_device
    suffixes = [list(it.ids[shared:]) for it in items]
    cache = _batch_cache(prefix_cache, len(items))
    ids, mask = pad_right(suffixes, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    attention = torch.cat([torch.ones(len(items), shared, dtype=mask.dtype, device=device), mask], dim=1)
    positions = shared + torch.arange(ids.shape[1], device=device).expand(len(items), -1)
    hidden = model.forward(body_only=True, input_ids=ids, attention_mask=attention, position_ids=positions,
                           use_cache=True, **with_cache(base, cache)).last_hidden_state
    rows, cols = [], []
    for r, it in enumerate(items):
        first = len(it.prompt_ids) - 1 - shared
        rows.extend([r] * len(it.target_ids))
        cols.extend(range(first, first + len(it.target_ids)))
    return hidden, rows, cols
