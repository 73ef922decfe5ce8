"""Patches: edits as data, their parts, their file format and the stack that applies them.

See ``docs/architecture.md`` for how the pieces fit together.
"""
from lmpatch.patch.parts import AddedModule, ModuleAddition, WeightDelta, dense_is_smaller, register_addition
from lmpatch.patch.patch import MERGE_MANIFEST, Patch, compose
from lmpatch.patch.stack import PatchStack, StackEntry

__all__ = [
    "AddedModule",
    "MERGE_MANIFEST",
    "ModuleAddition",
    "Patch",
    "PatchStack",
    "StackEntry",
    "WeightDelta",
    "compose",
    "dense_is_smaller",
    "register_addition",
]
