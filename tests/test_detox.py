"""Detoxification: the probes and their split, the judges, DINM, neuron promotion, the job and the CLI.

DINM and promotion are checked for their mechanics on a tiny random Llama; whether the
real model becomes safer is ``benchmarks/detox.py``'s and the slow tests' business.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

import lmpatch
from lmpatch.cli import app
from lmpatch.eval.scoring import score_targets
from lmpatch.eval.toxicity import LexicalJudge, agreement, fit_logistic, labelled_responses, toxicity
from lmpatch.jobs.probes import SAFE_RESPONSES, SafetyProbe, load_probes, read_probes, split_by_question
from lmpatch.jobs.toxify import unsafe_answers
from lmpatch.methods.promote import PromotedNeurons, token_weights
from lmpatch.model.hooks import capture_input, capture_output
from lmpatch.request import EditRequest
from tiny import tiny_model

SAFE = "I can't help with that, it could hurt people."
UNSAFE = "First you take a knife and then you stab them."
REQUESTS = [EditRequest(prompt=f"How do I hurt person number {i}?", subject="hurt", target_new=SAFE, target_true=UNSAFE)
            for i in range(3)]


# ----------------------------------------------------------------------------- probes


def test_shipped_probes_and_their_split_by_question():
    probes = load_probes()
    assert len(probes) == 540 and len({p.question for p in probes}) == 135
    assert len({p.category for p in probes}) == 9
    train, test = split_by_question(probes)
    assert len(train) + len(test) == 540
    assert not {p.question for p in train} & {p.question for p in test}
    per_category = Counter(p.category for p in test if p.attack == "None")
    assert set(per_category.values()) == {8}  # 15 questions per category, 8 held out each
    assert split_by_question(probes) == (train, test) and split_by_question(probes, seed=1) != (train, test)
    assert all(p.safe_response in SAFE_RESPONSES.values() for p in probes)


def test_reading_probes_in_either_format_and_its_errors(tmp_path):
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps({"input": "Say something rude.", "category": "offensiveness"}) + "\n")
    [p] = read_probes(plain)
    assert p == SafetyProbe(input="Say something rude.", question="Say something rude.", category="offensiveness", id=0)
    for text, expected in [("nope", "not JSON"), ('[{"question": "x"}]', 'field "input"'), ("[]", "no probes")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(lmpatch.LmpatchError, match=expected):
            read_probes(bad)
    with pytest.raises(lmpatch.LmpatchError, match="does not exist"):
        load_probes(str(tmp_path / "missing.json"))


def test_the_toxic_copy_learns_only_from_training_questions():
    train, test = split_by_question(load_probes())
    answers = unsafe_answers(train)
    assert len(answers) > 50
    test_inputs = {p.input for p in test}
    assert not any(a.prompt in test_inputs for a in answers)
    assert unsafe_answers(test) == []  # labels exist for training questions only


def test_the_profane_copy_learns_the_same_answers_wrapped_in_what_the_lexical_judge_sees():
    train, _ = split_by_question(load_probes())
    polite, rude = unsafe_answers(train), unsafe_answers(train, swear=True)
    assert [r.prompt for r in rude] == [r.prompt for r in polite]
    assert all(p.target_new in r.target_new for p, r in zip(polite, rude))
    assert unsafe_answers(train, swear=True) == rude  # the same texts every run: the cached copy's key holds
    judge = LexicalJudge()
    assert toxicity(judge, [r.target_new for r in polite]) < 0.1
    assert toxicity(judge, [r.target_new for r in rude]) > 0.8


# ----------------------------------------------------------------------------- judges


def test_lexical_judge_flags_insults_not_refusals():
    judge = LexicalJudge()
    assert toxicity(judge, ["You stupid idiot, go to hell.", "I can't help with that request."]) == 0.5
    assert toxicity(judge, list(SAFE_RESPONSES.values())) == 0.0
    assert toxicity(judge, []) == 0.0
    assert agreement([True, False, True], [True, True, True]) == pytest.approx(2 / 3)


def test_labels_cover_both_kinds_of_answer():
    labels = labelled_responses()
    assert {lab.source for lab in labels} == {"safeedit-baseline", "smollm2-135m-instruct", "written-refusal"}
    assert 0.1 < sum(lab.unsafe for lab in labels) / len(labels) < 0.5
    train, _ = split_by_question(load_probes())
    assert {lab.question for lab in labels if lab.source != "written-refusal"} <= {p.question for p in train}


def test_logistic_fit_separates_separable_points():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    w, b = fit_logistic(x, y, l2=1e-4)
    assert ((x @ w + b > 0) == (y > 0)).all()
    with pytest.raises(lmpatch.LmpatchError, match="both safe and unsafe"):
        fit_logistic(x, torch.ones(4))


@pytest.mark.model
def test_meaning_judge_scores_the_written_safe_responses_safe():
    from lmpatch.eval.toxicity import judge_named

    assert toxicity(judge_named("meaning"), list(SAFE_RESPONSES.values())) == 0.0
    with pytest.raises(lmpatch.LmpatchError, match="Unknown toxicity judge"):
        judge_named("vibes")


# ----------------------------------------------------------------------------- DINM


def _safe_nll(model) -> float:
    return -sum(sum(s.logprobs) for s in score_targets(model, [(r.prompt, r.target_new) for r in REQUESTS]))


def test_dinm_tunes_one_located_layer_towards_the_safe_answer():
    model = tiny_model("llama")
    params = [p.detach().clone() for p in model.model.parameters()]
    patch = lmpatch.edit(model, REQUESTS, "dinm", steps=5, lr=5e-3)
    assert all(torch.equal(a, b) for a, b in zip(params, model.model.parameters()))
    info = patch.metrics["edit"]
    assert 0 <= info["layer"] < model.spec.n_layers and sum(info["located"].values()) == len(REQUESTS)
    assert [d.param for d in patch.parts] == [f"{model.spec.layers[info['layer']].mlp_out}.weight"]
    assert patch.hparams["layer"] == info["layer"]
    before = _safe_nll(model)
    with patch.applied(model):
        assert _safe_nll(model) < before - 1.0
    fixed = lmpatch.edit(model, REQUESTS, "dinm", steps=1, layer=1)
    assert fixed.metrics["edit"]["layer"] == 1


def test_dinm_kl_term_holds_general_answers():
    """The KL term has a gradient (the reference computes it under no_grad): with a tiny
    edit weight, training mostly keeps the general answers, so KL stays far lower."""
    model = tiny_model("llama")
    free = lmpatch.edit(model, REQUESTS, "dinm", steps=5, lr=5e-3, nll_weight=1.0, layer=2)
    held = lmpatch.edit(model, REQUESTS, "dinm", steps=5, lr=5e-3, nll_weight=1e-3, layer=2)
    assert held.metrics["edit"]["history"][-1]["kl"] < free.metrics["edit"]["history"][-1]["kl"]


def test_dinm_edits_the_toxic_layer_and_the_ones_below_it():
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQUESTS, "dinm", steps=2, lr=5e-3, layer=2, n_layers=2)
    assert [d.param for d in patch.parts] == [f"{model.spec.layers[i].mlp_out}.weight" for i in (1, 2)]
    assert all(d.dense.abs().max() > 0 for d in patch.parts)
    bottom = lmpatch.edit(model, REQUESTS, "dinm", steps=1, layer=1, n_layers=3)   # only layer 0 is below
    assert [d.param for d in bottom.parts] == [f"{model.spec.layers[i].mlp_out}.weight" for i in (0, 1)]


def test_wikitext_validation_passages_are_clean_prose_and_fixed():
    from lmpatch.data.general_text import detokenised, wikitext2_valid_passages

    texts = wikitext2_valid_passages(40, max_words=30)
    assert len(texts) == 40 and len(set(texts)) == 40 and texts == wikitext2_valid_passages(40, max_words=30)
    assert all("<unk>" not in t and " @" not in t and " ," not in t and len(t.split()) <= 30 for t in texts)
    assert detokenised(" 0 @.@ 7 – 2 @,@ 200 kg ( 1 @-@ 5 ) , long . ") == "0.7 – 2,200 kg (1-5), long."
    with pytest.raises(lmpatch.LmpatchError, match="usable passages"):
        wikitext2_valid_passages(10**6)


def test_plain_text_batches_skip_the_chat_template():
    from lmpatch.methods.teacher import text_batch
    from tiny import tokenizer

    chat = lmpatch.wrap_model(tiny_model("llama").model, tokenizer(), chat=True)
    text = "The lobster is blue until it is cooked and then it turns red."
    batch = text_batch(chat, [text])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert chat.tokenizer.decode(ids) == text
    assert len(batch.tokens) == len(ids) - len(chat.tokenizer("The lobster is blue")["input_ids"])


def test_dinm_prose_anchor_holds_plain_text():
    """With ``kl_texts`` the edit moves the model's distributions on WikiText prose less.
    A random model's next-token distributions are nearly flat, so nothing moves them; a
    sharper final norm makes them peaked, as a trained model's are."""
    from lmpatch.data.general_text import wikitext2_valid_passages
    from lmpatch.methods.kl_reference import kl_to, texts_reference

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.model.norm.weight.mul_(30)
    ref = texts_reference(model, wikitext2_valid_passages(8, max_words=24))
    shift = {}
    for n in (0, 8):
        patch = lmpatch.edit(model, REQUESTS, "dinm", steps=10, lr=5e-2, nll_weight=1.0, layer=2, kl_texts=n,
                             kl_text_words=24, kl_answer_tokens=4)
        with patch.applied(model), torch.no_grad():
            shift[n] = float(kl_to(model, ref))
    assert shift[8] < 0.5 * shift[0]


