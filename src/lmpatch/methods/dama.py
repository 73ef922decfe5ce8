"""DAMA (Limisiewicz et al., ICLR 2024): project the gender direction out of MLP outputs.

For prompts that stop where a pronoun about a profession comes next ("The surgeon
laughed because"), DAMA asks, at each edited layer, which vector added to that layer's
MLP output at the prompt's last token makes the model say "he", and which makes it say
"she" (ROME's value optimisation, :mod:`lmpatch.methods.locate.values`). Their
difference ``v_he - v_she`` is the gender contrast the layer could write. A partial
least squares regression between what the layer does write there (``W u`` for the
key ``u``, whitened by the key statistics as ROME whitens keys) and that contrast finds
the ``nullspace_dimension`` output directions along which the layer's outputs covary
with gender; the layer's output projection is then followed by the projection that
removes them, ``W <- (I - P) W``. Layers are edited bottom-up, each one's contrasts
computed on the model with the layers below already projected (DAMA's "iterative"
update), or, with ``update="mixed"`` (also DAMA's), the contrasts are optimised once in
the residual stream after the top layer and only the keys are read again per layer: one
value optimisation instead of one per layer.

Each layer's change is ``-Q Qᵀ W`` for an orthonormal basis Q of the removed
directions: a rank-``nullspace_dimension`` weight delta, so the patch reverts exactly.

As a plain edit method, DAMA reads each request's filled prompt and ignores its target:
the contrast is always ``contrast`` ("he" against "she"); ``lmpatch debias`` feeds it
DAMA's own training prompts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.methods.locate.batch import key_rows, read_state, weight_delta
from lmpatch.methods.locate.hparams import LocateHparams
from lmpatch.methods.locate.prepare import locate_one_offs
from lmpatch.methods.locate.solve import KeyCovariance, layer_covariances
from lmpatch.methods.locate.templates import context_templates
from lmpatch.methods.locate.values import optimize_values
from lmpatch.methods.memit import edit_layers
from lmpatch.methods.registry import Method, register
from lmpatch.model.loading import LoadedModel
from lmpatch.model.spec import from_param_layout
from lmpatch.patch import Patch, WeightDelta, compose
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)

# DAMA's λ for LLaMA-7B was 20,000 against 2,409 training prompts: the whitening
# (λ·C0 + UᵀU)⁻¹ weighs the corpus statistics against the prompts' own keys, so λ is
# kept in proportion to the number of prompts.
DAMA_LAMBDA, DAMA_PROMPTS = 20_000.0, 2_409
UPDATES = ("iterative", "mixed")


@dataclass(frozen=True)
class DAMAHparams(LocateHparams):
    """DAMA's settings (the authors' LLaMA-7B example), scaled to the model.

    * ``layers`` default to DAMA's LLaMA-7B range, 21-29 of 32, as fractions of the
      depth (layers 20-27 of SmolLM2's 30).
    * ``nullspace_dimension`` defaults to a quarter of the hidden size, as 1,024 of
      LLaMA-7B's 4,096.
    * The value optimisation is DAMA's (lr 0.5, 20 steps, clamp 4, KL 0.0625) with the
      weight decay lmpatch's ROME uses on SmolLM2 (1e-3; DAMA's 0.5 is on a squared norm
      of LLaMA's much larger values); two 5-token context prefixes and the bare prompt.
    * ``mom2_weight_per_prompt`` is λ divided by the number of prompts (DAMA: 20,000 /
      2,409).

    On SmolLM2 these settings do not do what they do on LLaMA-7B (WinoBias dev, 64-128
    prompts; docs/applications.md): coreference accuracy falls by 0.03-0.08 whatever the
    number of directions, the stereotype slope barely moves, and with the mixed update
    perplexity rises by half. They are kept as the paper's, not tuned into something else.
    """

    layers: tuple[int, ...] | None = None
    layer_range: tuple[float, float] = (0.66, 0.91)
    nullspace_dimension: int | None = None
    mom2_weight_per_prompt: float = DAMA_LAMBDA / DAMA_PROMPTS
    contrast: tuple[str, str] = ("he", "she")
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    template_lengths: tuple[tuple[int, int], ...] = ((5, 2),)
    group_size: int = 32             # prompts whose two values are optimised in one batch
    pls_max_iter: int = 500
    update: str = "iterative"        # DAMA's "iterative" (contrasts at each layer's MLP output,
                                     # recomputed after the layers below) or "mixed" (contrasts
                                     # once, in the residual stream after the top layer)


def last_token_requests(requests: Sequence[EditRequest], contrast: Sequence[str]) -> list[EditRequest]:
    """Per request, one request per contrast word whose 'subject' is the whole filled
    prompt, so the value is optimised at the prompt's last token (DAMA's ``fact_token``
    "last": the position that predicts the pronoun)."""
    out = []
    for request in requests:
        for word in contrast:
            out.append(EditRequest(prompt=request.prompt, subject=request.prompt, target_new=word))
    return out


def contrasts(
    model: LoadedModel, requests: Sequence[EditRequest], layer: int, templates: list[str], hp: DAMAHparams,
    target: str = "mlp_out",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (n × d_ff, template mean) and contrasts ``v_he - v_she`` (n × d) at ``layer``'s
    MLP output (``target="mlp_out"``) or block output (``"block"``)."""
    pairs = last_token_requests(requests, hp.contrast)
    keys, values = [], []
    step = 2 * hp.group_size
    config = replace(hp.value_config(), target=target)
    with progress_bar(len(requests) > hp.group_size, f"DAMA values, layer {layer}", len(requests), "prompts") as advance:
        for start in range(0, len(pairs), step):
            results = optimize_values(model, pairs[start : start + step], layer, templates, config)
            if len(results) != len(pairs[start : start + step]):
                raise LmpatchError("The value optimisation returned fewer values than asked for.")
            for he, she in zip(results[0::2], results[1::2]):
                keys.append(he.key_mean.double().cpu())
                values.append((he.delta - she.delta).double().cpu())
            advance(len(results) // 2)
    return torch.stack(keys), torch.stack(values)


def last_token_keys(model: LoadedModel, requests: Sequence[EditRequest], layer: int, templates: list[str]) -> torch.Tensor:
    """n × d_ff: the inputs of ``layer``'s MLP output projection at each prompt's last
    token, averaged over the templates (DAMA's ``compute_us``), on the model as it is now."""
    rows = key_rows(model, last_token_requests(requests, ("he",)), templates)
    uniform = torch.full((len(templates),), 1.0 / len(templates), dtype=torch.float64)
    keys, _ = read_state(model, rows, uniform, layer, layer, target="mlp_out")
    return keys.cpu()


def whiten(keys: torch.Tensor, covariance: KeyCovariance | None, weight: float) -> torch.Tensor:
    """DAMA's U ← ((λ·C0 + UᵀU)⁻¹ Uᵀ)ᵀ; the keys as they are without statistics."""
    if covariance is None:
        return keys
    c0 = covariance.matrix.double().cpu()
    return torch.linalg.solve(weight * c0 + keys.T @ keys, keys.T).T


def gender_directions(outputs: np.ndarray, contrast: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    """An orthonormal basis (d × k') of the PLS x-weights between the layer's outputs and
    the contrasts; k' ≤ k when the data support fewer directions. PLS centres its data,
    so one prompt has no covariance to read: its own contrast is then the direction."""
    from sklearn.cross_decomposition import PLSRegression

    if outputs.shape[0] < 2:
        norm = np.linalg.norm(contrast[0])
        return (contrast[0] / norm)[:, None] if norm > 0 else np.zeros((outputs.shape[1], 0))
    k = max(1, min(k, outputs.shape[0] - 1, outputs.shape[1]))
    pls = PLSRegression(n_components=k, scale=False, tol=1e-4, max_iter=max_iter, copy=True)
    pls.fit(outputs, contrast)
    b = pls.x_weights_[:, :k]
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    keep = s > s.max() * max(b.shape) * np.finfo(s.dtype).eps
    return u[:, keep]


def projection_delta(model: LoadedModel, layer: int, basis: torch.Tensor, w: torch.Tensor) -> WeightDelta:
    """``-Q Qᵀ W`` for layer ``layer``'s MLP output projection W (math layout d × d_ff)."""
    q = basis.double()
    return weight_delta(model, layer, -q, q.T @ w)


def apply_dama(model: LoadedModel, requests: Sequence[EditRequest], hp: DAMAHparams) -> Patch:
    """One projection per layer, bottom-up, each on the model with the ones below applied."""
    if len(hp.contrast) != 2 or any(not w.strip() for w in hp.contrast):
        raise InvalidRequestError(f"contrast must be two words, such as ('he', 'she'); got {hp.contrast!r}.")
    if hp.nullspace_dimension is not None and hp.nullspace_dimension < 1:
        raise InvalidRequestError(f"nullspace_dimension must be >= 1, got {hp.nullspace_dimension!r}.")
    if hp.update not in UPDATES:
        raise InvalidRequestError(f"Unknown update {hp.update!r}; choose one of {', '.join(UPDATES)}.")
    layers = edit_layers(model, hp)
    k = hp.nullspace_dimension or max(1, model.spec.hidden_size // 4)
    if len(requests) > 1 and k >= len(requests) - 1:
        # PLS centres the n outputs, which then span n - 1 directions: k >= n - 1
        # components span all of them whatever the contrasts say (measured on SmolLM2:
        # the iterative and mixed updates gave the same perplexity to 6 digits).
        log.warning("DAMA: %d directions from %d prompts remove every direction the prompts' outputs span, "
                    "gender or not; give more prompts than directions (DAMA: 2,409 for 1,024).", k, len(requests))
    templates = context_templates(model, hp.template_config())
    weight = hp.mom2_weight_per_prompt * len(requests)
    covariances = _covariances(model, layers, hp)
    parts: list[Patch] = []
    infos = []
    if hp.update == "mixed":
        _, contrast = contrasts(model, requests, layers[-1], templates, hp, target="block")
    try:
        for layer in layers:
            t0 = time.perf_counter()
            if hp.update == "iterative":
                keys, contrast = contrasts(model, requests, layer, templates, hp)
            else:
                keys = last_token_keys(model, requests, layer, templates)
            u = whiten(keys, covariances[layer], weight)
            module = model.spec.mlp_out(model.model, layer)
            w = from_param_layout(module, module.weight.detach()).double().cpu()
            basis = gender_directions((u @ w.T).numpy(), contrast.numpy(), k, hp.pls_max_iter)
            delta = projection_delta(model, layer, torch.from_numpy(basis), w)
            part = Patch(parts=[delta], method="dama", model_fingerprint=model.fingerprint, model_name=model.name)
            part.apply(model)
            parts.append(part)
            infos.append({
                "layer": layer, "directions": int(basis.shape[1]),
                "contrast_norm_mean": float(contrast.norm(dim=-1).mean()),
                "seconds": round(time.perf_counter() - t0, 3),
            })
            log.info("DAMA layer %d: %d directions removed", layer, basis.shape[1])
    finally:
        for part in reversed(parts):
            part.revert(model)
    merged = compose(parts)
    merged.method = "dama"
    merged.hparams = asdict(hp)
    merged.requests = list(requests)
    merged.metrics = {"edit": {"layers": infos, "mom2_update_weight": weight}}
    return merged


def _covariances(model: LoadedModel, layers: list[int], hp: DAMAHparams) -> dict[int, KeyCovariance | None]:
    if not hp.mom2_adjustment:
        return {layer: None for layer in layers}
    from lmpatch.stats.covariance import StatsConfig

    return layer_covariances(model, layers, StatsConfig(corpus=hp.stats_corpus, n_tokens=hp.stats_tokens))


def _one_offs(model: LoadedModel, hp: DAMAHparams):
    return locate_one_offs(model, hp, edit_layers(model, hp))


register(Method(
    name="dama",
    summary="DAMA: project the he/she contrast out of upper MLP outputs (debiasing)",
    hparams=DAMAHparams, edit=apply_dama, prepare=_one_offs,
    paper="Limisiewicz, Mareček and Musil, Debiasing Algorithm through Model Adaptation, ICLR 2024",
))
