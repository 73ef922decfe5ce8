"""Input a model cannot read is refused at once, in lmpatch's words, wherever it comes in.

Before, a GPT-2's learned positions failed as an IndexError inside torch, and a rotary
model generated on past its positions for as long as it was asked to.
"""
from __future__ import annotations

import pytest

import lmpatch
from lmpatch.errors import InvalidRequestError
from lmpatch.eval.scoring import generate
from lmpatch.request import EditRequest
from tiny import MAX_POSITIONS, tiny_model

EIFFEL = dict(prompt="The Eiffel Tower is located in", subject="The Eiffel Tower", target_new="Rome")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_model(request.param)


def test_generation_beyond_the_positions_is_refused_before_it_starts(model):
    assert len(generate(model, ["Hi"], max_new_tokens=3)) == 1
    with pytest.raises(InvalidRequestError, match=f"plus max_new_tokens \\({MAX_POSITIONS}\\) exceeds the model's "
                                                  f"{MAX_POSITIONS} positions"):
        generate(model, ["Hi"], max_new_tokens=MAX_POSITIONS)
    with pytest.raises(InvalidRequestError, match="Prompt 2 .* exceeds"):
        generate(model, ["Hi", "word " * MAX_POSITIONS], max_new_tokens=2)


def test_generation_arguments_are_checked_in_lmpatchs_words(model):
    for prompt, n, message in (("Hi", 0, "max_new_tokens must be whole numbers >= 1"),
                               ("Hi", -3, "max_new_tokens must be whole numbers >= 1"),
                               (None, 3, "prompts must be a list of strings")):
        with pytest.raises(InvalidRequestError, match=message):
            model.generate_text(prompt, max_new_tokens=n)
    if not model.tokenizer("", add_special_tokens=True)["input_ids"]:  # nothing at all to continue
        with pytest.raises(InvalidRequestError, match="The prompt is empty"):
            model.generate_text("")


def test_an_edit_whose_texts_do_not_fit_is_refused_before_any_work(model):
    long = "word " * MAX_POSITIONS
    for request in (EditRequest(**{**EIFFEL, "prompt": long + EIFFEL["prompt"]}),
                    EditRequest(**EIFFEL, rephrase=(long + "Where is the Eiffel Tower?",))):
        with pytest.raises(InvalidRequestError, match=f"beyond the model's {MAX_POSITIONS} positions"):
            lmpatch.edit(model, request, "grace")
