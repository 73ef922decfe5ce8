"""Encoder-decoder (T5) wiring, on tiny random T5 models built from a config.

No T5 weights can be downloaded here, so these tests check mechanics only - that lmpatch
feeds, scores, decodes and edits a T5 exactly as ``transformers`` runs it - never quality.
The life cycle of every method on T5 (or its clear refusal) is in test_conformance.
"""
from __future__ import annotations

import pytest
import torch

import lmpatch
from facts import REQS
from lmpatch.eval.scoring import generate_ids, score_targets
from lmpatch.methods.learned_editing import top_layer_params
from lmpatch.methods.locate.templates import TemplateConfig, context_templates
from lmpatch.methods.locate.values import ValueConfig, optimize_value
from lmpatch.methods.registry import all_methods
from lmpatch.methods.teacher import PROMPT_LAST, TARGET_NEW, request_nll, target_batch, target_nll
from lmpatch.methods.token_grads import gradient_factors
from lmpatch.model.forced import pair_ids
from tiny import SEQ2SEQ_ARCHS, tiny_model

PAIRS = [(r.prompt, r.target_new) for r in REQS[:3]]


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHS)
def t5(request):
    return tiny_model(request.param)


def _hf_logprobs(model, prompt: str, target: str) -> torch.Tensor:
    """log p(target token j | prompt, target[:j]) as transformers computes it from labels."""
    pt = pair_ids(model, model.format_prompt(prompt), target)
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([pt.prompt_ids]), labels=torch.tensor([pt.target_ids]))
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    return logp.gather(1, torch.tensor(pt.target_ids)[:, None])[:, 0]


def test_the_spec_lists_encoder_blocks_then_decoder_blocks(t5):
    spec = t5.spec
    assert spec.encoder_decoder and spec.encoder_layers == 4 and spec.n_layers == 8
    assert spec.layers[0].block == "encoder.block.0" and spec.layers[4].block == "decoder.block.0"
    assert spec.side(3) == "encoder" and spec.side(4) == "decoder"
    assert spec.final_norm == "decoder.final_layer_norm"
    assert spec.prompt_layer(2) == 2
    with pytest.raises(lmpatch.LmpatchError, match="decoder layer"):
        spec.prompt_layer(5)
    assert spec.depth_layer(0.5, prompt=True) == 2 and spec.depth_layer(0.5) == 4


def test_the_body_and_head_give_the_models_own_logits(t5):
    ids = torch.tensor([[5, 6, 7, 8]])
    dec = torch.tensor([[t5.spec.decoder_start_id, 9, 10]])
    with torch.no_grad():
        full = t5.model(input_ids=ids, decoder_input_ids=dec).logits
        body = t5.forward(body_only=True, input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec)
        assert torch.allclose(t5.logits(body.last_hidden_state), full, atol=1e-5)


def test_scores_are_the_decoders_label_log_probabilities_whatever_the_batch(t5):
    batched = score_targets(t5, PAIRS, batch_size=3)
    left = score_targets(t5, PAIRS, batch_size=3, padding_side="left")
    for (prompt, target), score, other in zip(PAIRS, batched, left):
        expected = _hf_logprobs(t5, prompt, target)
        assert torch.allclose(torch.tensor(score.logprobs), expected, atol=1e-4)
        assert torch.allclose(torch.tensor(other.logprobs), expected, atol=1e-4)


def test_teacher_losses_read_the_target_from_the_decoder(t5):
    for request in REQS[:2]:
        prompt, target = request.prompt, request.target_new
        expected = _hf_logprobs(t5, prompt, target)
        with torch.no_grad():
            assert torch.isclose(target_nll(t5, target_batch(t5, [request], TARGET_NEW)), -expected.mean(), atol=1e-4)
            # FT-L reads every target token where the first one is predicted (decoder position 0)
            first = torch.log_softmax(t5.model(
                input_ids=torch.tensor([pair_ids(t5, prompt, target).prompt_ids]),
                decoder_input_ids=torch.tensor([[t5.spec.decoder_start_id]])).logits[0, 0], -1)
            tokens = torch.tensor(pair_ids(t5, prompt, target).target_ids)
            assert torch.isclose(target_nll(t5, target_batch(t5, [request], PROMPT_LAST)), -first[tokens].mean(),
                                 atol=1e-4)


