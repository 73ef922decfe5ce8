"""The hyperparameters every locate-and-edit method shares: value optimisation, context
templates and key statistics.

ROME, MEMIT and the methods built on MEMIT (PMET, EMMET, AlphaEdit) all optimise a target
vector with the same loop (:mod:`~lmpatch.methods.locate.values`), over the same kind of
context templates, and whiten keys with the same second-moment statistics. Declaring those
fields once keeps their names, types and meaning identical across methods, so ``--set
v_lr=…`` means one thing everywhere; each method only states its own *defaults* (by
re-declaring a field) and the fields that are its own (layers, λ, solve form…).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmpatch.errors import LmpatchError
from lmpatch.methods.locate.templates import TemplateConfig
from lmpatch.methods.locate.values import ValueConfig


@dataclass(frozen=True)
class LocateHparams:
    """Value optimisation (``v_*``, clamp, KL, stop rules), templates and statistics."""

    v_optimizer: str = "adam"         # "adam" (the papers) or "lbfgs" (locate.delta_steps)
    v_lr: float = 0.5                 # Adam's learning rate
    v_first_step: float = 1.0         # L-BFGS's first step, in units of ||v_init||
    v_steps: int = 25                 # passes (forward + backward) at most
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2
    stop_prob: float | None = None    # None: stop on ``stop_loss`` only (ROME)
    template_lengths: tuple[tuple[int, int], ...] = ((5, 3), (10, 2))
    template_seed: int = 0
    mom2_adjustment: bool = True      # use C0 (the papers); False: C0 = I, no statistics needed
    stats_corpus: str = "wikitext-2-raw"
    stats_tokens: int = 100_000
    compute_dtype: str = "auto"       # optimisation passes; "auto" = bfloat16 where fast, see model.shadow

    #: Where the optimised vector is added (see ``ValueConfig.target``): ROME's MLP output,
    #: MEMIT's block output, PMET's attention and MLP outputs.
    value_target: ClassVar[str] = "mlp_out"

    def __post_init__(self) -> None:
        # Checked here, under the names a user sets, before any work: a zero step budget
        # used to surface as an IndexError deep in the optimisation, and stats_tokens as
        # StatsConfig.n_tokens, a name no user typed.
        for name in ("v_steps", "stats_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmpatchError(f"{name} must be a whole number >= 1, got {value!r}.")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise LmpatchError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if any(not (length >= 1 and count >= 1) for length, count in self.template_lengths):
            raise LmpatchError(f"template_lengths holds (tokens, count) pairs of whole numbers >= 1, "
                               f"got {self.template_lengths!r}.")

    def value_config(self) -> ValueConfig:
        return ValueConfig(
            lr=self.v_lr, steps=self.v_steps, weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor, stop_loss=self.stop_loss,
            stop_prob=self.stop_prob, compute_dtype=self.compute_dtype, target=self.value_target,
            optimizer=self.v_optimizer, first_step=self.v_first_step,
        )

    def template_config(self) -> TemplateConfig:
        return TemplateConfig(lengths=self.template_lengths, seed=self.template_seed)
