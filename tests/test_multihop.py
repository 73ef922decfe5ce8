"""MQuAKE: the shipped subset loads faithfully, prompts and answers follow the official
format, and the multi-hop loop edits, asks, judges and restores the model."""
from __future__ import annotations

import gzip
import hashlib
import json

import pytest
import torch

import lmpatch
from lmpatch.data.mquake import MQuAKECase, default_path, load_mquake, parse_case, prompt_path
from lmpatch.errors import InvalidRequestError
from lmpatch.eval import prefix as prefix_module
from lmpatch.eval.multihop import (
    PROMPTS,
    answer_matches,
    ask,
    multihop_accuracy,
    normalize_answer,
    prompt_format,
)
from lmpatch.eval.scoring import generate, generate_ids
from lmpatch.patch import Patch, WeightDelta
from tiny import tiny_model

SUBSET_SHA256 = "9abf123015bff90a76b17801af902e845e93789232b5113c4310013187c77579"


@pytest.fixture(scope="module")
def raw_records() -> list[dict]:
    return json.loads(gzip.decompress(default_path().read_bytes()))


@pytest.fixture(scope="module")
def cases() -> list[MQuAKECase]:
    return load_mquake()


# --------------------------------------------------------------------------- loader


def test_shipped_subset_is_the_documented_file():
    data = gzip.decompress(default_path().read_bytes())
    assert hashlib.sha256(data).hexdigest() == SUBSET_SHA256
    assert (default_path().parent / "ATTRIBUTION.md").is_file()
    assert (default_path().parent / "LICENSE").is_file()


def test_loader_counts(cases):
    assert len(cases) == 254
    assert len({c.case_id for c in cases}) == 254
    assert all(len(c.questions) == 3 for c in cases)
    edits = [len(c.requests) for c in cases]
    assert (edits.count(1), edits.count(2), edits.count(3)) == (197, 52, 5)
    hops = [c.n_hops for c in cases]
    assert (hops.count(2), hops.count(3), hops.count(4)) == (104, 95, 55)
    assert load_mquake(n=5) == cases[:5]


def test_first_case_matches_upstream_record(cases, raw_records):
    case, raw = cases[0], raw_records[0]
    assert case.case_id == 1
    (req,) = case.requests
    assert req.prompt == "Ellie Kemper is a citizen of"
    assert req.subject == "Ellie Kemper"
    assert req.target_new == "Croatia"
    assert req.target_true == "United States of America"
    assert req.case_id == "1" and req.meta["relation_id"] == "P27"
    assert case.questions == tuple(raw["questions"])
    assert case.questions[0] == "Who is the head of state of the country where Ellie Kemper holds a citizenship?"
    assert case.new_answer == "Kolinda Grabar-Kitarović"
    assert case.new_answer_aliases == ("Grabar-Kitarović",)
    assert case.answer == "Donald Trump" and "Donald J. Trump" in case.answer_aliases
    assert case.gold("new") == ("Kolinda Grabar-Kitarović", "Grabar-Kitarović")
    assert [h.cloze for h in case.new_single_hops] == [
        "Ellie Kemper is a citizen of",
        "The name of the current head of state in Croatia is",
    ]
    assert case.single_hops[0].answer == "United States of America"


def test_every_request_is_its_template_filled_with_the_subject(cases, raw_records):
    for case, raw in zip(cases, raw_records):
        for req, rw in zip(case.requests, raw["requested_rewrite"], strict=True):
            assert req.prompt == rw["prompt"].format(rw["subject"])
            assert req.target_new == rw["target_new"]["str"]


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.pop("questions"), "missing questions"),
        (lambda r: r.update(questions=[]), "questions must be a non-empty list"),
        (lambda r: r.update(requested_rewrite=[]), "no requested_rewrite"),
        (lambda r: r["requested_rewrite"][0].update(prompt="Ellie Kemper is a citizen of"), "exactly once"),
        (lambda r: r["requested_rewrite"][0].update(target_new={"str": "", "id": "Q1"}), "target_new"),
        (lambda r: r["requested_rewrite"][0].update(target_new=r["requested_rewrite"][0]["target_true"]),
         "nothing to change"),
        (lambda r: r.update(new_answer=None), "new_answer"),
        (lambda r: r.update(case_id="one"), "integers"),
    ],
)
def test_malformed_records_raise_one_clear_error(raw_records, mutate, fragment):
    record = json.loads(json.dumps(raw_records[0]))
    mutate(record)
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        parse_case(record)
    assert "\n" not in str(info.value)


def test_malformed_file_and_bad_n(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"case_id": 3, "questions": ["q?"]}]))
    with pytest.raises(InvalidRequestError, match="MQuAKE case 3 is missing requested_rewrite"):
        load_mquake(path)
    with pytest.raises(InvalidRequestError, match="positive"):
        load_mquake(n=0)


# --------------------------------------------------------------------------- prompts & answers


