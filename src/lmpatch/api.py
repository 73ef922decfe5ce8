"""The one-call entry point: ``edit(model, requests, method=...) -> Patch``."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.hparams import check_layers, with_overrides
from lmpatch.methods.registry import get_method
from lmpatch.model.context import memories_paused
from lmpatch.model.fits import check_requests_fit
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.request import EditRequest, as_requests


def edit(
    model: LoadedModel,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "rome",
    hparams: dict[str, Any] | Any | None = None,
    **overrides: Any,
) -> Patch:
    """Compute an edit as a :class:`Patch`; the caller's model is left exactly as it was.

    ``hparams`` (a dict or the method's dataclass) and keyword ``overrides`` replace
    the method's defaults, e.g. ``edit(m, req, "rome", layer=4)``.
    """
    if not isinstance(model, LoadedModel):
        raise InvalidRequestError(
            "edit() needs the object returned by lmpatch.load_model() (or lmpatch.wrap_model(model, tokenizer))."
        )
    reqs = as_requests(requests, "edit")
    info = get_method(method)
    info.check_model(model)
    check_requests_fit(model, reqs)
    if hparams is None:
        base: dict[str, Any] = {}
    elif isinstance(hparams, dict):
        base = dict(hparams)
    elif isinstance(hparams, info.hparams):
        base = asdict(hparams)
    else:
        raise InvalidRequestError(
            f"hparams for {info.name} must be a dict or {info.hparams.__name__}, got {type(hparams).__name__}."
        )
    hp = with_overrides(info.hparams, {**base, **overrides})
    check_layers(hp, model)
    with memories_paused():  # an edit is computed from the model's own reading of the edit prompt
        return info.edit(model, reqs, hp)
