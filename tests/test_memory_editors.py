"""IKE and MemPrompt: what they store, when a stored fact is used, and how the prompt is built.

They run the real MiniLM retriever (``model`` marker) on a tiny language model: the
language model only has to format prompts here; quality on SmolLM2 is in test_quality.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import lmpatch
from facts import REQS
from lmpatch.errors import InvalidRequestError, PatchError
from lmpatch.methods.demonstrations import demonstration_kinds, demonstration_pool, nearest_demonstrations
from lmpatch.methods.ike import IkeHparams, choose_demonstrations, statement
from lmpatch.methods.memprompt import pattern
from lmpatch.methods.negatives import held_out, training_records
from tiny import tiny_model

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_ike_pool_has_the_three_kinds_and_no_held_out_prompt():
    pool = demonstration_pool(60)
    skip = held_out()
    assert pool and all(d.startswith("New Fact: ") and d.endswith("\n\n") for d in pool)
    prompts = [d.split("\nPrompt: ", 1)[1] for d in pool]
    assert not any(p.strip() in skip for p in prompts)
    facts = {d.split("\n", 1)[0] for d in pool}
    assert len(pool) > 2 * len(facts)  # most records give copy, update and retain demonstrations
    kinds = demonstration_kinds(60)
    assert len(kinds) == len(pool) and set(kinds) == {"copy", "update", "retain"}
    first = training_records()[0]
    assert kinds[pool.index(f"New Fact: {statement(first)}\nPrompt: {first.prompt} {first.target_new}\n\n")] == "copy"
    with pytest.raises(InvalidRequestError, match="tuning"):
        demonstration_pool(5001)


def test_ike_demonstrations_are_the_nearest_least_similar_first_with_the_edit_copy_last():
    hp = IkeHparams(k=4, pool_records=60)
    fact = statement(REQS[0])
    demos = choose_demonstrations(fact, hp)
    assert len(demos) == 5 and demos[-1] == f"New Fact: {fact}\nPrompt: {fact}\n\n"
    assert set(demos[:-1]) <= set(demonstration_pool(60))
    wider = choose_demonstrations(fact, dataclasses.replace(hp, k=8))
    assert wider[-5:-1] == demos[:-1]  # the 4 nearest are the last 4 of the 8 nearest
    assert choose_demonstrations(fact, dataclasses.replace(hp, k=0)) == [demos[-1]]


def test_ike_puts_demonstrations_and_the_fact_before_every_prompt(lm):
    patch = lmpatch.edit(lm, REQS[0], "ike", k=2, pool_records=60)
    entry = patch.memories[0].entries[0]
    with patch.applied(lm):
        for prompt in (REQS[0].prompt, "Water boils at"):  # no scope test: every prompt gets it
            text = lm.format_prompt(prompt)
            assert text == "".join(entry["demos"]) + f"New Fact: {entry['fact']}\nPrompt: {prompt}"
    assert lm.format_prompt("Water boils at") == "Water boils at"


def test_sequential_ike_uses_the_nearest_edit(lm):
    a = lmpatch.edit(lm, REQS[0], "ike", k=0, pool_records=60)
    b = lmpatch.edit(lm, REQS[1], "ike", k=0, pool_records=60)
    with a.applied(lm), b.applied(lm):
        assert len(lm.stack.memories()) == 1
        for r in REQS[:2]:
            assert f"New Fact: {statement(r)}\nPrompt: {r.prompt}" in lm.format_prompt(r.prompt)


def test_ike_settings_are_checked(lm):
    with pytest.raises(InvalidRequestError, match="end with {query}"):
        lmpatch.edit(lm, REQS[0], "ike", template="{query} {fact}")
    with pytest.raises(InvalidRequestError, match="k"):
        lmpatch.edit(lm, REQS[0], "ike", k=-1)


def test_memprompt_uses_feedback_only_above_its_threshold(lm):
    request = REQS[0]
    patch = lmpatch.edit(lm, request, "memprompt")
    feedback = f"{request.prompt} {request.target_new}"
    assert patch.memories[0].entries == [{"fact": feedback, "pattern": pattern(request.prompt)}]
    with patch.applied(lm):
        assert lm.format_prompt(request.prompt) == f"Feedback: {feedback}\n{request.prompt}"
        assert lm.format_prompt(request.prompt.upper()) != request.prompt.upper()  # keys are case-folded
        assert lm.format_prompt("Water boils at a temperature of") == "Water boils at a temperature of"
    strict = lmpatch.edit(lm, request, "memprompt", threshold=1.0)
    with strict.applied(lm):
        assert lm.format_prompt(request.prompt + " the") == request.prompt + " the"


def test_memprompt_takes_the_users_feedback(lm):
    request = dataclasses.replace(REQS[0], meta={"feedback": "Answer with the new fact."})
    patch = lmpatch.edit(lm, request, "memprompt")
    with patch.applied(lm):
        assert lm.format_prompt(request.prompt).startswith("Feedback: Answer with the new fact.\n")
    with pytest.raises(InvalidRequestError, match="feedback"):
        lmpatch.edit(lm, dataclasses.replace(REQS[0], meta={"feedback": 3}), "memprompt")


def test_a_memory_made_with_another_embedder_is_refused(lm):
    patch = lmpatch.edit(lm, REQS[0], "memprompt")
    part = patch.memories[0]
    other = dataclasses.replace(part, settings={**part.settings, "embedder_id": "someone-else"})
    forged = lmpatch.Patch([other], "memprompt", lm.fingerprint, lm.name)
    with pytest.raises(PatchError, match="embedder 'minilm'.*someone-else"):
        forged.apply(lm)
    assert lm.stack.memories() == []


# --------------------------------------------------------------------------- SERAC


def test_serac_with_raw_cosine_wraps_only_prompts_in_scope(lm):
    from lmpatch.methods.serac import SeracHparams

    patch = lmpatch.edit(lm, REQS[0], "serac", classifier="cosine", threshold=0.6, demonstrations=2, pool_records=60)
    entry = patch.memories[0].entries[0]
    with patch.applied(lm):
        expected = "".join(entry["demos"]) + SeracHparams().template.format(fact=statement(REQS[0]), query=REQS[0].prompt)
        assert lm.format_prompt(REQS[0].prompt) == expected
        assert lm.format_prompt("Water boils at a temperature of") == "Water boils at a temperature of"
    assert "head.weight" not in patch.memories[0].state


def test_serac_shows_only_copy_and_update_demonstrations_then_the_edit():
    fact = statement(REQS[0])
    demos = nearest_demonstrations(fact, 6, 60, "minilm", kinds=("copy", "update"))
    kind = dict(zip(demonstration_pool(60), demonstration_kinds(60)))
    assert len(demos) == 7 and demos[-1] == f"New Fact: {fact}\nPrompt: {fact}\n\n"
    assert {kind[d] for d in demos[:-1]} <= {"copy", "update"}
    every_kind = nearest_demonstrations(fact, 6, 60, "minilm")
    assert demos != every_kind  # without the filter some retain demonstrations come in
    with pytest.raises(InvalidRequestError, match="kinds"):
        nearest_demonstrations(fact, 2, 60, "minilm", kinds=("copy", "paraphrase"))
    with pytest.raises(InvalidRequestError, match="demonstrations"):
        lmpatch.edit(tiny_model("llama"), REQS[0], "serac", classifier="cosine", demonstrations=-1)


def test_serac_trains_its_scope_classifier_once_and_ships_it_in_the_patch(lm, tmp_path, monkeypatch):
    from lmpatch.methods.scope import load_scope_head
    from lmpatch.methods.serac import SeracHparams, train_serac

    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    small = dict(train_records=60, train_epochs=2, pool_records=60)
    hp = SeracHparams(**small)
    info = lmpatch.methods.registry.get_method("serac")
    pool_job, job = info.one_offs(lm, hp)
    assert "demonstrations" in pool_job.what and "scope classifier" in job.what
    assert not job.done()
    report = train_serac(lm, hp, show=False)
    assert job.done() and report["pairs"] > 60 and report["positives"] > 0
    assert set(report["validation"]) >= {"prompt_in_scope", "paraphrase_in_scope", "probe_in_scope"}
    head, cached_report = load_scope_head(lm.fingerprint, hp.scope_config())
    assert cached_report["pairs"] == report["pairs"]

    patch = lmpatch.edit(lm, REQS[:2], "serac", **small)
    state = patch.memories[0].state
    assert torch.equal(state["head.weight"], head.proj.weight)
    loaded = lmpatch.Patch.load(patch.save(tmp_path / "serac.lmpatch"))
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "elsewhere"))  # the patch needs no cache
    prompts = [REQS[0].prompt, REQS[1].prompt, "Water boils at a temperature of"]
    with patch.applied(lm):
        expected = lm.format_prompts(prompts)
    with loaded.applied(lm):
        assert lm.format_prompts(prompts) == expected
    assert lm.format_prompts(prompts) == prompts


def test_serac_memories_with_different_heads_are_not_mixed(lm):
    a = lmpatch.edit(lm, REQS[0], "serac", classifier="cosine", pool_records=60)
    part = a.memories[0]
    b = lmpatch.Patch([dataclasses.replace(part, settings={**part.settings, "threshold": 0.9})], "serac",
                      lm.fingerprint, lm.name)
    with a.applied(lm), b.applied(lm):
        assert len(lm.stack.memories()) == 2
    with pytest.raises(InvalidRequestError, match="classifier"):
        lmpatch.edit(lm, REQS[0], "serac", classifier="bert", pool_records=60)


# --------------------------------------------------------------------------- MeLLo


FACTS = [
    lmpatch.EditRequest("Ellie Kemper is a citizen of", "Ellie Kemper", "Croatia"),
    lmpatch.EditRequest("The head of state of Croatia is", "Croatia", "Kolinda Grabar"),
]


def scripted(monkeypatch, replies):
    """Make the model's generations come from ``replies`` (one list per round), recording prompts."""
    from lmpatch.eval import scoring

    seen: list[list[str]] = []

    def fake_generate(model, prompts, max_new_tokens=20, batch_size=8, stop_texts=None):
        assert stop_texts == ("Retrieved fact:", "\n\nQuestion:") and max_new_tokens == 256
        seen.append(list(prompts))
        return [replies[len(seen) - 1][i] for i in range(len(prompts))]

    monkeypatch.setattr(scoring, "generate", fake_generate)
    return seen