def test_official_prompt_files_are_shipped():
    demos = prompt_path("multihop-prompts.txt").read_text()
    assert demos.startswith("Q: What is the country where The Rotunda is located? A: United States of America")
    assert demos.count("\nQ: ") == 15 and not demos.endswith("\n")
    assert prompt_path("multihop-cot-prompts.txt").read_text().startswith("Question: ")
    for name in ("MeLLo-prompt.txt", "rel-prompts.json", "templates/cloze_templates.json"):
        assert prompt_path(name).stat().st_size > 0


def test_prompt_assembly_continues_the_demonstrations():
    fmt = prompt_format("multihop")
    demos = fmt.demonstrations()
    built = fmt.build(demos, "Who is the spouse of the UK prime minister?")
    assert built == demos + "\nQ: Who is the spouse of the UK prime minister? A:"
    # The new question is laid out exactly like a demonstration line.
    assert built.rsplit("\n", 1)[1].startswith("Q: ") and built.endswith("? A:")
    cot = prompt_format("cot")
    assert cot.build(cot.demonstrations(), "Q?").endswith("General Motors\n\nQuestion: Q?\nThoughts:")
    with pytest.raises(InvalidRequestError, match="Unknown multi-hop prompt"):
        prompt_format("mello")


def test_answer_parsing():
    fmt = PROMPTS["multihop"]
    assert fmt.parse(" Jill Biden\nQ: Who is the spouse of") == "Jill Biden"
    assert fmt.parse(" Washington, D.C.") == "Washington, D.C."
    assert fmt.parse("\nQ: next") == ""
    assert not fmt.complete(" Jill Bi") and fmt.complete(" Jill Biden\n")
    cot = PROMPTS["cot"]
    gen = " X was made by Y. Y is in Japan.\nAnswer: Japan\n\nQuestion: next"
    assert cot.parse(gen) == "Japan"
    assert cot.parse(" thinking without an answer") == ""
    assert not cot.complete(" Y is in Japan.\nAnswer: Jap") and cot.complete(gen)


def test_answer_matching_rules():
    gold = ("United States of America", "USA", "the United States")
    assert answer_matches(" USA ", gold, "exact")
    assert not answer_matches("The United States of America", gold, "exact")  # MQuAKE is case-sensitive
    assert answer_matches("The United States of America", gold, "normalized")
    assert answer_matches("united states.", gold, "normalized")
    assert not answer_matches("It is the United States of America today", gold, "normalized")
    assert answer_matches("It is the United States of America today", gold, "contains")
    assert not answer_matches("USAF", gold, "contains")  # whole words only
    assert not answer_matches("", gold, "contains") and not answer_matches("", ("",), "exact")
    assert not answer_matches("the", ("The",), "contains")  # an alias that normalises to nothing
    assert normalize_answer("  The Kolinda  Grabar-Kitarović! ") == "kolinda grabar kitarović"
    with pytest.raises(InvalidRequestError, match="Unknown answer match"):
        answer_matches("a", ("a",), "fuzzy")


# --------------------------------------------------------------------------- generation & loop


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sharp():
    """A tiny Llama whose attention is peaked, so that positions and masks change its output.

    At random initialisation attention is nearly uniform and a wrong position or an
    unmasked pad would go unnoticed; scaled-up queries and keys make it matter.
    """
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return model


def _without_prefix(monkeypatch):
    monkeypatch.setattr(prefix_module, "MIN_SHARED", 10**9)


def test_shared_prefix_generation_equals_plain_generation(sharp, cases, monkeypatch):
    # Questions of different lengths in one batch: pads sit between prefix and question.
    questions = [q for c in cases[:3] for q in c.questions]
    texts, answers = ask(sharp, questions, max_new_tokens=6, batch_size=4)
    _without_prefix(monkeypatch)
    ref_texts, ref_answers = ask(sharp, questions, max_new_tokens=6, batch_size=4)
    # Both paths stop at a finished answer line, so they give the same text.
    assert (texts, answers) == (ref_texts, ref_answers)
    assert any(t for t in texts)


def test_padding_between_prefix_and_question_is_invisible(sharp, monkeypatch):
    # A shared prefix and very unequal questions: most of a short row is padding.
    shots = "Q: Paris? A: France\n" * 30
    prompts = [shots + "Q: Rome?", shots + "Q: " + "Which river flows through " * 6 + "Rome?"]
    calls = []
    real = prefix_module.read_prefix
    monkeypatch.setattr(prefix_module, "read_prefix", lambda m, ids: calls.append(len(ids)) or real(m, ids))
    cached = generate(sharp, prompts, max_new_tokens=6, batch_size=2)
    assert calls  # the prefix path was taken
    _without_prefix(monkeypatch)
    assert cached == generate(sharp, prompts, max_new_tokens=6, batch_size=1)


