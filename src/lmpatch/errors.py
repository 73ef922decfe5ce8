"""Errors a user can cause and fix.

Anything raised as :class:`LmpatchError` is shown by the CLI as one clear message
without a traceback; every other exception is a bug in lmpatch and keeps its traceback.
"""
from __future__ import annotations


class LmpatchError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class InvalidRequestError(LmpatchError, ValueError):
    """An edit request or probe that cannot be edited or scored as given."""


class ModelLoadError(LmpatchError):
    """A model that cannot be found or loaded."""


class PatchError(LmpatchError):
    """A patch that cannot be loaded, applied or reverted on the given model."""
