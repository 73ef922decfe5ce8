"""Loading the model a command works on, with a spinner on stderr."""
from __future__ import annotations

import time

from lmpatch.cli.console import spinner
from lmpatch.cli.options import Settings
from lmpatch.model.loading import LoadedModel, load_model
from lmpatch.progress import quiet_transformers


def load(settings: Settings, model: str | None, chat: bool = False, show: bool = True) -> tuple[LoadedModel, float]:
    """The loaded model and the seconds it took."""
    if model:
        label = f"Loading {model}"
    else:
        label = ("Loading SmolLM2-135M-Instruct (the very first run converts the embedded weights "
                 "to float32 once and caches them)")
    t0 = time.perf_counter()
    # transformers' own "Loading weights" bar would break through the spinner; it is shown
    # only at -vv, like the rest of transformers' output (see console.setup_logging).
    with spinner(label + " ...", enabled=show), quiet_transformers(show=settings.verbosity > 1):
        loaded = load_model(model, device=settings.device, chat=chat)
    return loaded, time.perf_counter() - t0


def describe(model: LoadedModel) -> str:
    """``smollm2-135m-instruct (135M parameters, 30 layers, cpu)``."""
    n = sum(p.numel() for p in model.model.parameters())
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return f"{model.name} ({size} parameters, {len(model.spec.layers)} layers, {model.device})"
