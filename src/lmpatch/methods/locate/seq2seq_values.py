"""ROME's value optimisation for an encoder-decoder (T5): the vector is added in the encoder.

The subject is part of the prompt, and only the encoder reads the prompt, so ROME's edit
point on T5 is an encoder MLP at the subject's last token (as in the ROME-on-T5
experiments of the knowledge-editing literature). Its value v* is optimised with ROME's
objective: the target's NLL read from the decoder under every context template, the KL of
the decoder's first-token distribution on "{subject} is a" prompts, the weight decay
‖δ‖ / ‖v_init‖² and the norm clamp (:class:`lmpatch.methods.locate.values.ValueConfig`).

What the decoder-only path does to be fast does not carry over and is left out: the
encoder is bidirectional, so adding δ at the subject changes every encoder position and
there is no prefix to cache; each step runs the whole model, in float32 (``compute_dtype``
is not used). Only the ``mlp_out`` target (ROME, r-ROME) is supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.delta_steps import make_stepper
from lmpatch.methods.locate.keys import read_at
from lmpatch.model.forced import forced_inputs, pair_ids
from lmpatch.model.hooks import edit_output
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest
from lmpatch.tokens import PromptTarget, encode, subject_last_index


def optimize_value_seq2seq(model: LoadedModel, request: EditRequest, layer: int, templates: list[str], config):
    """ROME's v* at encoder layer ``layer``'s MLP output (see the module doc); returns a
    :class:`lmpatch.methods.locate.values.ValueResult`."""
    from lmpatch.methods.locate.values import ValueResult

    spec = model.spec
    layer = spec.prompt_layer(layer)
    if config.target != "mlp_out":
        raise LmpatchError(
            f"On encoder-decoder models the value is optimised at an encoder MLP's output (ROME); "
            f"target {config.target!r} (MEMIT-style methods) is not supported there."
        )
    tok = model.tokenizer
    texts = [model.format_prompt(t.format(request.prompt)) for t in templates]
    items = [pair_ids(model, text, request.target_new) for text in texts]
    subject = [subject_last_index(tok, t, request.subject, start=max(t.find(request.prompt), 0)) for t in texts]
    kl_texts = [model.format_prompt(k.format(request.subject)) for k in config.kl_prompts]
    # A KL row feeds only the decoder's start token; its one-token "target" is never read.
    items += [PromptTarget(tuple(encode(tok, t)), (0,)) for t in kl_texts]
    subject += [subject_last_index(tok, t, request.subject) for t in kl_texts]
    batch = forced_inputs(model, items)
    device = model.input_device
    inputs = batch.kwargs(device)
    n_rewrite = len(texts)

    module = spec.mlp_out(model.model, layer)
    at = torch.tensor(subject, dtype=torch.long)
    keys, outs = read_at(model, at, module, [module], spec.block(model.model, layer),
                         input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    v_init = outs[0][0]
    v_norm = v_init.norm()

    rows, cols, tokens, weights = [], [], [], []
    for r, it in enumerate(items[:n_rewrite]):
        for j, t in enumerate(it.target_ids):
            rows.append(r)
            cols.append(batch.first[r] + j)
            tokens.append(t)
            weights.append(1.0 / (len(it.target_ids) * n_rewrite))
    kl_rows = list(range(n_rewrite, len(items)))
    read_rows = torch.tensor(rows + kl_rows, device=device)
    read_cols = torch.tensor(cols + [0] * len(kl_rows), device=device)
    tokens_t = torch.tensor(tokens, device=device)
    weights_t = torch.tensor(weights, device=device)
    at_dev = at.to(device)
    row_index = torch.arange(len(items), device=device)

    stepper = make_stepper(config, (1, 1, spec.hidden_size), v_norm.reshape(1, 1).to(device), device)
    box: dict[str, torch.Tensor] = {}

    def add_delta(y: torch.Tensor) -> torch.Tensor:
        y3 = y.reshape(len(items), -1, y.shape[-1])
        bump = torch.zeros_like(y3)
        bump[row_index, at_dev] = box["delta"][0, 0].to(y.dtype)
        return (y3 + bump).reshape(y.shape)

    losses: list[float] = []
    kl_init = None
    prob = 0.0
    with edit_output(module, add_delta), torch.inference_mode(False), torch.enable_grad():
        for step in range(config.steps):
            trial = box["delta"] = stepper.trial()
            delta = trial[0, 0]
            out = model.forward(body_only=True, **inputs)
            logp = torch.log_softmax(model.logits(out.last_hidden_state[read_rows, read_cols]).float(), dim=-1)
            picked = logp[: len(rows)].gather(1, tokens_t[:, None])[:, 0]
            kl_logp = logp[len(rows):]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            nll = -(picked * weights_t).sum()
            kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1).mean() if kl_rows else 0.0
            loss = nll + config.kl_factor * kl + config.weight_decay * delta.norm() / v_norm ** 2
            losses.append(float(loss.detach()))
            prob = float((picked.detach().exp() * weights_t).sum())
            if loss.item() < config.stop_loss or step == config.steps - 1:
                best = stepper.best(0, trial, losses[-1])[0]
                break
            stepper.zero_grad()
            loss.backward()
            stepper.observe(trial, loss.detach().reshape(1))
    return ValueResult(
        delta=best.clone(), v_init=v_init, key_prompt=keys[0].clone(), key_mean=keys[:n_rewrite].mean(0),
        steps=len(losses), losses=losses, target_prob=prob,
    )