def test_greedy_decoding_equals_transformers_generate(t5):
    prompts = [p for p, _ in PAIRS]
    ours = generate_ids(t5, prompts, max_new_tokens=6, batch_size=3)
    for prompt, row in zip(prompts, ours):
        ids = torch.tensor([pair_ids(t5, prompt, "x").prompt_ids])
        ref = t5.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, num_beams=1,
                                eos_token_id=sorted(t5.stop_ids))[0, 1:].tolist()
        cut = next((i for i, t in enumerate(ref) if t in t5.stop_ids), len(ref))
        assert row == ref[:cut]


def test_gradient_factors_match_autograd_in_the_encoder_and_the_decoder(t5):
    names = top_layer_params(t5, 1, ("mlp_out",))
    assert names == [t5.spec.layers[3].mlp_out + ".weight", t5.spec.layers[7].mlp_out + ".weight"]
    modules = [t5.model.get_submodule(n.rsplit(".", 1)[0]) for n in names]
    factors, _ = gradient_factors(t5, modules, REQS[:2])
    for row, request in enumerate(REQS[:2]):
        for m in modules:
            m.weight.requires_grad_(True)
            m.weight.grad = None
        request_nll(t5, target_batch(t5, [request], TARGET_NEW)).sum().backward()
        for m, f in zip(modules, factors):
            assert m.weight.grad.abs().max() > 0
            assert torch.allclose(m.weight.grad, f.gradient(row), rtol=1e-4, atol=1e-5)
            m.weight.requires_grad_(False)
            m.weight.grad = None


def test_fine_tuning_the_decoder_makes_the_target_the_answer(t5):
    patch = lmpatch.edit(t5, REQS[0], "ft-m", steps=40, lr=1e-2)
    assert all(p.param.startswith("decoder.") for p in patch.parts)  # 0.66 of 8 blocks: decoder block 1
    with patch.applied(t5):
        score = score_targets(t5, [(REQS[0].prompt, REQS[0].target_new)])[0]
    assert score.token_accuracy == 1.0


def test_rome_optimises_its_value_in_the_encoder_and_raises_the_target(t5, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path))
    templates = context_templates(t5, TemplateConfig(lengths=((3, 2),)))
    value = optimize_value(t5, REQS[0], 1, templates, ValueConfig(steps=10, weight_decay=1e-3))
    assert value.losses[-1] < value.losses[0] and value.delta.norm() > 0
    before = score_targets(t5, [(REQS[0].prompt, REQS[0].target_new)])[0].mean_logprob
    patch = lmpatch.edit(t5, REQS[0], "rome", layer=1, v_steps=10, template_lengths=((3, 2),), mom2_adjustment=False)
    assert [p.param for p in patch.parts] == [t5.spec.layers[1].mlp_out + ".weight"]
    with patch.applied(t5):
        assert score_targets(t5, [(REQS[0].prompt, REQS[0].target_new)])[0].mean_logprob > before
    with pytest.raises(lmpatch.LmpatchError, match="only the encoder"):
        lmpatch.edit(t5, REQS[0], "rome", layer=6, v_steps=2, template_lengths=((3, 2),), mom2_adjustment=False)


def test_methods_say_whether_they_edit_encoder_decoders(t5):
    able = sorted(m.name for m in all_methods() if m.capabilities()["encoder_decoder"])
    assert able == ["ft-ga", "ft-l", "ft-m", "ke", "mend", "r-rome", "rome"]
    with pytest.raises(lmpatch.LmpatchError, match="does not edit encoder-decoder models.*methods that do: "):
        lmpatch.edit(t5, REQS[0], "memit")


def _seq2seq(config) -> lmpatch.LoadedModel:
    import transformers

    from tiny import tokenizer

    torch.manual_seed(0)
    return lmpatch.wrap_model(transformers.AutoModelForSeq2SeqLM.from_config(config), tokenizer())


def test_the_head_is_found_by_a_pass_not_by_config_names():
    """T5 scales the decoder output before its head, mT5 does not (both configs say
    tie_word_embeddings); BART adds a logits bias lmpatch does not model and is refused."""
    import transformers

    from tiny import tokenizer

    tok = tokenizer()
    mt5 = _seq2seq(transformers.MT5Config(vocab_size=len(tok), d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2,
                                          pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id))
    assert mt5.spec.logit_scale is None and tiny_model("t5").spec.logit_scale == 64 ** -0.5
    assert score_targets(mt5, PAIRS[:1])[0].logprobs == pytest.approx(_hf_logprobs(mt5, *PAIRS[0]).tolist(), abs=1e-4)
    bart = _seq2seq(transformers.BartConfig(
        vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id))
    with torch.no_grad():
        bart.model.final_logits_bias.add_(1.0)
    with pytest.raises(lmpatch.LmpatchError, match="final_logits_bias"):
        bart.spec
