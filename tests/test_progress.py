"""transformers' own progress bars follow lmpatch's progress settings."""
from __future__ import annotations

import io
import sys

import pytest
from huggingface_hub import utils as hub_utils
from transformers.utils import logging as hf_logging

from lmpatch.progress import quiet_transformers
from tiny import tiny_model


@pytest.fixture(autouse=True)
def restore_bars():
    """Tests here flip a process-wide switch: put it back as it was."""
    was, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    yield
    hf_logging.enable_progress_bar() if was else hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars() if hub_off else hub_utils.enable_progress_bars()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    m = tiny_model("llama")
    m.model.save_pretrained(path)
    m.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("before", [True, False])
def test_hidden_inside_and_previous_state_restored(before):
    hf_logging.enable_progress_bar() if before else hf_logging.disable_progress_bar()
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() is before
    assert hub_utils.are_progress_bars_disabled() is (not before)


def test_show_turns_bars_on_and_state_is_restored_after_an_error():
    hf_logging.disable_progress_bar()
    with pytest.raises(RuntimeError):
        with quiet_transformers(show=True):
            assert hf_logging.is_progress_bar_enabled()
            raise RuntimeError("load failed")
    assert not hf_logging.is_progress_bar_enabled()


def test_inner_default_call_follows_the_enclosing_choice():
    """The loader's own quiet_transformers() must not undo the CLI's -vv around it."""
    hf_logging.disable_progress_bar()
    with quiet_transformers(show=True):
        with quiet_transformers():
            assert hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
    with quiet_transformers(show=False), quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
    assert not hf_logging.is_progress_bar_enabled()


def test_loading_weights_bar_is_gone(tiny_dir, capfd):
    from transformers import AutoModelForCausalLM

    hf_logging.enable_progress_bar()
    AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert "Loading weights" in capfd.readouterr().err  # the bar this is about really exists
    with quiet_transformers():
        AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert "Loading weights" not in capfd.readouterr().err


def test_cli_model_load_shows_the_bar_only_at_vv(tiny_dir, tmp_path, monkeypatch):
    """Through the CLI's loader: hidden by default, shown with -vv (transformers' verbose level)."""
    from lmpatch.cli.models import load
    from lmpatch.cli.options import Settings

    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    for verbosity, shown in ((0, False), (1, False), (2, True)):
        hf_logging.enable_progress_bar()  # as a library user may have left it
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        load(Settings(verbosity=verbosity), str(tiny_dir), show=False)
        assert ("Loading weights" in sys.stderr.getvalue()) is shown, verbosity
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting survives the load


def test_a_bar_off_a_terminal_still_says_how_far_it_got(capsys, monkeypatch):
    """In a log file rich draws a bar once, at the end; a plain line at intervals says more."""
    import io

    from rich.console import Console

    import lmpatch.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = progress._Progress(every=30, console=Console(file=log, force_terminal=False), get_time=lambda: now[0])
    with bar:
        task = bar.add_task("training", total=10)
        for _ in range(10):
            now[0] += 10
            bar.advance(task)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("training:")]
    assert lines == ["training: 3/10 after 30 s, eta 70 s", "training: 6/10 after 60 s, eta 40 s",
                     "training: 9/10 after 90 s, eta 10 s"], log.getvalue()
