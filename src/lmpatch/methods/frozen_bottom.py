"""Hidden states below the edited layers, computed once per text and replayed.

An editor that only changes layers ``layer`` and up cannot change what the layers below
compute. Training such an editor (MEND edits the top three of thirty layers) runs the
same training texts through the model every epoch, several times per step (to read the
gradient, then to score the edited model, then for locality before and after); keeping
the state that enters ``layer`` for each text and replaying it makes each pass cost the
top layers only - about a tenth of the model for SmolLM2.

States are kept per token sequence. Right padding never changes a real token's state
(causal attention: a token never sees what follows it), so a text's state is the same in
every batch it is padded into.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import torch

from lmpatch.model.hooks import capture_output, replay_outputs, run_until
from lmpatch.model.loading import LoadedModel

__all__ = ["FrozenBottom", "replaying_batch"]


class FrozenBottom:
    """The state entering block ``layer`` for each token sequence seen, in float32.

    ``max_states`` bounds how many sequences are kept (None: all): past it the ones kept
    longest go first, never one the current pass needs. A bottom that outlives one call
    (UltraEdit's ``refresh``) would otherwise grow with the stream.

    ``compute_dtype`` is that of the passes it serves (:meth:`LoadedModel.forward`): the
    states are computed by, and replayed into, the module that runs in it."""

    def __init__(self, model: LoadedModel, layer: int, max_states: int | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        if layer < 1:
            raise ValueError("Nothing lies below layer 0 to replay.")
        if max_states is not None and max_states < 1:
            raise ValueError(f"max_states must be at least 1 or None, got {max_states!r}.")
        self.model = model
        self.layer = layer
        self.max_states = max_states
        self.compute_dtype = compute_dtype
        net = model.network(compute_dtype)
        self.blocks = [model.spec.block(net, i) for i in range(layer)]
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
        return [tuple(row[: int(n)].tolist()) for row, n in zip(ids, mask.sum(-1))]

    @torch.no_grad()
    def _fill(self, ids: torch.Tensor, mask: torch.Tensor, rows: list[tuple[int, ...]]) -> None:
        missing = [r for r, key in enumerate(rows) if key not in self.states]
        if not missing:
            return
        store: list = []
        sel = torch.tensor(missing)
        with capture_output(self.blocks[-1], store):
            run_until(self.model.forward, self.blocks[-1], compute_dtype=self.compute_dtype, body_only=True, input_ids=ids[sel],
                      attention_mask=mask[sel], use_cache=False)
        out = store[0][0] if isinstance(store[0], tuple) else store[0]
        for j, r in enumerate(missing):
            self.states[rows[r]] = out[j, : len(rows[r])].float().clone()
        self._evict(set(rows))

    def _evict(self, needed: set[tuple[int, ...]]) -> None:
        """Drop the longest-kept states past ``max_states``, keeping those in ``needed``."""
        if self.max_states is None or len(self.states) <= self.max_states:
            return
        excess = len(self.states) - self.max_states
        for key in [k for k in self.states if k not in needed][:excess]:
            del self.states[key]

    @contextmanager
    def replaying(self, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """While inside, a forward over exactly (``ids``, ``mask``) - right-padded - skips
        the blocks below ``layer``: they return the kept states (computed now if new)."""
        rows = self._rows(ids, mask)
        self._fill(ids, mask, rows)
        dtype = next(self.blocks[0].parameters()).dtype
        hidden = torch.zeros(ids.shape[0], ids.shape[1], self.states[rows[0]].shape[-1], dtype=dtype)
        for r, key in enumerate(rows):
            hidden[r, : len(key)] = self.states[key]
        with replay_outputs(self.blocks, [hidden] * len(self.blocks)):
            yield


def replaying_batch(bottom: FrozenBottom | None, batch) -> AbstractContextManager[None]:
    """``bottom.replaying`` over a batch's ``input_ids`` and ``attention_mask``; a plain pass
    without a bottom (an edit that reaches layer 0 has nothing below it to keep)."""
    return bottom.replaying(batch.input_ids, batch.attention_mask) if bottom is not None else nullcontext()
