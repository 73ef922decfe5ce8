"""GRACE: a codebook of edits wrapped around one layer (Hartvigsen et al., NeurIPS 2023).

The layer keeps its weights. Beside it sits a codebook of entries (key k, value v,
radius ε): when the layer's *input* at some token lies within ε of a key, the layer's
output at that token is replaced by the key's value; everywhere else the model is the
base model ("deferral"). An edit adds an entry whose key is the layer input at the
prompt's last token and whose value is trained so that the model then produces the
new target (teacher-forced, Adam, from a random "cold" start as in the paper).

Codebook rules, for a new query q with label y (the new target) and the nearest key k_j
at distance d:

* no key, or d > ε_init + ε_j: add (q, v, ε_init);
* same label: widen ε_j to cover q ("coverage") and train v_j on the new query too;
* other label: add q, and split: both radii become d / 2 so the balls do not overlap.

How this maps onto patches. A GRACE patch holds the entries its own requests created, as
one :class:`GraceCodebook` module hooked onto the layer. Entries of *earlier* patches
belong to those patches and are never changed by a later one (patches stay immutable and
revertible in any order), so across patches the rules become: same label -> a new entry
seeded with the earlier value; other label -> a new entry of radius min(ε_init, d / 2),
and since hooks run in application order, inside that ball the newer entry's value wins
(the paper would shrink the older radius instead). Within one patch the paper's rules
apply as written.

Where the query is read: at *every* token, not only the last one. The edit prompt's last
token then matches whether the prompt is scored alone, with its target appended
(teacher forcing), in a padded batch, or as the first step of generation; other tokens
are far from every key and pass through. The radius is in the units of the layer input
(the MLP's hidden activation); see ``docs/lifelong.md`` for the distances measured on
SmolLM2.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.hparams import recorded
from lmpatch.methods.registry import Method, register
from lmpatch.methods.teacher import TARGET_NEW, target_batch, target_nll
from lmpatch.model.hooks import capture_input, capture_output, edit_output, record_outputs, replay_outputs
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import AddedModule, ModuleAddition, Patch, register_addition
from lmpatch.request import EditRequest

__all__ = ["GraceCodebook", "GraceHparams", "apply_grace"]

log = logging.getLogger(__name__)

VALUE_INITS = ("cold", "warm")


@dataclass(frozen=True)
class GraceHparams:
    """GRACE's settings. ``eps_init``, ``lr`` and cold initialisation are the paper's and
    EasyEdit's; the layer sits at the same relative depth as EasyEdit's LLaMA-2 choice
    (27 of 32). EasyEdit runs all ``steps``; stopping once the target's loss is below
    ``stop_loss`` gives the same entry sooner (the value already yields the target)."""

    layer: int | None = None          # None: ``layer_fraction`` of the depth
    layer_fraction: float = 0.85
    eps_init: float = 1.0             # radius of a new entry, in the layer input's units
    lr: float = 1.0
    steps: int = 50
    stop_loss: float = 1e-2           # mean NLL per target token
    value_init: str = "cold"          # "cold": random start (paper); "warm": the layer's current output
    seed: int = 0

    def check(self) -> None:
        if not self.eps_init > 0:
            raise InvalidRequestError(f"GRACE eps_init must be positive, got {self.eps_init}.")
        if not self.lr > 0 or self.steps < 1:
            raise InvalidRequestError(f"GRACE needs lr > 0 and steps >= 1, got lr={self.lr}, steps={self.steps}.")
        if self.value_init not in VALUE_INITS:
            raise InvalidRequestError(f"GRACE value_init must be one of {', '.join(VALUE_INITS)}, got {self.value_init!r}.")


def grace_layer(model: LoadedModel, hp: GraceHparams) -> int:
    spec = model.spec
    return spec.check_layer(hp.layer) if hp.layer is not None else spec.depth_layer(hp.layer_fraction)


# --------------------------------------------------------------------------- the codebook


@register_addition
class GraceCodebook(AddedModule):
    """Entries (key, value, radius, label) at one layer; replaces the output wherever the
    input is within an entry's radius of its key (nearest key first)."""

    type_name = "grace.codebook"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor, labels: Sequence[str]):
        super().__init__()
        if not (keys.shape[0] == values.shape[0] == radii.shape[0] == len(labels)):
            raise ValueError("keys, values, radii and labels must have one row per entry")
        self.register_buffer("keys", keys.detach().float().clone())
        self.register_buffer("values", values.detach().float().clone())
        self.register_buffer("radii", radii.detach().float().clone())
        self.labels = list(labels)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> "GraceCodebook":
        return cls(state["keys"], state["values"], state["radii"], config["labels"])

    def config(self) -> dict:
        return {"labels": list(self.labels)}

    def placed(self, device: torch.device, dtype: torch.dtype) -> "GraceCodebook":
        return self.to(device=device)  # distances in float32 whatever the model runs in

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest key for each row of ``queries`` (float32)."""
        dists = torch.cdist(queries.float(), self.keys)
        return dists.min(dim=-1)

    def hook(self, host: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        flat_x = x.reshape(-1, x.shape[-1])
        dist, index = self.nearest(flat_x)
        hit = dist <= self.radii[index]
        if not bool(hit.any()):
            return output
        flat_y = y.reshape(-1, y.shape[-1])
        new = torch.where(hit[:, None], self.values[index].to(y.dtype), flat_y).reshape(y.shape)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


# --------------------------------------------------------------------------- editing


@dataclass
class _Entry:
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str


def _label(request: EditRequest) -> str:
    return request.target_new.strip()


def _seed(hp: GraceHparams, request: EditRequest) -> int:
    digest = hashlib.sha256(f"{hp.seed}:{request.prompt}:{request.target_new}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def apply_grace(model: LoadedModel, requests: Sequence[EditRequest], hp: GraceHparams) -> Patch:
    """One codebook module holding an entry per request (edited one after another)."""
    hp.check()
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("GRACE needs at least one edit request.")
    spec = model.spec
    layer = grace_layer(model, hp)
    place = spec.layers[layer].mlp_out
    earlier = [
        inst.module for inst in model.stack.additions()
        if inst.place == place and isinstance(inst.module, GraceCodebook) and len(inst.module)
    ]
    entries: list[_Entry] = []
    infos = []
    for request in requests:
        t0 = time.perf_counter()
        info = _edit_one(model, layer, request, hp, earlier, entries)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        infos.append(info)
        log.debug("grace edit %r: %s", request.prompt, info)
    book = GraceCodebook(
        torch.stack([e.key for e in entries]),
        torch.stack([e.value for e in entries]),
        torch.tensor([e.radius for e in entries]),
        [e.label for e in entries],
    )
    return Patch(
        parts=[ModuleAddition.of(place, book)], method="grace", model_fingerprint=model.fingerprint,
        model_name=model.name, hparams=recorded(hp, layer=layer), requests=requests,
        metrics={"edit": {"layer": layer, "entries": len(entries), "requests": infos}},
    )


def _edit_one(
    model: LoadedModel, layer: int, request: EditRequest, hp: GraceHparams,
    earlier: list[GraceCodebook], entries: list[_Entry],
) -> dict:
    """Place ``request`` in the codebook (``entries``, changed in place) and train its value."""
    spec = model.spec
    host = spec.mlp_out(model.model, layer)
    batch = target_batch(model, [request], TARGET_NEW)
    position = int(batch.pos_cols[0])  # the prompt's last token: it predicts the first target token
    blocks = [spec.block(model.model, i) for i in range(layer)]
    recorded: list = []
    inputs: list = []
    outputs: list = []
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(record_outputs(blocks, recorded))
        stack.enter_context(capture_input(host, inputs))
        stack.enter_context(capture_output(host, outputs))
        target_nll(model, batch)
    query = inputs[0].reshape(1, -1, inputs[0].shape[-1])[0, position].float().cpu()
    current = outputs[0].reshape(1, -1, outputs[0].shape[-1])[0, position].float().cpu()

    label = _label(request)
    dist, owner, index = _nearest(query, earlier, entries)
    op = "add"
    radius = hp.eps_init
    start = _cold_value(current, hp, request) if hp.value_init == "cold" else current.clone()
    if owner is not None and dist <= hp.eps_init + _radius(owner, index, earlier, entries):
        same = _label_of(owner, index, earlier, entries) == label
        if same and owner == "own":
            op = "expand"
            entry = entries[index]
            entry.radius = max(entry.radius, dist)
            entry.value, trained = _train_value(model, host, blocks, recorded, batch, position, entry.value, hp)
            return {"op": op, "distance": round(dist, 4), **trained}
        if same:
            op = "cover"
            start = earlier[index[0]].values[index[1]].detach().float().cpu().clone()
        elif owner == "own":
            op = "split"
            radius = dist / 2
            entries[index].radius = min(entries[index].radius, dist / 2)
        else:
            op = "split"
            radius = min(hp.eps_init, dist / 2)
    value, trained = _train_value(model, host, blocks, recorded, batch, position, start, hp)
    entries.append(_Entry(key=query, value=value, radius=float(radius), label=label))
    return {"op": op, "distance": None if owner is None else round(dist, 4), "radius": round(float(radius), 4), **trained}


def _nearest(query: torch.Tensor, earlier: list[GraceCodebook], entries: list[_Entry]):
    """(distance, "own" or "earlier" or None, index) of the nearest key anywhere at this layer.

    ``index`` is a row of ``entries`` for "own", a (codebook, row) pair for "earlier"."""
    best = (float("inf"), None, None)
    for b, book in enumerate(earlier):
        dist, row = book.nearest(query[None].to(book.keys.device))
        if float(dist[0]) < best[0]:
            best = (float(dist[0]), "earlier", (b, int(row[0])))
    for i, entry in enumerate(entries):
        dist = float(torch.linalg.vector_norm(query - entry.key))
        if dist < best[0]:
            best = (dist, "own", i)
    return best


def _radius(owner: str, index: Any, earlier: list[GraceCodebook], entries: list[_Entry]) -> float:
    if owner == "own":
        return entries[index].radius
    return float(earlier[index[0]].radii[index[1]])


def _label_of(owner: str, index: Any, earlier: list[GraceCodebook], entries: list[_Entry]) -> str:
    if owner == "own":
        return entries[index].label
    return earlier[index[0]].labels[index[1]]


def _cold_value(current: torch.Tensor, hp: GraceHparams, request: EditRequest) -> torch.Tensor:
    """A random start of the scale of the layer's outputs (the paper's "cold" init)."""
    gen = torch.Generator().manual_seed(_seed(hp, request))
    noise = torch.randn(current.shape, generator=gen)
    return noise * (float(current.norm()) / float(noise.norm()))


def _train_value(
    model: LoadedModel, host: nn.Module, blocks: list[nn.Module], recorded: list,
    batch, position: int, start: torch.Tensor, hp: GraceHparams,
) -> tuple[torch.Tensor, dict]:
    """Adam on the value that replaces the host's output at ``position``; the blocks below
    the layer are replayed (their inputs never change), so each step runs only the top."""
    device = model.input_device
    value = start.detach().clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([value], lr=hp.lr)

    def replace(y: torch.Tensor) -> torch.Tensor:
        y3 = y.reshape(1, -1, y.shape[-1])
        col = torch.arange(y3.shape[1], device=y.device)[None, :, None] == position
        return torch.where(col, value.to(y.dtype), y3).reshape(y.shape)

    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad(), ExitStack() as stack:
        stack.enter_context(replay_outputs(blocks, recorded))
        stack.enter_context(edit_output(host, replace))
        for _ in range(hp.steps):
            opt.zero_grad()
            loss = target_nll(model, batch)
            losses.append(float(loss.detach()))
            if losses[-1] < hp.stop_loss:
                break
            loss.backward()
            opt.step()
    info = {"steps": len(losses), "initial_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4)}
    return value.detach().float().cpu(), info


register(Method(
    name="grace", aliases=("GRACE",),
    summary="GRACE: a codebook of edited layer outputs, used only near the edited inputs (Hartvigsen et al. 2023)",
    hparams=GraceHparams, edit=apply_grace, regimes=frozenset({"single", "sequential"}),
    produces=frozenset({"module_additions"}),
    paper="Hartvigsen et al., Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors, NeurIPS 2023",
))