@pytest.mark.parametrize("shared", [True, False])
def test_generation_stops_when_the_answer_is_complete(tiny, cases, monkeypatch, shared):
    if not shared:
        _without_prefix(monkeypatch)
    prompts = [prompt_format("multihop").build(prompt_format("multihop").demonstrations(), q)
               for q in cases[0].questions]
    full = generate_ids(tiny, prompts, max_new_tokens=5)
    cut = generate_ids(tiny, prompts, max_new_tokens=5, complete=lambda text: True)
    assert all(f[: len(c)] == c for f, c in zip(full, cut))
    assert [len(c) for c in cut] == [1] * len(prompts) < [len(f) for f in full]


def _first_weight(model: lmpatch.LoadedModel) -> tuple[str, torch.Tensor]:
    name = model.spec.layers[0].mlp_out + ".weight"
    return name, model.model.get_parameter(name)


def test_multihop_loop_edits_each_case_and_restores_the_model(tiny, cases):
    name, weight = _first_weight(tiny)
    before = weight.detach().clone()
    seen: list[list[lmpatch.EditRequest]] = []

    def edit_fn(model, requests):
        seen.append(requests)
        gen = torch.Generator().manual_seed(len(seen))
        delta = WeightDelta(param=name, dense=torch.randn(before.shape, generator=gen))
        return Patch(parts=[delta], method="test", model_fingerprint=model.fingerprint, model_name=model.name)

    two = cases[:2]
    pre = multihop_accuracy(tiny, two, max_new_tokens=4, progress=False)
    post = multihop_accuracy(tiny, two, edit_fn, max_new_tokens=4, progress=False)

    assert torch.equal(weight, before)  # every patch was reverted
    assert [len(r) for r in seen] == [len(c.requests) for c in two]
    assert seen[0] == list(two[0].requests)
    for result, edited, gold in ((pre, False, "original"), (post, True, "new")):
        assert result.edited is edited and result.gold == gold
        assert result.n_cases == 2 and result.n_questions == 6
        assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.question_accuracy <= 1.0
        assert result.tag == "generation_multihop_exact" and "MQuAKE's rule" in result.protocol
        assert [r.case_id for r in result.records] == [c.case_id for c in two]
        assert all(len(r.generations) == len(r.answers) == len(r.correct) == 3 for r in result.records)
        assert set(result.accuracy_by_match) == {"exact", "normalized", "contains"}
    # The edit changed the weights the questions were asked with.
    assert [r.generations for r in pre.records] != [r.generations for r in post.records]
    assert json.loads(json.dumps(post.to_dict()))["records"][0]["case_id"] == two[0].case_id


def test_case_is_correct_when_any_question_is(tiny, cases, monkeypatch):
    case = cases[0]
    import lmpatch.eval.multihop as mh

    def fake_ask(model, questions, **kw):
        answers = ["Zagreb", "Kolinda Grabar-Kitarović", "Donald Trump"][: len(questions)]
        return [f" {a}\n" for a in answers], answers

    monkeypatch.setattr(mh, "ask", fake_ask)
    post = multihop_accuracy(tiny, [case], gold="new", progress=False)
    assert post.accuracy == 1.0 and post.question_accuracy == pytest.approx(1 / 3)
    assert post.records[0].correct == (False, True, False)
    assert post.records[0].matches_other == (False, False, True) and post.other_accuracy == 1.0
    assert post.by_hops == {2: {"n": 1, "accuracy": 1.0}}


def test_bad_arguments(tiny, cases):
    with pytest.raises(InvalidRequestError, match="No MQuAKE cases"):
        multihop_accuracy(tiny, [], progress=False)
    with pytest.raises(InvalidRequestError, match="Unknown answer match"):
        multihop_accuracy(tiny, cases[:1], match="fuzzy", progress=False)
    with pytest.raises(InvalidRequestError, match="must return a Patch"):
        multihop_accuracy(tiny, cases[:1], lambda m, reqs: None, max_new_tokens=1, progress=False)
    with pytest.raises(InvalidRequestError, match="load_model"):
        multihop_accuracy(tiny.model, cases[:1], progress=False)


@pytest.mark.model
@pytest.mark.slow
def test_unedited_smollm2_answers_multihop_questions(real_model, cases, monkeypatch):
    result = multihop_accuracy(real_model, cases[:5], progress=False)
    assert result.n_cases == 5 and result.n_questions == 15
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.question_accuracy <= 1.0
    answers = [a for r in result.records for a in r.answers]
    # The few-shot format is followed: a short answer, then the line ends.
    assert all(a and len(a) < 80 for a in answers)
    assert sum("\n" in g for r in result.records for g in r.generations) >= 12
    # The prefix-cached decoder gives the real model the same answers as plain generation.
    questions = [q for c in cases[:2] for q in c.questions]
    cached = ask(real_model, questions)[1]
    monkeypatch.setattr(prefix_module, "MIN_SHARED", 10**9)
    assert cached == ask(real_model, questions)[1]