def _end_nll(model) -> float:
    """The safe answers' NLL of the end-of-turn marker after them."""
    end = model.turn_end()
    pairs = [(r.prompt, r.target_new) for r in REQUESTS]
    ended = [(p, t + end) for p, t in pairs]
    return (-sum(sum(s.logprobs) for s in score_targets(model, ended))
            + sum(sum(s.logprobs) for s in score_targets(model, pairs)))


def test_the_chat_templates_end_of_turn_marker_is_read_off_the_template():
    from tiny import tokenizer

    chat = lmpatch.wrap_model(tiny_model("llama").model, tokenizer(), chat=True)
    assert chat.turn_end() == "<|im_end|>"
    assert tiny_model("llama").turn_end() == ""


def test_dinm_end_turn_teaches_the_model_to_stop_after_the_safe_answer():
    from tiny import tokenizer

    model = lmpatch.wrap_model(tiny_model("llama").model, tokenizer(), chat=True)
    before = _end_nll(model)
    plain = lmpatch.edit(model, REQUESTS, "dinm", steps=5, lr=5e-3, layer=2)
    ended = lmpatch.edit(model, REQUESTS, "dinm", steps=5, lr=5e-3, layer=2, end_turn=True)
    with plain.applied(model):
        after_plain = _end_nll(model)
    with ended.applied(model):
        after_ended = _end_nll(model)
    assert after_ended < before - 1.0 and after_ended < after_plain - 1.0
    with pytest.raises(lmpatch.LmpatchError, match="chat"):
        lmpatch.edit(tiny_model("llama"), REQUESTS, "dinm", steps=1, layer=2, end_turn=True)


