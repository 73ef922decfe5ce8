"""The identity hot-fix: its requests and errors, and one real-model check of the default method.

The real-model test is in the default suite (as the issue asks): the embedded chat model
edited on the five identity questions must answer one question it was not edited on
with the new name or maker, and one unrelated question exactly as before. (Of the five
held-out questions, GRACE covers four; "Who developed you?" falls outside its radius:
see docs/applications.md.)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lmpatch
from lmpatch.errors import InvalidRequestError
from lmpatch.jobs.identity import (
    EDIT_QUESTIONS,
    HELD_OUT_QUESTIONS,
    TUNING_IDENTITY,
    TUNING_UNRELATED,
    UNRELATED_QUESTIONS,
    before_after,
    hotfix_identity,
    identity_answer,
    identity_requests,
    mentions,
)
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_question_sets_are_disjoint():
    """Reported questions are neither edited nor tuned on."""
    sets = [EDIT_QUESTIONS, HELD_OUT_QUESTIONS, UNRELATED_QUESTIONS, TUNING_IDENTITY, TUNING_UNRELATED]
    flat = [q for s in sets for q in s]
    assert len(flat) == len(set(flat))
    assert len(EDIT_QUESTIONS) + len(HELD_OUT_QUESTIONS) == 10 and len(UNRELATED_QUESTIONS) == 10


def test_requests_address_the_assistant_and_share_one_answer():
    requests = identity_requests(" Nova ", "Acme Labs")
    assert {r.target_new for r in requests} == {identity_answer("Nova", "Acme Labs")}
    assert all(r.subject in r.prompt for r in requests)
    with pytest.raises(InvalidRequestError, match="does not address"):
        identity_requests("Nova", "Acme", ["What is the capital of France?"])
    with pytest.raises(InvalidRequestError, match="--name"):
        identity_requests("  ", "Acme")
    with pytest.raises(InvalidRequestError, match="--maker"):
        identity_requests("Nova", "")


def test_mentions_is_case_insensitive_on_name_or_maker():
    assert mentions("i am nova.", "Nova", "Acme Labs") and mentions("Made by ACME LABS", "Nova", "Acme Labs")
    assert not mentions("I am SmolLM, made by Hugging Face.", "Nova", "Acme Labs")


def test_a_model_without_the_chat_template_is_refused():
    with pytest.raises(InvalidRequestError, match="chat=True"):
        hotfix_identity(tiny_model("llama"), "Nova", "Acme Labs")


def test_the_example_refuses_a_bad_method_in_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "identity_hotfix.py"), "--name", "Nova",
                          "--maker", "Acme", "--method", "nope"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "error:" in run.stderr and "nope" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.model
def test_real_chat_model_takes_its_new_identity(real_model):
    chat = lmpatch.wrap_model(real_model.model, real_model.tokenizer, name=real_model.name, chat=True)
    held_out, unrelated = "Who built you?", "What is the capital of France?"
    assert held_out in HELD_OUT_QUESTIONS and unrelated in UNRELATED_QUESTIONS
    patch = hotfix_identity(chat, "Zorblat", "Quillfeather Labs")
    [ident, other] = before_after(chat, patch, [held_out, unrelated], max_new_tokens=24)
    assert not mentions(ident.before, "Zorblat", "Quillfeather Labs")
    assert mentions(ident.after, "Zorblat", "Quillfeather Labs"), ident.after
    assert other.after == other.before
