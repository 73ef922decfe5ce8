"""What every editor that learns to turn a gradient into an edit shares (MEND, KE).

Such an editor is an ``nn.Module`` with two things:

* ``params`` - the names of the weight matrices it edits;
* ``changes(requests, factors, update_norm)`` - from the requests and their per-token
  gradient factors at those matrices (:mod:`lmpatch.methods.token_grads`), one (U, D)
  pair per matrix such that request r's weight change is D[r]^T U[r].

Everything else is here, once: the passes of a training step (gradient, edited prompts
and paraphrases, locality before and after, all over the frozen bottom), the validation
scores, the patch an edit returns, and finding, training and saving the trained artefact.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import asdict, fields
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.machine import cpu_info, cpu_line
from lmpatch.methods.editor_training import (
    EditExample,
    TrainingConfig,
    artefact_dir,
    artefact_key,
    load_artefact,
    save_artefact,
    shipped_dir,
    train_editor,
)
from lmpatch.methods.frozen_bottom import FrozenBottom, replaying_batch
from lmpatch.methods.teacher import TARGET_NEW, request_hits, request_nll, target_batch, target_logprobs
from lmpatch.methods.token_grads import gradient_factors, row_deltas
from lmpatch.model.loading import DEFAULT_MODEL, LoadedModel, cache_dir
from lmpatch.model.spec import factors_to_param_layout
from lmpatch.patch import Patch, WeightDelta
from lmpatch.request import EditRequest

__all__ = [
    "LOCALITY_KL", "edit_layers", "edit_losses", "edit_modules", "edit_with_trained", "layer_params", "load_trained",
    "locality_divergence", "patch_from_editor", "top_layer_params", "train_command", "train_learned", "validate_editor",
    "weight_deltas",
]

MODULE_KINDS = ("mlp_in", "mlp_out")


def edit_layers(model: LoadedModel, top_layers: int, layers: Sequence[int] = ()) -> list[int]:
    """The layers an editor edits, lowest first: exactly ``layers`` when given (decoder-only
    models), else the top ``top_layers``.

    An encoder-decoder gets the top ``top_layers`` of each stack, as MEND edits T5 (the last
    blocks of both the encoder and the decoder): the new fact must be read from the prompt
    (encoder) and written into the answer (decoder).
    """
    spec = model.spec
    if layers:
        if spec.encoder_decoder or any(not 0 <= i < spec.n_layers for i in layers):
            raise InvalidRequestError(
                f"layers must be indices of this decoder-only model's {spec.n_layers} layers; got {list(layers)}"
                + (" (encoder-decoders take top_layers)." if spec.encoder_decoder else ".")
            )
        return sorted(set(layers))
    stacks = [(0, spec.encoder_layers), (spec.encoder_layers, spec.n_layers)] if spec.encoder_decoder \
        else [(0, spec.n_layers)]
    return [i for lo, hi in stacks for i in range(max(lo, hi - top_layers), hi)]


def layer_params(model: LoadedModel, layers: Sequence[int], modules: Sequence[str]) -> list[str]:
    """Weight names of the chosen MLP matrices ("mlp_in": gate and up, "mlp_out": down) of
    ``layers``, in that order."""
    names = []
    for layer in layers:
        paths = model.spec.layers[layer]
        for kind in modules:
            names += [f"{p}.weight" for p in (paths.mlp_in if kind == "mlp_in" else (paths.mlp_out,))]
    return names


def top_layer_params(model: LoadedModel, top_layers: int, modules: Sequence[str]) -> list[str]:
    """:func:`layer_params` of the top ``top_layers`` layers (of each stack)."""
    return layer_params(model, edit_layers(model, top_layers), modules)


def edit_modules(model: LoadedModel, params: Sequence[str], compute_dtype: torch.dtype | None = None) -> list[nn.Module]:
    """The modules owning ``params`` in the module that runs passes in ``compute_dtype``."""
    net = model.network(compute_dtype)
    return [net.get_submodule(p.rsplit(".", 1)[0]) for p in params]


def _lowest_layer(model: LoadedModel, params: Sequence[str]) -> int:
    blocks = [model.spec.layers[i].block + "." for i in range(model.spec.n_layers)]
    return min(i for i, b in enumerate(blocks) for p in params if p.startswith(b))


def _per_row(changes, rows: torch.Tensor, together: bool = False):
    """The changes each of ``rows`` sees: its own edit's, or (``together``) every edit's
    summed, as one batched edit applies them (the token factors of all edits concatenated)."""
    if not together:
        return [(u[rows], d[rows]) for u, d in changes]
    n = len(rows)
    return [(u.reshape(1, -1, u.shape[-1]).expand(n, -1, -1), d.reshape(1, -1, d.shape[-1]).expand(n, -1, -1))
            for u, d in changes]


def training_settings(hparams: Any) -> dict:
    """The settings that key a trained artefact: every field, except a field added after
    artefacts were shipped while it keeps the value those were trained with (declared in
    the field's metadata as ``key_unless``), so that older artefacts still load."""
    out = asdict(hparams)
    for f in fields(hparams):
        if "key_unless" in f.metadata and out[f.name] == f.metadata["key_unless"]:
            del out[f.name]
    return out


class _Passes:
    """The forward passes of one training or validation batch, over the frozen bottom."""

    def __init__(self, model: LoadedModel, editor: nn.Module, bottom: FrozenBottom | None,
                 together: bool = False) -> None:
        self.model, self.editor, self.bottom, self.together = model, editor, bottom, together
        self.modules = edit_modules(model, editor.params)

    def edit(self, examples: Sequence[EditExample], update_norm: bool):
        reqs = [e.request for e in examples]
        batch = target_batch(self.model, reqs, TARGET_NEW)
        with replaying_batch(self.bottom, batch):
            factors, _ = gradient_factors(self.model, self.modules, reqs, batch=batch)
        return self.editor.changes(reqs, factors, update_norm)

    def asked(self, examples: Sequence[EditExample], changes, fn: Callable):
        """``fn(model, batch)`` on the edit prompts then the paraphrases, each row edited by its own edit."""
        n = len(examples)
        batch = target_batch(self.model, [e.request for e in examples] + [e.paraphrase_request for e in examples],
                             TARGET_NEW)
        with replaying_batch(self.bottom, batch), row_deltas(self.modules, _per_row(changes, torch.arange(2 * n) % n, self.together)):
            return fn(self.model, batch)

    def locality(self, examples: Sequence[EditExample], changes):
        """Log-probabilities at the locality answers' positions, unedited and edited, and
        which example each position belongs to."""
        batch = target_batch(self.model, [e.locality_request for e in examples], TARGET_NEW)
        with replaying_batch(self.bottom, batch):
            with torch.no_grad():
                pre = target_logprobs(self.model, batch, None)
            with row_deltas(self.modules, _per_row(changes, torch.arange(len(examples)), self.together)):
                post = target_logprobs(self.model, batch, None)
        return pre, post, batch.pos_rows[batch.pick]


LOCALITY_KL = ("forward", "symmetric")


def locality_divergence(pre: torch.Tensor, post: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """The mean divergence of the edited next-token distributions (log-probabilities
    ``post``) from the unedited ones (``pre``) over the locality positions.

    "forward" is KL(unedited || edited), the papers' term. It weighs each token by its
    unedited probability, so a token the unedited model all but ruled out may gain a
    lot of mass cheaply: exactly what happens to the edit's new answer after a
    neighbour's prompt. "symmetric" adds KL(edited || unedited), which weighs tokens by
    their edited probability and so charges that gain in full.
    """
    forward = (pre.exp() * (pre - post)).sum(-1).mean()
    if kind == "forward":
        return forward
    if kind == "symmetric":
        return forward + (post.exp() * (post - pre)).sum(-1).mean()
    raise InvalidRequestError(f"locality_kl must be one of {', '.join(LOCALITY_KL)}; got {kind!r}.")


def edit_losses(model: LoadedModel, editor: nn.Module, examples: Sequence[EditExample],
                bottom: FrozenBottom | None = None, together: bool = False,
                locality_kl: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """The examples edited from the unedited model, each alone or (``together``) all as one
    batched edit: the new target's NLL on the edit prompts then the paraphrases (2n,), and
    the locality divergence (:func:`locality_divergence`) over the locality answers' tokens."""
    passes = _Passes(model, editor, bottom, together)
    with torch.inference_mode(False), torch.enable_grad():
        changes = passes.edit(examples, update_norm=editor.training)
        nll = passes.asked(examples, changes, request_nll)
        pre, post, _ = passes.locality(examples, changes)
        kl = locality_divergence(pre, post, locality_kl)
    return nll, kl


@torch.no_grad()
def validate_editor(model: LoadedModel, editor: nn.Module, examples: Sequence[EditExample],
                    bottom: FrozenBottom | None = None, batch: int = 16, together: bool = False) -> dict:
    """Teacher-forced success on held-apart edits, each made alone (or ``together``, in
    batched edits of ``batch``): every target token the argmax on the edit prompt
    (efficacy) and on the paraphrase (paraphrase), and the locality answer's argmax
    tokens unchanged (locality)."""
    hits: dict[str, list[bool]] = {"efficacy": [], "paraphrase": [], "locality": []}
    passes = _Passes(model, editor, bottom, together)
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        n = len(chunk)
        changes = passes.edit(chunk, update_norm=False)
        ok = passes.asked(chunk, changes, request_hits)
        hits["efficacy"] += ok[:n]
        hits["paraphrase"] += ok[n:]
        pre, post, owner = passes.locality(chunk, changes)
        same = [True] * n
        for r, s in zip(owner.tolist(), (pre.argmax(-1) == post.argmax(-1)).tolist()):
            same[r] = same[r] and s
        hits["locality"] += same
    return {k: sum(v) / max(len(v), 1) for k, v in hits.items()}


def _validate(model: LoadedModel, editor: nn.Module, examples: Sequence[EditExample], bottom: FrozenBottom | None,
              together: bool, batch: int) -> dict:
    """Single-edit scores, plus batched-edit ones (``batch_efficacy`` ...) for an editor
    trained on batched edits."""
    scores = validate_editor(model, editor, examples, bottom)
    if together:
        scores |= {f"batch_{k}": v for k, v in validate_editor(model, editor, examples, bottom, batch, True).items()}
    return scores


# --------------------------------------------------------------------------- editing


def patch_from_editor(model: LoadedModel, editor: nn.Module, requests: Sequence[EditRequest], method: str,
                      hparams: Any, manifest: dict) -> Patch:
    """All ``requests`` in one call: their changes summed into one weight-delta patch
    (low-rank, rank = the requests' tokens, unless dense is smaller)."""
    t0 = time.perf_counter()
    modules = edit_modules(model, editor.params)
    factors, losses = gradient_factors(model, modules, requests)
    with torch.no_grad():
        deltas = weight_deltas(editor.params, modules, editor.changes(requests, factors, False), factors)
    metrics = {"pre_edit_nll": [round(float(x), 4) for x in losses], "edit_seconds": round(time.perf_counter() - t0, 4),
               "editor": {k: manifest.get(k) for k in ("key", "trained_seconds", "validation")}}
    return Patch(parts=deltas, method=method, model_fingerprint=model.fingerprint, model_name=model.name,
                 hparams=asdict(hparams), requests=list(requests), metrics=metrics)


def weight_deltas(params: Sequence[str], modules: Sequence[nn.Module], changes, factors) -> list[WeightDelta]:
    """One weight delta per matrix from its (U, D) change, every request's rows summed:
    low-rank (rank = the requests' tokens) unless dense is smaller. Rows past the tokens
    (KE's bias term) are kept; padded tokens are not."""
    deltas = []
    for name, module, (u, d), f in zip(params, modules, changes, factors):
        keep = f.mask.reshape(-1)
        extra = u.shape[1] - f.mask.shape[1]  # rows an editor adds after the tokens (KE's bias term)
        if extra:
            keep = torch.cat([f.mask, torch.ones(f.mask.shape[0], extra, dtype=torch.bool)], 1).reshape(-1)
        right = u.reshape(-1, u.shape[-1])[keep]          # (k, d_in)
        left = d.reshape(-1, d.shape[-1])[keep].T          # (d_out, k)
        left, right = factors_to_param_layout(module, left, right)
        if left.shape[1] * (left.shape[0] + right.shape[1]) >= left.shape[0] * right.shape[1]:
            deltas.append(WeightDelta(param=name, dense=left @ right))
        else:
            deltas.append(WeightDelta(param=name, left=left, right=right))
    return deltas


# --------------------------------------------------------------------------- artefacts


def train_command(method: str, model_name: str, hparams: Any) -> str:
    """The command that trains exactly the editor these settings ask for: ``--model`` unless
    it is the embedded model, and a ``--set`` for every setting that is not the default
    (a bare ``lmpatch train mend`` would train, or find, a different editor)."""
    parts = ["lmpatch", "train", method]
    if model_name != DEFAULT_MODEL:
        parts += ["--model", shlex.quote(model_name)]
    default = type(hparams)()
    for f in fields(hparams):
        value = getattr(hparams, f.name)
        if value == getattr(default, f.name):
            continue
        if isinstance(value, (tuple, list)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        parts += ["--set", shlex.quote(f"{f.name}={text}")]
    return " ".join(parts)


def load_trained(method: str, model: LoadedModel, hparams: Any, build: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    """The trained editor for this model and hyperparameters (all of them key the
    artefact), or the error that says how to get one. The editor is built first, so a
    setting that does not fit this model is named before a missing artefact is."""
    editor = build()
    saved = load_artefact(artefact_dir(method, artefact_key(method, model.fingerprint, training_settings(hparams))))
    if saved is None:
        # Only a method with a shipped editor (MEND) can say some settings need no training.
        ships = any((shipped_dir() / method).glob("*/manifest.json"))
        note = "; the embedded model with default settings needs no training" if ships else ""
        raise LmpatchError(
            f"{method.upper()} has not been trained for {model.name} with these settings; run "
            f"`{train_command(method, model.name, hparams)}` first (about an hour on a 2-core CPU{note})."
        )
    state, manifest = saved
    editor.load_state_dict({k: v.float() for k, v in state.items()})
    return editor.eval().requires_grad_(False), manifest


def edit_with_trained(method: str, model: LoadedModel, requests: Sequence[EditRequest], hparams: Any,
                      build: Callable[[], nn.Module]) -> Patch:
    """All ``requests`` in one call of the trained editor, summed into one patch."""
    requests = list(requests)
    if not requests:
        raise InvalidRequestError(f"{method.upper()} needs at least one edit request.")
    editor, manifest = load_trained(method, model, hparams, build)
    return patch_from_editor(model, editor, requests, method, hparams, manifest)


def train_learned(method: str, model: LoadedModel, editor: nn.Module, groups: list[dict], hparams: Any,
                  loss: Callable[[torch.Tensor, torch.Tensor, nn.Module], tuple[torch.Tensor, dict]],
                  config: TrainingConfig, show: bool, together: bool = False, locality_kl: str = "forward") -> dict:
    """Train ``editor`` with the shared loop and save it where editing finds it.

    ``loss(nll, kl, editor)`` combines the edit losses (:func:`edit_losses`) into the
    method's objective and returns it with numbers for the log. ``together`` trains on
    batched edits (each step's examples summed into one edit, as the paper trains MEND
    for batched editing); validation then scores single edits and batched ones.
    ``locality_kl`` names the locality divergence (:func:`locality_divergence`).
    """
    settings = training_settings(hparams)
    key = artefact_key(method, model.fingerprint, settings)
    folder = cache_dir() / method / key
    for p in model.model.parameters():
        p.requires_grad_(False)
    lowest = _lowest_layer(model, editor.params)
    # An encoder-decoder's decoder reads the (edited) encoder's output: no replay there.
    bottom = FrozenBottom(model, lowest) if lowest > 0 and not model.spec.encoder_decoder else None

    def step(m: LoadedModel, net: nn.Module, examples: Sequence[EditExample]):
        nll, kl = edit_losses(m, net, examples, bottom, together, locality_kl)
        total, numbers = loss(nll, kl, net)
        n, nll, kl = len(examples), nll.detach(), kl.detach()
        return total, {"edit_nll": float(nll[:n].mean()), "para_nll": float(nll[n:].mean()), "kl": float(kl),
                       **numbers}

    report = train_editor(model, editor, groups, step_loss=step,
                          validate=lambda m, net, ex: _validate(m, net, ex, bottom, together, config.batch_size),
                          config=config, folder=folder, show=show)
    manifest = {"method": method, "key": key, "model": model.name, "fingerprint": model.fingerprint,
                "settings": settings, "params": editor.params, "trained_seconds": report["train_seconds"],
                "machine": cpu_line(cpu_info()),
                "validation": report["validation"][-1] if report["validation"] else {}, "report": report}
    save_artefact(folder, editor.state_dict(), manifest)
    return {**report, "saved_in": str(folder)}