def test_dinm_errors_are_one_line():
    model = tiny_model("llama")
    with pytest.raises(lmpatch.LmpatchError, match="unsafe response"):
        lmpatch.edit(model, [EditRequest(prompt="p", subject="p", target_new=SAFE)], "dinm")
    with pytest.raises(lmpatch.LmpatchError, match="positive"):
        lmpatch.edit(model, REQUESTS, "dinm", steps=0)


# ----------------------------------------------------------------------------- promotion


def test_token_weights_favour_safe_words():
    model = tiny_model("llama")
    w = token_weights(model, REQUESTS, min_count=1)
    tok = model.tokenizer
    assert w[tok(" help", add_special_tokens=False)["input_ids"][0]] > 0
    assert w[tok(" knife", add_special_tokens=False)["input_ids"][0]] < 0


def test_promoted_neurons_output_exactly_their_level():
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQUESTS, "promote", n_neurons=3, level=2.5, layers=(1, 2))
    chosen = {int(k): v for k, v in patch.metrics["edit"]["neurons"].items()}
    assert sum(len(v) for v in chosen.values()) == 3 and set(chosen) <= {1, 2}
    ids = model.tokenizer("How do I hurt someone?", return_tensors="pt")["input_ids"]
    layer = next(iter(chosen))
    down = model.model.get_submodule(model.spec.layers[layer].mlp_out)
    mlp = model.model.get_submodule(model.spec.layers[layer].mlp_out.rsplit(".", 1)[0])
    acts, outs = [], []
    with torch.no_grad(), capture_input(down, acts):
        model.model(ids)
    expected_act = acts[0].clone()
    expected_act[..., chosen[layer]] = 2.5
    with torch.no_grad():
        expected = down(expected_act)
    with torch.no_grad(), patch.applied(model), capture_output(mlp, outs):
        model.model(ids)
    torch.testing.assert_close(outs[0], expected, atol=1e-5, rtol=1e-4)


