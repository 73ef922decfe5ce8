"""KE, KnowledgeEditor (De Cao et al., EMNLP 2021): a hypernetwork conditioned on the edit's text.

A bidirectional LSTM reads the edit - "prompt, old answer >> new answer", as the base
model's own (frozen) token embeddings - and its pooled state h predicts, for each edited
matrix W (d_out x d_in), gates and a bias for the fine-tuning gradient:

    ΔW = s_W · σ(η) · ( (σ(α) γᵀ) ⊙ ∇W  +  σ(β) δᵀ )

with α, β ∈ R^d_out, γ, δ ∈ R^d_in and η from h (the paper's rank-one gating of the
gradient plus a rank-one bias). Because ∇W = Σ_t δ_t x_tᵀ is a sum over tokens, the gated
gradient stays a sum of outer products, Σ_t (σ(α)⊙δ_t)(γ⊙x_t)ᵀ, and the edit is stored
low-rank like MEND's. Two choices are ours and documented as such:

* the gradient factors are standardised per request (divided by their RMS over tokens):
  σ(η) ≤ 1 bounds the step by one gradient, and a raw gradient of a 135M model is far too
  small for that to edit anything; s_W is a learned per-matrix step size instead;
* training follows the paper's constrained form - minimise the edit NLL subject to
  KL(unedited || edited) ≤ ``margin`` on locality prompts - with the Lagrange multiplier
  updated each step (it is part of the checkpoint, so a resumed run is the same run).
  The update is multiplicative, λ ← λ · exp(η · clip((KL − margin) / margin, ±1)), with
  λ kept in [1e-3, ``lagrange_max``]. The plain additive ascent λ += (KL − margin) ran
  away on SmolLM2: early KLs are ~100× the margin, λ reached ~550 within 1,500 steps and
  the editor learned to barely edit (CounterFact efficacy 0.52). The relative, clipped
  step changes λ at most e-fold per 1/η steps whatever the KL's scale.

By default KE edits the down projections of the top three layers (the paper edits a
chosen subset of a model's matrices; its hypernetwork outputs grow with their width).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.editor_training import TRAINING_DATA, TrainingConfig
from lmpatch.methods.learned_editing import (
    MODULE_KINDS,
    edit_modules,
    edit_with_trained,
    top_layer_params,
    train_learned,
)
from lmpatch.methods.registry import Method, register
from lmpatch.methods.token_grads import TokenFactors
from lmpatch.model.loading import LoadedModel
from lmpatch.model.spec import linear_dims
from lmpatch.patch import Patch
from lmpatch.request import EditRequest
from lmpatch.tokens import encode, pad_right

__all__ = ["KEHparams", "KnowledgeEditor", "apply_ke", "train_ke"]

METHOD = "ke"


@dataclass(frozen=True)
class KEHparams:
    """Which matrices KE edits, its hypernetwork, and how it is trained."""

    top_layers: int = 3
    modules: tuple[str, ...] = ("mlp_out",)
    hidden: int = 64               # LSTM state per direction; h has twice this
    step_size: float = 1e-2        # initial s_W
    margin: float = 0.02           # allowed mean KL (nats) on locality answers
    lagrange_lr: float = 0.01      # η of the multiplicative multiplier update (log-space)
    lagrange_max: float = 10.0
    steps: int = 3000
    batch_size: int = 8
    lr: float = 3e-4
    seed: int = 0

    def check(self) -> None:
        unknown = [m for m in self.modules if m not in MODULE_KINDS]
        if unknown or not self.modules:
            raise InvalidRequestError(f"KE modules must be a non-empty choice of mlp_in, mlp_out; got {self.modules}.")
        if self.top_layers < 1 or self.hidden < 1 or self.steps < 1 or self.batch_size < 1:
            raise InvalidRequestError("KE top_layers, hidden, steps and batch_size must be positive.")
        if self.margin <= 0 or self.lagrange_lr < 0 or self.lagrange_max < 1e-3:
            raise InvalidRequestError(
                "KE margin must be positive, lagrange_lr zero or positive and lagrange_max at least 1e-3; "
                f"got {self.margin}, {self.lagrange_lr}, {self.lagrange_max}."
            )

    def training(self) -> TrainingConfig:
        return TrainingConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


def condition_text(request: EditRequest) -> str:
    """What the hypernetwork reads: the prompt, the old answer when known, and the new one."""
    old = f" {request.target_true}" if request.target_true else ""
    return f"{request.prompt}{old} >> {request.target_new}"


class KnowledgeEditor(nn.Module):
    """The conditioning LSTM and one output head per edited matrix."""

    def __init__(self, params: Sequence[str], shapes: Sequence[tuple[int, int]], embed_dim: int, hidden: int,
                 step_size: float) -> None:
        super().__init__()
        self.params = list(params)
        self.shapes = [tuple(s) for s in shapes]
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.mix = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(2 * hidden, 2 * d_out + 2 * d_in + 1) for d_in, d_out in self.shapes])
        for head, (d_in, d_out) in zip(self.heads, self.shapes):
            with torch.no_grad():  # start as a plain (standardised) descent step: γ ≈ -1, no bias
                head.weight.mul_(0.1)
                head.bias.zero_()
                head.bias[d_out : d_out + d_in] = -1.0
        self.log_steps = nn.Parameter(torch.full((len(self.params),), float(torch.tensor(step_size).log())))
        self.register_buffer("lagrange", torch.tensor(1.0))
        self._encode: Callable[[Sequence[EditRequest]], tuple[torch.Tensor, torch.Tensor]] | None = None

    def bind(self, model: LoadedModel) -> "KnowledgeEditor":
        """Read edit texts with ``model``'s tokenizer and frozen input embeddings (not saved with the editor)."""
        tok, emb = model.tokenizer, model.model.get_input_embeddings()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def encode_texts(requests: Sequence[EditRequest]):
            ids, mask = pad_right([encode(tok, condition_text(r)) for r in requests], pad)
            with torch.no_grad():
                vectors = emb(ids.to(emb.weight.device)).float().cpu()
            return vectors, mask

        self._encode = encode_texts
        return self

    def condition(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        if self._encode is None:
            raise RuntimeError("KnowledgeEditor.bind(model) must be called before editing.")
        vectors, mask = self._encode(requests)
        states, _ = self.lstm(vectors)
        m = mask.unsqueeze(-1).float()
        return self.mix((states * m).sum(1) / m.sum(1))

    def changes(self, requests: Sequence[EditRequest], factors: Sequence[TokenFactors], update_norm: bool = False):
        """(U, D) per matrix, one row per token plus one for the bias (see the module doc)."""
        h = self.condition(requests)
        out = []
        for i, (f, head, (d_in, d_out)) in enumerate(zip(factors, self.heads, self.shapes)):
            alpha, gamma, beta, delta, eta = head(h).split([d_out, d_in, d_out, d_in, 1], dim=-1)
            mask = f.mask.unsqueeze(-1).float()
            x = f.inputs * mask
            g = f.grads * mask
            x = x / x.square().sum((1, 2), keepdim=True).div(mask.sum((1, 2), keepdim=True) * d_in).sqrt().clamp_min(1e-12)
            g = g / g.square().sum((1, 2), keepdim=True).div(mask.sum((1, 2), keepdim=True) * d_out).sqrt().clamp_min(1e-12)
            scale = (self.log_steps[i].exp() * torch.sigmoid(eta)).unsqueeze(1)         # (rows, 1, 1)
            u = torch.cat([x * gamma.unsqueeze(1), delta.unsqueeze(1)], dim=1)
            d = scale * torch.cat([g * torch.sigmoid(alpha).unsqueeze(1), torch.sigmoid(beta).unsqueeze(1)], dim=1)
            out.append((u, d))
        return out


def new_editor(model: LoadedModel, hp: KEHparams) -> KnowledgeEditor:
    params = top_layer_params(model, hp.top_layers, hp.modules)
    shapes = [linear_dims(m) for m in edit_modules(model, params)]
    embed_dim = model.model.get_input_embeddings().weight.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        return KnowledgeEditor(params, shapes, embed_dim, hp.hidden, hp.step_size).bind(model)


def apply_ke(model: LoadedModel, requests: Sequence[EditRequest], hp: KEHparams) -> Patch:
    """All ``requests`` in one KE call, summed into one patch."""
    hp.check()
    return edit_with_trained(METHOD, model, requests, hp, lambda: new_editor(model, hp))


def next_multiplier(lagrange: torch.Tensor, kl: torch.Tensor, hp: KEHparams) -> torch.Tensor:
    """λ after one step: grows while the KL exceeds the margin, shrinks while it is below,
    by at most a factor exp(η) per step (see the module doc)."""
    step = ((kl - hp.margin) / hp.margin).clamp(-1.0, 1.0) * hp.lagrange_lr
    return (lagrange * step.exp()).clamp(1e-3, hp.lagrange_max)


def train_ke(model: LoadedModel, hp: KEHparams, show: bool = True) -> dict:
    """``lmpatch train ke``: train (or resume) the hypernetwork for this model."""
    hp.check()
    editor = new_editor(model, hp).train()
    groups = [{"params": list(editor.parameters()), "lr": hp.lr}]

    def loss(nll: torch.Tensor, kl: torch.Tensor, net: nn.Module):
        total = nll.mean() + net.lagrange.clone() * (kl - hp.margin)
        with torch.no_grad():  # multiplicative dual ascent on the KL constraint's multiplier
            net.lagrange.copy_(next_multiplier(net.lagrange, kl.detach(), hp))
        return total, {"lagrange": float(net.lagrange)}

    return train_learned(METHOD, model, editor, groups, hp, loss, hp.training(), show)


register(Method(
    name=METHOD, aliases=("KE", "knowledge-editor"),
    summary="KE: a hypernetwork reads the edit's text and gates the fine-tuning gradient into a weight change",
    hparams=KEHparams, edit=apply_ke, regimes=frozenset({"single", "batch", "sequential"}),
    paper="De Cao et al., Editing Factual Knowledge in Language Models, EMNLP 2021",
    encoder_decoder=True,
    train=train_ke, needs_training=True, training_data=TRAINING_DATA,
))
