"""The fine-tuning gradient of an edit, kept as per-token factors, and edits applied per row.

For a linear map y = W x applied at every token, the gradient of a loss is a sum of
rank-one terms, one per token: dL/dW = sum_t delta_t x_t^T, with x_t the map's input and
delta_t = dL/dy_t. Editors that learn from gradients (MEND transforms each pair, KE
gates the sum) need those factors rather than the summed matrix: 2 x 20 vectors instead
of a 576 x 1536 matrix, and the pairs are what MEND's network reads.

:func:`gradient_factors` runs the model once on an edit's teacher-forced target (the
``target_new`` loss of :mod:`lmpatch.methods.teacher`) and returns, for each chosen map,
the inputs and output-gradients of every token that can carry gradient. No parameter
needs ``requires_grad``: each chosen map's output is made a leaf that records gradient,
so backward runs only through the layers above the first chosen one.

:func:`row_deltas` adds a different low-rank weight change to each row of a batch while
the model runs, y_r += (x_r U_r^T) D_r, so a training step can try B independent edits
in one forward pass without ever forming a weight matrix. Gradients flow into U and D.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from lmpatch.methods.teacher import TARGET_NEW, TargetBatch, request_nll, target_batch
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest

__all__ = ["TokenFactors", "gradient_factors", "row_deltas", "token_mask"]


@dataclass
class TokenFactors:
    """One map's per-token gradient factors for a batch of edits (rows), zero-padded.

    ``inputs`` (rows, T, d_in), ``grads`` (rows, T, d_out) and ``mask`` (rows, T): True
    where the token can carry gradient (a real token before the last target token).
    sum_t grads[r, t] inputs[r, t]^T is the gradient of row r's loss for this map.
    """

    inputs: torch.Tensor
    grads: torch.Tensor
    mask: torch.Tensor

    def gradient(self, row: int | None = None) -> torch.Tensor:
        """The summed (d_out, d_in) gradient of one row, or of all rows together."""
        m = self.mask.unsqueeze(-1).to(self.inputs.dtype)
        x, d = self.inputs * m, self.grads * m
        if row is not None:
            return d[row].T @ x[row]
        return torch.einsum("rto,rti->oi", d, x)


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that can carry gradient under a teacher-forced loss on right-padded rows:
    real tokens except each row's last, whose output predicts nothing that is scored."""
    lengths = attention_mask.sum(-1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1]).unsqueeze(0)
    return positions < lengths - 1


def gradient_factors(
    model: LoadedModel, modules: Sequence[nn.Module], requests: Sequence[EditRequest],
    batch: TargetBatch | None = None, compute_dtype: torch.dtype | None = None,
) -> tuple[list[TokenFactors], torch.Tensor]:
    """Per-token (input, output-gradient) pairs at ``modules`` for each request's NLL of
    its new target; also returns each request's loss.

    Each row's loss is the mean NLL over its target tokens, and the rows' losses are
    summed, so a row's factors do not depend on what else is in the batch. ``batch`` is
    the requests' ``target_new`` batch when the caller has built it already. The pass
    runs in ``compute_dtype`` (:meth:`LoadedModel.forward`), so ``modules`` must be those
    of ``model.network(compute_dtype)``; the factors come back in float32.
    """
    batch = batch if batch is not None else target_batch(model, list(requests), TARGET_NEW)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(_mod, args, out):
            inputs[i] = args[0].detach()
            if not out.requires_grad:  # the lowest chosen map: start the graph here
                out = out.detach().requires_grad_(True)
            outputs[i] = out
            return out
        return hook

    with ExitStack() as stack, torch.inference_mode(False), torch.enable_grad():
        for i, m in enumerate(modules):
            handle = m.register_forward_hook(hook_for(i))
            stack.callback(handle.remove)
        losses = request_nll(model, batch, compute_dtype)
        grads = torch.autograd.grad(losses.sum(), [outputs[i] for i in range(len(modules))], allow_unused=True)
    factors = []
    for i, (g, mask) in enumerate(zip(grads, _token_masks(model, modules, batch))):
        rows, width = mask.shape
        # (rows, tokens, d) also where a block flattens its tokens before the MLP (OPT)
        x = inputs[i].reshape(rows, width, -1)
        g = torch.zeros(rows, width, outputs[i].shape[-1], dtype=x.dtype) if g is None else g.detach()
        factors.append(TokenFactors(inputs=x.float(), grads=g.reshape(rows, width, -1).float(), mask=mask))
    return factors, losses.detach()


def _token_masks(model: LoadedModel, modules: Sequence[nn.Module], batch: TargetBatch) -> list[torch.Tensor]:
    """Each module's :func:`token_mask`. In an encoder-decoder every real token carries
    gradient: each encoder token is read by the whole target, and each decoder input
    (the start token, then the target but its last) predicts a target token."""
    if batch.decoder_attention_mask is None:
        return [token_mask(batch.attention_mask)] * len(modules)
    spec = model.spec
    in_encoder = {id(m) for m in spec.module(model.model, spec.encoder).modules()}
    enc, dec = batch.attention_mask.bool(), batch.decoder_attention_mask.bool()
    return [enc if id(m) in in_encoder else dec for m in modules]


@contextmanager
def row_deltas(modules: Sequence[nn.Module], changes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """While inside, module i adds (x U^T) D to each row's output, with (U, D) = ``changes[i]``:
    U (rows, k, d_in) and D (rows, k, d_out), i.e. the weight change D^T U for that row
    (zero rows of U or D contribute nothing). Works under autograd."""

    def hook_for(u: torch.Tensor, d: torch.Tensor):
        def hook(_mod, args, out):
            x = args[0].reshape(u.shape[0], -1, u.shape[-1])  # OPT's MLP sees (rows * tokens, d)
            change = torch.bmm(torch.bmm(x.to(u.dtype), u.transpose(1, 2)), d)
            return out + change.reshape(out.shape).to(out.dtype)
        return hook

    with ExitStack() as stack:
        for m, (u, d) in zip(modules, changes):
            handle = m.register_forward_hook(hook_for(u, d))
            stack.callback(handle.remove)
        yield