def test_mello_decomposes_retrieves_and_stops_at_the_final_answer(lm, monkeypatch):
    from lmpatch.eval.multihop import ask

    patch = lmpatch.edit(lm, FACTS, "mello")
    seen = scripted(monkeypatch, [
        ["Subquestion: What is the country of citizenship of Ellie Kemper?\nGenerated answer: United States.\n",
         "I do not know.\n"],
        ["\nRetrieved fact contradicts to generated answer, so the intermediate answer is: Croatia\n"
         "Final answer: Croatia\n"],
    ])
    with patch.applied(lm):
        texts, answers = ask(lm, ["Which country is Ellie Kemper a citizen of?", "What?"])
    assert answers == ["Croatia", ""]  # the second wrote no subquestion: a counted failure
    assert len(seen) == 2 and len(seen[1]) == 1  # the failed question is not asked again
    assert seen[0][0].startswith(lmpatch.methods.mello.task_prompt("MeLLo-prompt.txt"))
    assert seen[1][0].endswith("Retrieved fact: Ellie Kemper is a citizen of Croatia.")
    assert "Final answer: Croatia" in texts[0]


def test_mello_gives_up_after_its_rounds(lm, monkeypatch):
    from lmpatch.methods.mello import mello_answer

    patch = lmpatch.edit(lm, FACTS, "mello", max_iterations=2)
    sub = "Subquestion: Who is the head of state of Croatia?\nGenerated answer: Someone.\n"
    scripted(monkeypatch, [[sub], [sub]])
    with patch.applied(lm):
        runtime = lm.stack.memories()[0].runtime
        _, answers, details = mello_answer(lm, runtime, ["Who leads Ellie Kemper's country?"])
    assert answers == [""] and details[0]["failed"] == "rounds" and details[0]["rounds"] == 2
    assert details[0]["facts"] == ["The head of state of Croatia is Kolinda Grabar"] * 2


