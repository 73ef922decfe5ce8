"""Causal tracing of a scalar signal through the MLPs (Meng et al. 2022, as LSDM uses it).

Which MLPs carry what a subject contributes to the next word? Run each prompt three
ways: clean; with the subject's token embeddings corrupted by Gaussian noise; and
corrupted but with one layer's MLP output at the subject's last token put back to its
clean value. The share of the clean signal that restoring layer l brings back is that
layer's *indirect effect*. LSDM (Cai et al. 2024) traces the gender signal of a
profession, ``log P(he) - log P(she)``, and edits the layers with the largest effect.

Everything runs batched over prompts, one forward pass per (noise sample, layer), on
the real model in float32; the blocks below the restored layer are replayed from the
corrupted run, so a layer's pass costs only the blocks from it up. The noise is seeded
so a trace is reproducible.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmpatch.errors import LmpatchError
from lmpatch.model.hooks import capture_output, edit_output, record_outputs, replay_outputs
from lmpatch.model.loading import LoadedModel
from lmpatch.tokens import encode, pad_right, subject_last_index

#: reads the signal from next-token log-probabilities: (rows, vocab) -> (rows,)
Signal = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TraceConfig:
    noise_scale: float = 3.0   # noise std, in stds of the embedding matrix (ROME: 3x the subjects' std)
    samples: int = 3           # noise draws per prompt
    seed: int = 0
    batch_size: int = 64


@dataclass
class Trace:
    """Per-layer indirect effects, and the clean and corrupted signals they are read against."""

    effects: list[float]       # share of |clean - corrupted| restored by each layer's MLP
    clean: float               # mean clean signal
    corrupted: float           # mean corrupted signal
    n_prompts: int

    def best_window(self, width: int, lo: int = 0, hi: int | None = None) -> list[int]:
        """The ``width`` consecutive layers within [lo, hi] with the largest summed effect."""
        hi = len(self.effects) - 1 if hi is None else hi
        if width < 1 or hi - lo + 1 < width:
            raise LmpatchError(f"Cannot choose {width} consecutive layers between {lo} and {hi}.")
        sums = [sum(self.effects[s : s + width]) for s in range(lo, hi - width + 2)]
        start = lo + max(range(len(sums)), key=sums.__getitem__)
        return list(range(start, start + width))


def _rows(model: LoadedModel, prompts: Sequence[tuple[str, str]]):
    tok = model.tokenizer
    ids, spans = [], []
    for text, subject in prompts:
        shown = model.format_prompt(text)
        start = shown.find(text)
        pos = shown.find(subject, max(start, 0))
        if pos < 0:
            raise LmpatchError(f"Subject {subject!r} not found in {text!r}.")
        first = subject_last_index(tok, shown, subject[0], start=pos)
        last = subject_last_index(tok, shown, subject, start=pos)
        ids.append(encode(tok, shown))
        spans.append((first, last))
    return ids, spans


@torch.no_grad()
def trace_mlp_effects(
    model: LoadedModel, prompts: Sequence[tuple[str, str]], signal: Signal, config: TraceConfig = TraceConfig(),
) -> Trace:
    """Indirect effect of each layer's MLP at the subject's last token on ``signal``.

    ``prompts`` are (text, subject) pairs; the signal is read at each text's last token.
    The effect of layer l is Σ (s_l - s_*)·sign(s_c - s_*) / Σ |s_c - s_*| over prompts
    and noise draws: 1 when restoring that MLP alone brings the clean signal back.
    """
    if not prompts:
        raise LmpatchError("Causal tracing needs at least one prompt.")
    spec = model.spec
    net = model.model
    emb = spec.module(net, spec.embed)
    sigma = float(emb.weight.float().std())
    n_layers = len(spec.layers)
    ids, spans = _rows(model, prompts)
    gen = torch.Generator().manual_seed(config.seed)
    restored = torch.zeros(n_layers, dtype=torch.float64)
    total = 0.0
    clean_sum = corrupt_sum = 0.0
    dev = model.device
    for b in range(0, len(ids), config.batch_size):
        chunk = list(range(b, min(b + config.batch_size, len(ids))))
        input_ids, mask = pad_right([ids[i] for i in chunk], model.tokenizer.pad_token_id or 0)
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        last_pos = mask.sum(-1) - 1
        rows = torch.arange(len(chunk), device=dev)
        subj_last = torch.tensor([spans[i][1] for i in chunk], device=dev)
        subj_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
        for r, i in enumerate(chunk):
            subj_mask[r, spans[i][0] : spans[i][1] + 1] = True
        subj_mask = subj_mask.to(dev)

        def run() -> torch.Tensor:
            out = model.forward(input_ids=input_ids, attention_mask=mask, use_cache=False, body_only=True)
            logits = model.logits(out.last_hidden_state[rows, last_pos])
            return signal(torch.log_softmax(logits.float(), dim=-1)).double().cpu()

        stores: list[list] = [[] for _ in range(n_layers)]
        with ExitStack() as stack:
            for layer in range(n_layers):
                stack.enter_context(capture_output(spec.mlp_out(net, layer), stores[layer]))
            clean = run()
        clean_mlp = [_at(store[0], len(chunk), rows, subj_last) for store in stores]
        for _ in range(config.samples):
            noise = torch.randn(*input_ids.shape, spec.hidden_size, generator=gen) * (config.noise_scale * sigma)
            noise = (noise * subj_mask.cpu()[..., None]).to(dev)

            def corrupt(y: torch.Tensor) -> torch.Tensor:
                return y + noise.to(y.dtype)

            blocks = [spec.block(net, layer) for layer in range(n_layers)]
            recorded: list = []
            with edit_output(emb, corrupt):
                with record_outputs(blocks, recorded):
                    base = run()
                direction = torch.sign(clean - base)
                total += float((clean - base).abs().sum())
                clean_sum += float(clean.sum())
                corrupt_sum += float(base.sum())
                for layer in range(n_layers):
                    # the blocks below ``layer`` see exactly the corrupted run's inputs: replay them
                    with replay_outputs(blocks[:layer], recorded[:layer]), \
                            edit_output(spec.mlp_out(net, layer), _restorer(clean_mlp[layer], rows, subj_last)):
                        out = run()
                    restored[layer] += float(((out - base) * direction).sum())
    n = len(ids) * config.samples
    effects = (restored / total).tolist() if total > 0 else [0.0] * n_layers
    return Trace(effects=[round(e, 6) for e in effects], clean=clean_sum / n, corrupted=corrupt_sum / n, n_prompts=len(ids))


def _at(out: torch.Tensor, n_rows: int, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One recorded MLP output (some architectures flatten batch and sequence) at ``pos`` per row."""
    y = out.reshape(n_rows, -1, out.shape[-1])
    return y[rows, pos].clone()


def _restorer(clean: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor):
    def put_back(y: torch.Tensor) -> torch.Tensor:
        y3 = y.reshape(clean.shape[0], -1, y.shape[-1]).clone()
        y3[rows, pos] = clean.to(y3.dtype)
        return y3.reshape(y.shape)

    return put_back


def pronoun_gap(model: LoadedModel, first: str = " he", second: str = " she") -> Signal:
    """The signal log P(first) - log P(second) (first token of each word)."""
    a = encode(model.tokenizer, first, special=False)
    b = encode(model.tokenizer, second, special=False)
    if not a or not b:
        raise LmpatchError(f"Cannot tokenise the pronouns {first!r} and {second!r}.")

    def gap(logp: torch.Tensor) -> torch.Tensor:
        return logp[:, a[0]] - logp[:, b[0]]

    return gap
