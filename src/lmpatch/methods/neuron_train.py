"""What training added FFN neurons needs, shared by T-Patcher and CaliNET.

Both editors train a few neurons at the top of the model while the model stays frozen.
The blocks below the lowest trained layer see the same input at every step, so one
no-grad pass records their outputs and every step replays them (only the top blocks
run). The neurons are hooked on their MLP exactly as the patch stack will hook them,
so what is trained is what is applied.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from lmpatch.methods.teacher import TargetBatch
from lmpatch.model.hooks import capture_input, record_outputs, replay_outputs, run_until
from lmpatch.model.loading import LoadedModel
from lmpatch.tokens import encode, pad_right


@contextmanager
def hooked(hosts: Sequence[nn.Module], modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run each module's ``hook`` on its host's output, as the patch stack does."""
    handles = [h.register_forward_hook(m.hook, with_kwargs=True) for h, m in zip(hosts, modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def record_below(model: LoadedModel, layer: int, batch: TargetBatch, hosts: Sequence[nn.Module]):
    """One no-grad pass over ``batch``: the outputs of the blocks below ``layer`` (to replay)
    and the input of each host module, (rows, tokens, d) float32."""
    spec = model.spec
    blocks = [spec.block(model.model, i) for i in range(layer)]
    recorded: list = []
    inputs: list[list] = [[] for _ in hosts]
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(record_outputs(blocks, recorded))
        for host, store in zip(hosts, inputs):
            stack.enter_context(capture_input(host, store))
        model.forward(body_only=True, **batch.inputs(model.input_device))
    rows = batch.input_ids.shape[0]
    xs = [store[0].reshape(rows, -1, store[0].shape[-1]).float() for store in inputs]
    return blocks, recorded, xs


@contextmanager
def replaying(blocks: list[nn.Module], recorded: list) -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad(), replay_outputs(blocks, recorded):
        yield


def nll_and_fixed(model: LoadedModel, batch: TargetBatch) -> tuple[torch.Tensor, bool]:
    """The teacher-forced target loss (as :func:`lmpatch.methods.teacher.target_nll`) and
    whether every supervised token is already the model's top prediction."""
    out = model.forward(body_only=True, **batch.inputs(model.input_device))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = hidden[batch.pos_rows.to(hidden.device), batch.pos_cols.to(hidden.device)]
    logp = torch.log_softmax(model.logits(h).float(), dim=-1)
    rows = logp[batch.pick.to(logp.device)]
    tokens = batch.tokens.to(logp.device)
    picked = rows.gather(1, tokens[:, None])[:, 0]
    fixed = bool((rows.argmax(dim=-1) == tokens).all())
    return -(picked * batch.weights.to(logp.device)).sum(), fixed


def host_inputs(model: LoadedModel, host: nn.Module, texts: Sequence[str], batch_size: int = 32,
                last_only: bool = False) -> list[torch.Tensor]:
    """The input of ``host`` at every token of each text (or only the last): one
    (tokens, d) float32 CPU tensor per text, empty for an empty text.

    Texts are run as given (callers format prompts); each pass stops at ``host``."""
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    d = model.spec.hidden_size
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        seqs = [tuple(encode(tok, t)) for t in texts[start:start + batch_size]]
        kept = [s for s in seqs if s]
        x = None
        if kept:
            ids, mask = pad_right(kept, pad_id)
            store: list = []
            with torch.no_grad(), capture_input(host, store):
                run_until(lambda **kw: model.forward(body_only=True, **kw), host,
                          input_ids=ids.to(model.input_device), attention_mask=mask.to(model.input_device),
                          use_cache=False)
            x = store[0].reshape(len(kept), -1, d).float().cpu()
        row = 0
        for s in seqs:
            if not s:
                out.append(torch.zeros(0, d))
                continue
            out.append(x[row, len(s) - 1:len(s)].clone() if last_only else x[row, :len(s)].clone())
            row += 1
    return out