def test_mello_rewrites_a_single_prompt_with_its_nearest_fact(lm):
    patch = lmpatch.edit(lm, FACTS, "mello")
    with patch.applied(lm):
        text = lm.format_prompt("Ellie Kemper is a citizen of")
        assert text == "Retrieved fact: Ellie Kemper is a citizen of Croatia.\nEllie Kemper is a citizen of"
        assert lm.format_prompt("Water boils at a temperature of") == "Water boils at a temperature of"


def test_mquake_files_are_recognised_by_their_fields(tmp_path):
    import json

    from lmpatch.data.mquake import default_path, looks_like_mquake

    assert looks_like_mquake(default_path())
    rome_style = tmp_path / "cf.json"
    rome_style.write_text(json.dumps([{"case_id": 0, "requested_rewrite": {"prompt": "{} is in"}}]))
    assert not looks_like_mquake(rome_style) and not looks_like_mquake(tmp_path / "missing.json")


def test_inspect_shows_a_memory_patch(lm, tmp_path):
    from typer.testing import CliRunner

    from lmpatch.cli.app import app

    path = lmpatch.edit(lm, REQS[0], "memprompt").save(tmp_path / "m.lmpatch")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 retrieval memory(ies)" in result.output and "memprompt.memory" in result.output
    assert "weight delta" not in result.output
