"""Turning user overrides into a method's hyperparameter dataclass.

Every method's hyperparameters are a frozen dataclass whose ``None`` fields are filled
from the model (layers derive from depth, never from the model's name), so one default
set works on any architecture and every value a patch was made with is recorded.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from lmpatch.errors import InvalidRequestError


def with_overrides(cls: type, overrides: dict[str, Any] | Any | None):
    """An instance of ``cls`` from defaults plus ``overrides`` (a dict or an instance).

    Unknown names and values of the wrong type are user mistakes: they get one message
    listing what is accepted, instead of a TypeError deep inside the method.
    """
    if overrides is None:
        return cls()
    if isinstance(overrides, cls):
        return overrides
    if not isinstance(overrides, dict):
        raise InvalidRequestError(f"Hyperparameters must be a dict or {cls.__name__}, got {type(overrides).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InvalidRequestError(
            f"Unknown hyperparameter(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(k, v, hints[k]) for k, v in overrides.items()}
    return cls(**values)


def check_layers(hparams: Any, model: Any) -> None:
    """The layer indices a user set (``layer``, ``layers``) exist in ``model``, checked
    before any work: the service queued an edit with ``layer=99`` and failed it later,
    where every other mistake in the same request is refused at once. Encoder-decoders
    are left to their methods, whose layers may count one stack only."""
    if model.spec.encoder_decoder:
        return
    chosen = getattr(hparams, "layers", None) or ()
    if getattr(hparams, "layer", None) is not None:
        chosen = (*chosen, hparams.layer)
    for layer in chosen:
        model.spec.check_layer(layer)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept CLI strings and JSON lists for typed fields."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else hint
    if value is None:
        return None
    try:
        if target is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # int() or float() would quietly make True a 1
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)  # int() would quietly make 1.5 a 1
        if target in (int, float, str, bool):
            return target(value)
        if typing.get_origin(target) is tuple and isinstance(value, (list, tuple)):
            return _to_tuple(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"Hyperparameter {name}={value!r} is not a valid {getattr(target, '__name__', target)}.") from exc
    return value


def _to_tuple(value):
    return tuple(_to_tuple(v) if isinstance(v, (list, tuple)) else v for v in value)


def as_dict(hparams: Any) -> dict:
    return dataclasses.asdict(hparams)


def recorded(hparams: Any, **chosen: Any) -> dict:
    """The hyperparameters as a patch records them: ``None`` fields ("chosen from the
    model") replaced by what the method chose (``layer=17``), so ``inspect`` and a later
    reader see the layer that was edited, not ``null``."""
    out = dataclasses.asdict(hparams)
    for name, value in chosen.items():
        if name not in out:
            raise KeyError(f"{type(hparams).__name__} has no field {name!r}")
        if out[name] is None:
            out[name] = list(value) if isinstance(value, (tuple, list)) else value
    return out
