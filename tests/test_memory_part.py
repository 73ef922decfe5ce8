"""Retrieval memories as patch parts: where they act, saving, stacking and exact revert.

A test-only memory type (``test.trigger``) stands in for SERAC/IKE: it puts a stored fact
in front of any prompt that contains the fact's trigger word. The methods that use real
retrieval have their own tests; these check the mechanism every one of them relies on.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import lmpatch
from lmpatch.errors import PatchError
from lmpatch.eval.scoring import generate, score_targets
from lmpatch.model.context import memories_paused
from lmpatch.patch import Patch
from lmpatch.patch.parts import MemoryRuntime, RetrievalMemory, WeightDelta, register_memory
from lmpatch.request import EditRequest
from tiny import tiny_model


@register_memory
class _TriggerMemory(MemoryRuntime):
    """Puts ``fact`` before every prompt containing ``trigger`` (the first match wins)."""

    type_name = "test.trigger"

    def __init__(self, entries: list[dict], template: str) -> None:
        self.entries = list(entries)
        self.template = template

    @classmethod
    def combine(cls, members):
        runtime = cls([], members[0].settings.get("template", "{fact}\n{query}"))
        for m in members:
            runtime.extend(m)
        return runtime

    def extend(self, member) -> None:
        if member.settings.get("fail"):
            raise PatchError("this test memory refuses to be installed")
        self.entries += member.entries

    def rewrite(self, queries, current):
        out = []
        for q, text in zip(queries, current):
            hit = next((e for e in self.entries if e["trigger"] in q), None)
            out.append(text if hit is None else self.template.format(fact=hit["fact"], query=text))
        return out


def memory_patch(lm, *facts: tuple[str, str], **settings) -> Patch:
    entries = [{"trigger": t, "fact": f} for t, f in facts]
    part = RetrievalMemory("test.trigger", settings, entries, {"keys": torch.randn(len(entries), 4)})
    return Patch([part], "trigger", lm.fingerprint, lm.name)


def delta_patch(lm, seed: int) -> Patch:
    name = f"{lm.spec.layers[0].mlp_out}.weight"
    shape = lm.model.get_parameter(name).shape
    g = torch.Generator().manual_seed(seed)
    delta = WeightDelta(name, left=torch.randn(shape[0], 1, generator=g), right=torch.randn(1, shape[1], generator=g))
    return Patch([delta], "delta", lm.fingerprint, lm.name)


@pytest.fixture
def lm():
    return tiny_model("llama")


PAIRS = [
    ("The Eiffel Tower is in", " Rome"),
    ("Paris is the capital of", " France"),
    ("The Colosseum stands in", " Rome"),
]
EIFFEL = ("Eiffel", "The Eiffel Tower moved to Rome.")


def scores(lm, pairs, **kw):
    return [(s.logprobs, s.argmax) for s in score_targets(lm, pairs, **kw)]


def test_scoring_with_a_memory_equals_scoring_the_rewritten_prompts(lm):
    patch = memory_patch(lm, EIFFEL)
    rewritten = [(f"{EIFFEL[1]}\n{p}" if "Eiffel" in p else p, t) for p, t in PAIRS]
    for side in ("right", "left"):
        expected = scores(lm, rewritten, padding_side=side)
        plain = scores(lm, PAIRS, padding_side=side)
        with patch.applied(lm):
            got = scores(lm, PAIRS, padding_side=side)
            assert got == expected  # bit for bit: the target is never part of the query
            assert lm.format_prompts([p for p, _ in PAIRS])[1:] == [p for p, _ in PAIRS[1:]]
        assert got[0] != plain[0] and got[1:] == plain[1:]
        assert scores(lm, PAIRS, padding_side=side) == plain


def test_generation_and_chat_see_the_memory_too(lm):
    patch = memory_patch(lm, EIFFEL)
    prompts = [p for p, _ in PAIRS]
    expected = generate(lm, [f"{EIFFEL[1]}\n{prompts[0]}", *prompts[1:]], max_new_tokens=4)
    with patch.applied(lm):
        assert generate(lm, prompts, max_new_tokens=4) == expected
    lm.chat = True
    try:
        with patch.applied(lm):
            wrapped = lm.format_prompt(prompts[0])
        assert EIFFEL[1] in wrapped and wrapped.startswith(lm.format_prompt("")[:10])
        assert lm.format_prompt(prompts[0]) == lm.format_prompts([prompts[0]])[0]
        assert EIFFEL[1] not in lm.format_prompt(prompts[0])
    finally:
        lm.chat = False


def test_memories_are_paused_while_an_edit_is_computed(lm, monkeypatch):
    patch = memory_patch(lm, EIFFEL)
    seen: list[str] = []
    fake = lmpatch.methods.registry.get_method("ft")
    fake = dataclasses.replace(fake, edit=lambda m, reqs, hp: seen.append(m.format_prompt(reqs[0].prompt)))
    monkeypatch.setattr(lmpatch.api, "get_method", lambda name: fake)
    with patch.applied(lm):
        assert lm.format_prompt("The Eiffel Tower is in") != "The Eiffel Tower is in"
        with memories_paused():
            assert lm.format_prompt("The Eiffel Tower is in") == "The Eiffel Tower is in"
        lmpatch.edit(lm, EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome"), "ft")
    assert seen == ["The Eiffel Tower is in"]


def test_a_memory_patch_round_trips_and_reverts_exactly(lm, tmp_path):
    patch = memory_patch(lm, EIFFEL, template="Fact: {fact}\n{query}")
    assert patch.requires == ["retrieval_memories"] and not patch.mergeable
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plain = scores(lm, PAIRS)
    with patch.applied(lm):
        edited = scores(lm, PAIRS)
    loaded = Patch.load(patch.save(tmp_path / "m.lmpatch"))
    assert loaded.patch_id == patch.patch_id
    assert loaded.memories[0].entries == patch.memories[0].entries
    summary = loaded.summary()["memories"][0]
    assert summary["type"] == "test.trigger" and summary["stored_values"] == 4
    with loaded.applied(lm):
        assert scores(lm, PAIRS) == edited
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    assert scores(lm, PAIRS) == plain and lm.stack.memories() == []


def test_patches_of_one_memory_type_are_searched_as_one_group(lm):
    a = memory_patch(lm, EIFFEL)
    b = memory_patch(lm, ("Colosseum", "The Colosseum moved to Paris."))
    c = memory_patch(lm, ("Paris", "Paris is in Italy."), template="[{fact}] {query}")
    a.apply(lm), b.apply(lm), c.apply(lm)
    try:
        groups = lm.stack.memories()
        assert [len(g.parts) for g in groups] == [2, 1]  # different settings: a second group
        texts = lm.format_prompts([p for p, _ in PAIRS])
        assert texts[0] == f"{EIFFEL[1]}\n{PAIRS[0][0]}"
        assert texts[1] == f"[Paris is in Italy.] {PAIRS[1][0]}"
        b.revert(lm)
        assert [len(g.parts) for g in lm.stack.memories()] == [1, 1]
        assert lm.format_prompts([PAIRS[2][0]]) == [PAIRS[2][0]]
    finally:
        lm.stack.remove_many([p.patch_id for p in (a, c) if p.is_applied(lm)])
    assert lm.stack.memories() == []


def test_later_memories_wrap_earlier_ones_but_retrieve_on_the_original_prompt(lm):
    a = memory_patch(lm, EIFFEL)
    b = memory_patch(lm, ("Eiffel", "Second fact."), template="<{fact}> {query}")
    with a.applied(lm), b.applied(lm):
        assert lm.format_prompt(PAIRS[0][0]) == f"<Second fact.> {EIFFEL[1]}\n{PAIRS[0][0]}"


def test_reverting_a_memory_between_two_weight_patches_equals_the_outer_two(lm):
    d1, m, d2 = delta_patch(lm, 1), memory_patch(lm, EIFFEL), delta_patch(lm, 2)
    for p in (d1, m, d2):
        p.apply(lm)
    m.revert(lm)
    got = scores(lm, PAIRS)
    lm.stack.remove_many([d1.patch_id, d2.patch_id])
    with d1.applied(lm), d2.applied(lm):
        assert scores(lm, PAIRS) == got


def test_a_failing_memory_leaves_the_model_as_it_was(lm):
    first = memory_patch(lm, EIFFEL, fail=True)
    with pytest.raises(PatchError, match="refuses"):  # the first member goes through combine -> extend
        first.apply(lm)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ok = memory_patch(lm, ("Paris", "x"), fail=False)
    ok.apply(lm)
    bad = Patch([*delta_patch(lm, 3).parts, *memory_patch(lm, EIFFEL, fail=False).parts], "mix", lm.fingerprint,
                lm.name)
    original_extend = _TriggerMemory.extend

    def refuse(self, member):
        raise PatchError("this test memory refuses to be installed")

    _TriggerMemory.extend = refuse
    try:
        with pytest.raises(PatchError, match="refuses"):
            bad.apply(lm)
    finally:
        _TriggerMemory.extend = original_extend
    assert lm.stack.ids() == [ok.patch_id] and len(lm.stack.memories()[0].parts) == 1
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    ok.revert(lm)


def test_merge_refuses_a_memory_and_an_old_reader_refuses_the_file(lm, tmp_path, monkeypatch):
    patch = memory_patch(lm, EIFFEL)
    with pytest.raises(PatchError, match="test.trigger memory.*cannot express"):
        patch.merge(lm, tmp_path / "merged")
    path = patch.save(tmp_path / "m.lmpatch")
    from lmpatch.patch import file

    monkeypatch.setattr(file, "SUPPORTED_FEATURES", frozenset({"weight_deltas", "module_additions"}))
    with pytest.raises(PatchError, match="retrieval_memories.*upgrade lmpatch"):
        Patch.load(path)


def test_an_unknown_memory_type_or_bad_entries_are_clear_errors(lm, tmp_path):
    path = memory_patch(lm, EIFFEL).save(tmp_path / "m.lmpatch")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["lmpatch"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest["memories"][0]["type"] = "test.from-the-future"
    del manifest["patch_id"]
    save_file(tensors, str(path), metadata={"lmpatch": json.dumps(manifest)})
    with pytest.raises(PatchError, match="test.from-the-future.*upgrade lmpatch"):
        Patch.load(path)
    with pytest.raises(PatchError, match="non-empty list of entries"):
        RetrievalMemory("test.trigger", {}, [])
