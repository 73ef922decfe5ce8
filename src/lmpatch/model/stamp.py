"""When a weight last changed: the one test every cache derived from weights uses.

Patches write weights in place (``Patch.apply``), which bumps the tensor's version
counter; loading or replacing a parameter gives it new storage. A (version, storage)
pair therefore changes whenever the values may have, and costs nothing to read, so a
cache keyed by it (a compute copy, a packed weight, hidden states below an edit) knows
when to recompute without comparing values.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["weight_stamp", "weights_stamp"]


def weight_stamp(weight: torch.Tensor) -> tuple[int, int]:
    """(version counter, storage address) of ``weight``."""
    return (weight._version, weight.data_ptr())


def weights_stamp(weights: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """:func:`weight_stamp` of each of ``weights``, in order."""
    return tuple(weight_stamp(w) for w in weights)
