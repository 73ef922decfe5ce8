"""Editing methods declare themselves here, next to their code.

Each method module ends with one :func:`register` call saying what the method is: its
name and aliases, its hyperparameter dataclass, the regimes it supports, the part kinds
its patches hold, the one-off work it needs per model, and the function that edits. The
CLI, the evaluation runners and the conformance tests ask this registry instead of
knowing methods by name, so adding a method is adding one module and one import line in
``lmpatch/methods/__init__.py``.

The registry is filled on first use (importing :mod:`lmpatch.methods`), so importing
lmpatch stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmpatch.errors import InvalidRequestError

#: Ways a method can be run over many edits (see ``lmpatch eval --mode``).
REGIMES = ("single", "batch", "sequential")


@dataclass(frozen=True)
class OneOff:
    """Work a method needs once per model before its first edit, cached on disk afterwards.

    The CLI runs every pending one-off before the edit with a line saying what it does and
    where the result is kept, so the cost never hides inside a "slow first edit".
    """

    what: str                          # "key statistics for layer 5 over 100,000 tokens of wikitext"
    where: Path                        # where the result is cached
    done: Callable[[], bool]           # already cached?
    run: Callable[[bool], None]        # compute it (argument: show progress)
    draws_progress: bool = False       # run() shows its own progress bar (else the CLI shows a spinner)


@dataclass(frozen=True)
class Method:
    """What an editing method is, for everything that runs one."""

    name: str
    summary: str
    hparams: type
    edit: Callable[..., Any]                       # (model, requests, hparams) -> Patch
    aliases: tuple[str, ...] = ()
    regimes: frozenset[str] = frozenset(REGIMES)
    produces: frozenset[str] = frozenset({"weight_deltas"})
    #: (model, hparams) -> the one-off work this method needs on that model (cached or not)
    prepare: Callable[..., list[OneOff]] | None = None
    paper: str = ""
    #: (model, hparams, show) -> report: what ``lmpatch train METHOD`` runs, for methods
    #: with a learned part (SERAC's scope classifier); cached like a one-off
    train: Callable[..., dict] | None = None
    #: editing needs a trained artefact that ``train`` makes and nothing makes on the fly
    #: (MEND): without one, editing is an error naming ``lmpatch train METHOD``
    needs_training: bool = False
    #: the training splits ``train`` reads (each keeps records apart for tuning and validation)
    training_data: tuple[str, ...] = ("counterfact-train",)
    #: also edits encoder-decoder models (T5); the others refuse them with one clear error
    encoder_decoder: bool = False
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.needs_training and self.train is None:
            raise ValueError(f"{self.name}: needs_training without a train function.")
        unknown = set(self.regimes) - set(REGIMES)
        if unknown:
            raise ValueError(f"{self.name}: unknown regimes {sorted(unknown)}; known: {REGIMES}.")

    def one_offs(self, model: Any, hparams: Any) -> list[OneOff]:
        self.check_model(model)
        return list(self.prepare(model, hparams)) if self.prepare is not None else []

    def check_model(self, model: Any) -> None:
        """One clear error when ``model`` is of a kind this method does not edit."""
        if model.spec.encoder_decoder and not self.encoder_decoder:
            able = ", ".join(m.name for m in all_methods() if m.encoder_decoder)
            raise InvalidRequestError(
                f"{self.name} does not edit encoder-decoder models like {model.name} ({model.spec.model_type}); "
                f"methods that do: {able}."
            )

    def capabilities(self) -> dict:
        """JSON-able description for ``lmpatch methods --json``."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "summary": self.summary,
            "paper": self.paper,
            "regimes": [r for r in REGIMES if r in self.regimes],
            "produces": sorted(self.produces),
            "needs_prepare": self.prepare is not None,
            "trainable": self.train is not None,
            "needs_training": self.needs_training,
            "encoder_decoder": self.encoder_decoder,
            "hparams": self.hparams.__name__,
        }


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (called once, at the end of the method's module)."""
    for key in (method.name, *method.aliases):
        key = key.lower()
        owner = _ALIASES.get(key)
        if owner is not None and owner != method.name:
            raise ValueError(f"Method name {key!r} is taken by {owner!r}.")
        _ALIASES[key] = method.name
    _METHODS[method.name] = method
    return method


def _loaded() -> dict[str, Method]:
    import lmpatch.methods  # noqa: F401 - each method module registers itself

    return _METHODS


def get_method(name: str) -> Method:
    table = _loaded()
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in table:
        raise InvalidRequestError(f"Unknown method {name!r}; available: {', '.join(table)}.")
    return table[key]


def method_names() -> list[str]:
    return list(_loaded())


def all_methods() -> list[Method]:
    return list(_loaded().values())