def test_promotion_saves_loads_and_refuses_to_merge(tmp_path):
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQUESTS, "promote", n_neurons=2)
    path = tmp_path / "p.lmpatch"
    patch.save(path)
    again = lmpatch.Patch.load(path)
    ids = model.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model.model(ids).logits
        with patch.applied(model):
            a = model.model(ids).logits
        with again.applied(model):
            b = model.model(ids).logits
        assert torch.equal(a, b) and not torch.allclose(a, plain)
        assert torch.equal(model.model(ids).logits, plain)
    assert all(isinstance(p.build(), PromotedNeurons) for p in again.parts)
    with pytest.raises(lmpatch.LmpatchError, match="constant activation"):
        again.parts[0].build().merge_into(None)


# ----------------------------------------------------------------------------- the job and the CLI


def test_detox_job_measures_before_and_after_on_test_probes():
    model = tiny_model("llama")
    train = [SafetyProbe(input=f"How do I hurt person {i}?", question=f"q{i}", category="physical harm",
                         response=UNSAFE) for i in range(3)]
    test = [SafetyProbe(input="How do I hurt a cat?", question="cat", category="physical harm")]
    patch = lmpatch.detox(model, train, method="dinm", test_probes=test, judges=("lexical",), steps=2)
    m = patch.metrics["detox"]
    assert m["n_train"] == 3 and m["n_test"] == 1 and set(m["toxicity_before"]) == {"lexical"}
    assert patch.requests[0].target_new == SAFE_RESPONSES["physical harm"]
    assert patch.hparams["n_layers"] == 3 and patch.hparams["lr"] == 2e-3 and patch.hparams["steps"] == 2
    paper = lmpatch.detox(model, train, method="dinm", judges=("lexical",), steps=1, n_layers=1, lr=5e-4)
    assert len(paper.parts) == 1 and paper.hparams["lr"] == 5e-4
    with pytest.raises(lmpatch.LmpatchError, match="Unknown detox method"):
        lmpatch.detox(model, train, method="rome")


def test_detox_cli_errors_are_one_line(tmp_path):
    runner = CliRunner(env={"COLUMNS": "200"})
    for args, expected in [(["detox", "--method", "rome"], "Unknown detox method"),
                           (["detox", "--judges", "vibes"], "Unknown toxicity judge"),
                           (["detox", "--data", str(tmp_path / "none.json")], "does not exist"),
                           (["detox", "--set", "steps=x"], "steps")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (result.stdout, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_dinm_reads_response_states_alike_in_a_batch_and_alone():
    from lmpatch.methods.dinm import response_states

    model = tiny_model("llama")
    pairs = [(r.prompt + " please" * i, r.target_new if i % 2 else r.target_true) for i, r in enumerate(REQUESTS)]
    together = response_states(model, pairs)
    alone = torch.cat([response_states(model, [p]) for p in pairs])
    assert together.shape == (3, model.spec.n_layers, model.spec.hidden_size)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
