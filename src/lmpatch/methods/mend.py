"""MEND (Mitchell et al., ICLR 2022): a trained network turns an edit's gradient into the edit.

Editing is one forward/backward pass and a tiny network, no optimisation loop:

1. the edit's fine-tuning gradient at the edited matrices (the gate, up and down
   projections of the top three layers by default, as the paper edits LLaMA's), kept as
   one (input, output-gradient) pair per token (:mod:`lmpatch.methods.token_grads`);
2. each pair through the matrix's :class:`~lmpatch.methods.mend_net.GradientNet`;
3. ΔW = -lr_m * sum_t delta~_t x~_t^T, stored as a low-rank weight delta (rank = the
   edit's tokens; a batch of requests sums into one patch, as in the paper's batched edits).

Training (``lmpatch train mend``, :mod:`lmpatch.methods.editor_training`) makes each
training edit alone from the unedited model and minimises
``c_edit * NLL(new target | edit prompt and paraphrase, edited) + c_loc * KL``
on the record's locality prompt: the paper's objective (it uses the paraphrase only; the
edit prompt is added here because the first metric users read is efficacy), with
KL(unedited || edited) as in the paper or, by choice, symmetric (``locality_kl``).

A trained editor belongs to one base model: its artefact is keyed by the model's
fingerprint and every setting, and ships inside the package for the embedded model.
Editing with an untrained one is an error that names the command to run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.editor_training import TRAINING_DATA, TrainingConfig
from lmpatch.methods.learned_editing import (
    LOCALITY_KL,
    MODULE_KINDS,
    edit_layers,
    edit_modules,
    edit_with_trained,
    layer_params,
    train_learned,
)
from lmpatch.methods.mend_net import GradientNet
from lmpatch.methods.registry import Method, register
from lmpatch.methods.token_grads import TokenFactors
from lmpatch.model.loading import LoadedModel
from lmpatch.model.spec import linear_dims
from lmpatch.patch import Patch
from lmpatch.request import EditRequest

__all__ = ["MendEditor", "MendHparams", "apply_mend", "train_mend"]

METHOD = "mend"


@dataclass(frozen=True)
class MendHparams:
    """Which matrices MEND edits, its network, and how it is trained.

    ``top_layers`` counts from the top (3: the paper's LLaMA setting, layers 27-29 of
    SmolLM2), or ``layers`` names them (lower layers start from a more specific gradient
    but had not closed the neighbourhood gap when tried: docs/learned-editors.md);
    ``modules`` are "mlp_in" (gate and up) and "mlp_out" (down). The training
    fields key the trained artefact together with the architecture fields.
    """

    top_layers: int = 3
    modules: tuple[str, ...] = ("mlp_in", "mlp_out")
    rank: int = 64
    edit_lr: float = 1e-4          # initial per-matrix step size
    lr_lr: float = 1e-4            # Adam lr of the step sizes
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4               # Adam lr of the network
    c_edit: float = 0.1            # the paper's edit weight; locality weighs 50 times as much: at
    c_loc: float = 5.0             # c_loc = 1 the neighbourhood score fell to 0.37 (docs/learned-editors.md)
    seed: int = 0
    #: train on batched edits: each step's ``batch_size`` edits summed into one change, every
    #: prompt scored under the sum (the paper's training for batched editing). Keys the
    #: artefact only when True, so editors trained before the field existed still load.
    batched: bool = field(default=False, metadata={"key_unless": False})
    #: edit exactly these layers instead of the top ``top_layers`` (decoder-only models);
    #: empty keeps the top layers and the artefacts trained before the field existed.
    layers: tuple[int, ...] = field(default=(), metadata={"key_unless": ()})
    #: the locality term: the paper's "forward" KL(unedited || edited), or "symmetric", which
    #: adds KL(edited || unedited) so the edit's new answer is charged for the mass it gains
    #: after a locality prompt (:func:`~lmpatch.methods.learned_editing.locality_divergence`).
    #: Trained with c_loc 1 it raised CounterFact reliability but not the neighbourhood score
    #: (docs/learned-editors.md), so it is not the default and its editor is not shipped.
    locality_kl: str = field(default="forward", metadata={"key_unless": "forward"})

    def check(self) -> None:
        if self.top_layers < 1:
            raise InvalidRequestError(f"MEND top_layers must be at least 1, got {self.top_layers}.")
        unknown = [m for m in self.modules if m not in MODULE_KINDS]
        if unknown or not self.modules:
            raise InvalidRequestError(f"MEND modules must be a non-empty choice of mlp_in, mlp_out; got {self.modules}.")
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise InvalidRequestError("MEND rank, steps and batch_size must be positive.")
        if self.locality_kl not in LOCALITY_KL:
            raise InvalidRequestError(f"MEND locality_kl must be one of {', '.join(LOCALITY_KL)}; got {self.locality_kl!r}.")

    def training(self) -> TrainingConfig:
        return TrainingConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


class MendEditor(nn.Module):
    """The networks (one per matrix shape) and per-matrix step sizes for one base model."""

    def __init__(self, params: Sequence[str], shapes: Sequence[tuple[int, int]], rank: int, edit_lr: float) -> None:
        super().__init__()
        self.params = list(params)
        self.shape_keys = [f"{d_in}x{d_out}" for d_in, d_out in shapes]
        kinds = list(dict.fromkeys(self.shape_keys))
        self.modes = [self.shape_keys[: i].count(k) for i, k in enumerate(self.shape_keys)]
        self.nets = nn.ModuleDict({
            k: GradientNet(*map(int, k.split("x")), modes=self.shape_keys.count(k), rank=rank) for k in kinds
        })
        self.lrs = nn.Parameter(torch.full((len(self.params),), float(edit_lr)))

    def changes(self, requests: Sequence[EditRequest], factors: Sequence[TokenFactors], update_norm: bool = False):
        """(U, D) per edited matrix (the requests' texts are not read: MEND sees only gradients)."""
        return [self.transform(i, f, update_norm) for i, f in enumerate(factors)]

    def transform(self, i: int, factors: TokenFactors, update_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) for matrix ``i``: per row, the edit is ΔW_row = D_row^T U_row."""
        net = self.nets[self.shape_keys[i]]
        mask = factors.mask.unsqueeze(-1).float()
        if update_norm:
            pairs = torch.cat([factors.inputs, factors.grads], -1)[factors.mask]
            net.norm.update(self.modes[i], pairs)
        x, d = net(self.modes[i], factors.inputs, factors.grads)
        return x * mask, -self.lrs[i] * d * mask


def new_editor(model: LoadedModel, hp: MendHparams) -> MendEditor:
    params = layer_params(model, edit_layers(model, hp.top_layers, hp.layers), hp.modules)
    shapes = []
    for m in edit_modules(model, params):
        d_in, d_out = linear_dims(m)
        shapes.append((d_in, d_out))
    with torch.random.fork_rng(devices=[]):  # the initial network is a function of the seed alone
        torch.manual_seed(hp.seed)
        return MendEditor(params, shapes, hp.rank, hp.edit_lr)


def apply_mend(model: LoadedModel, requests: Sequence[EditRequest], hp: MendHparams) -> Patch:
    """All ``requests`` in one MEND call: their transformed gradients summed into one patch."""
    hp.check()
    return edit_with_trained(METHOD, model, requests, hp, lambda: new_editor(model, hp))


def train_mend(model: LoadedModel, hp: MendHparams, show: bool = True) -> dict:
    """``lmpatch train mend``: train (or resume) and save the editor for this model."""
    hp.check()
    editor = new_editor(model, hp).train()
    groups = [{"params": [p for n, p in editor.named_parameters() if n != "lrs"], "lr": hp.lr},
              {"params": [editor.lrs], "lr": hp.lr_lr}]

    def loss(nll: torch.Tensor, kl: torch.Tensor, _editor: nn.Module):
        return hp.c_edit * nll.mean() + hp.c_loc * kl, {}

    return train_learned(METHOD, model, editor, groups, hp, loss, hp.training(), show, together=hp.batched,
                         locality_kl=hp.locality_kl)


register(Method(
    name=METHOD, aliases=("MEND",),
    summary="MEND: a trained network turns the edit's fine-tuning gradient into a low-rank weight change",
    hparams=MendHparams, edit=apply_mend, regimes=frozenset({"single", "batch", "sequential"}),
    paper="Mitchell et al., Fast Model Editing at Scale, ICLR 2022",
    encoder_decoder=True,
    train=train_mend, needs_training=True, training_data=TRAINING_DATA,
))
