"""The few places where transformers' API differs between the versions lmpatch supports.

transformers 5.x renamed the attention-cache argument and output field of its models'
``forward`` from ``past_key_values`` to ``cache`` (the old name still works there, with a
FutureWarning on every call, until its removal); 4.x knows only the old name. Callers that
run a model on a cache go through these two helpers, so the choice is made in one place.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from torch import nn


@lru_cache(maxsize=None)
def _cache_argument(forward_type: type) -> str:
    try:
        params = inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def with_cache(module: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands ``cache`` to ``module``'s forward, as a dict to splat."""
    return {_cache_argument(type(module)): cache}


def output_cache(out: Any) -> Any:
    """The attention cache a forward returned (``None`` if it returned none)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
