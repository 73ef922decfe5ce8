"""Shared test setup: no network, the real model loaded at most once per session.

``LMPATCH_CACHE`` is left as the environment (the Makefile) sets it: the real-model
tests rely on the float32 copy of the embedded model already being in that cache.
"""
from __future__ import annotations

import os

import pytest

# Set before transformers/huggingface_hub are imported by any test module, because
# huggingface_hub reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct as a LoadedModel (tests must not leave it edited)."""
    import lmpatch

    return lmpatch.load_model()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tokenizer every tiny model uses (shared: do not mutate)."""
    from tiny import tokenizer

    return tokenizer()


@pytest.fixture(autouse=True)
def own_target_cache(tmp_path, monkeypatch):
    """Every test starts with an empty cache of optimised targets (methods.locate.target_cache),
    so no test is served targets another test (or an earlier run) computed."""
    from lmpatch.methods.locate import target_cache

    monkeypatch.setattr(target_cache, "cache_dir", lambda: tmp_path / "lmpatch-cache")
