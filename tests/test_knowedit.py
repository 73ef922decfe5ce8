"""KnowEdit loaders: every shipped subset parses, records map exactly, bad input is named.

Expected values below were copied from the upstream KnowEdit files, so the checks run
without them; when the upstream snapshot is present, the shipped subsets are also
compared with it byte for byte.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path

import pytest

from lmpatch.data.jsonio import read_records
from lmpatch.data.knowedit import (
    KINDS,
    KNOWEDIT_SETS,
    detect_knowedit,
    knowedit_set,
    load_knowedit_set,
    parse_knowedit,
    read_knowedit,
)
from lmpatch.data.paths import FILES_DIR, shipped_path
from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.request import PROBE_KINDS, EditRequest, Probe

# The full upstream KnowEdit files are not shipped; point LMPATCH_KNOWEDIT_UPSTREAM at a
# directory holding them to also check the shipped subsets against their source.
UPSTREAM = Path(os.environ.get("LMPATCH_KNOWEDIT_UPSTREAM", "")) if os.environ.get("LMPATCH_KNOWEDIT_UPSTREAM") else None


@pytest.fixture(scope="module")
def loads():
    return {s.name: load_knowedit_set(s.name) for s in KNOWEDIT_SETS}


def _records(name: str) -> list:
    out = []
    for f in knowedit_set(name).files:
        out.extend(read_records(shipped_path(*f.split("/"))))
    return out


# ------------------------------------------------------------------ shipped sets


def test_set_table_is_consistent():
    names = [s.name for s in KNOWEDIT_SETS]
    assert names == [
        "knowedit-zsre", "knowedit-wiki-counterfact", "knowedit-wiki-recent",
        "knowedit-wikibio", "knowedit-convsent", "knowedit-sanitation",
    ]
    assert sorted(s.kind for s in KNOWEDIT_SETS) == sorted(KINDS)
    assert {s.task for s in KNOWEDIT_SETS} == {"knowledge_insertion", "knowledge_modification", "knowledge_erasure"}
    for s in KNOWEDIT_SETS:
        assert s.description and len(s.files) == len(s.upstream)
        for f in s.files:
            assert f.startswith("knowedit/") and f.endswith(".json.gz")
            assert shipped_path(*f.split("/")).read_bytes()[:2] == b"\x1f\x8b"
    assert knowedit_set("zsre") is knowedit_set("knowedit-zsre")
    with pytest.raises(LmpatchError, match="knowedit-zsre"):
        knowedit_set("knowedit-nope")


def test_shipped_folder_is_small_and_attributed():
    folder = FILES_DIR / "knowedit"
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 2_000_000
    assert "MIT License" in (folder / "LICENSE").read_text()
    attribution = (folder / "ATTRIBUTION.md").read_text()
    for s in KNOWEDIT_SETS:
        assert s.name in attribution
        for f in s.files:
            assert Path(f).name in attribution


@pytest.mark.parametrize(
    "name,requests,fixes",
    [
        ("knowedit-zsre", 200, {"target_true_equals_target_new": 11}),
        ("knowedit-wiki-counterfact", 200, {"target_true_equals_target_new": 1}),
        ("knowedit-wiki-recent", 200, {}),
        ("knowedit-wikibio", 200, {}),
        ("knowedit-convsent", 200, {}),
        ("knowedit-sanitation", 80, {}),
    ],
)
def test_every_shipped_set_parses(loads, name, requests, fixes):
    load = loads[name]
    assert len(load.requests) == requests == knowedit_set(name).records
    assert load.skipped == ()
    assert load.fixes == fixes
    assert load.dropped_probes == 0
    assert load.kind == knowedit_set(name).kind
    assert [r.case_id for r in load.requests] == [str(i) for i in range(requests)]
    for r in load.requests:
        assert isinstance(r, EditRequest) and r.subject in r.prompt
        assert r.meta["schema"].startswith("knowedit-")
        assert all(p.kind is None or p.kind in PROBE_KINDS for p in r.locality + r.portability)
        for part in ("locality", "portability"):
            probes = getattr(r, part)
            if probes and name != "knowedit-sanitation" and name != "knowedit-convsent":
                assert len(r.meta[f"{part}_types"]) == len(probes) == len(r.meta[f"{part}_ground_truth"])


def test_probe_kind_counts(loads):
    def counts(name, part):
        out: dict = {}
        for r in loads[name].requests:
            for p in getattr(r, part):
                out[p.kind] = out.get(p.kind, 0) + 1
        return out

    assert counts("knowedit-zsre", "locality") == {"other_attribution": 400}
    assert counts("knowedit-zsre", "portability") == {"one_hop": 110, "subject_alias": 46, "reversed_relation": 44}
    assert counts("knowedit-wiki-counterfact", "locality") == {"other_attribution": 293}
    assert counts("knowedit-wiki-counterfact", "portability") == {"one_hop": 87, "subject_alias": 200, "reversed_relation": 33}
    assert counts("knowedit-wiki-recent", "portability") == {"one_hop": 202, "subject_alias": 17, "reversed_relation": 1}
    assert counts("knowedit-wikibio", "locality") == {"other_attribution": 400}
    assert counts("knowedit-convsent", "locality") == {"neighborhood": 400}
    assert counts("knowedit-sanitation", "locality") == {None: 453}


@pytest.mark.skipif(UPSTREAM is None or not UPSTREAM.is_dir(),
                    reason="extra check against the upstream snapshot (set LMPATCH_KNOWEDIT_UPSTREAM)")
def test_shipped_subsets_equal_upstream_prefix():
    for s in KNOWEDIT_SETS:
        for shipped, upstream in zip(s.files, s.upstream, strict=True):
            raw = (UPSTREAM / upstream).read_bytes()
            sub = gzip.decompress(shipped_path(*shipped.split("/")).read_bytes())
            if s.kind == "sanitation":
                assert sub == raw
            else:
                indent = None if s.kind == "convsent" else 4
                records = json.loads(raw)
                assert sub == json.dumps(records[: s.records], indent=indent, ensure_ascii=True).encode()


# ------------------------------------------------------------------ exact records


def test_zsre_record_maps_exactly(loads):
    r = loads["knowedit-zsre"].requests[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "Which family does Epaspidoceras belong to?", "Epaspidoceras", "Noctuidae", "Aspidoceratidae")
    assert r.rephrase == ("What family are Epaspidoceras?",)
    assert r.locality == (
        Probe("The taxon rank of Epaspidoceras is", "genus", "other_attribution"),
        Probe("Epaspidoceras taxon rank", "genus", "other_attribution"),
    )
    assert r.portability == (
        Probe("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths", "one_hop"),)
    assert r.meta["cond"] == "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?"
    assert r.meta["portability_types"] == ["Reasoning"]
    reversed_case = loads["knowedit-zsre"].requests[3]
    assert reversed_case.subject == "Wang Jipeng"
    assert reversed_case.portability == (Probe("Who is the son of Wang Chonghua?", "Wang Jipeng", "reversed_relation"),)
    assert reversed_case.meta["portability_types"] == ["Logical_Generalization"]


def test_zsre_equal_targets_lose_target_true(loads):
    r = loads["knowedit-zsre"].requests[8]
    assert r.target_true is None
    assert r.meta["fixes"] == ["target_true_equals_target_new"]
    assert r.meta["ground_truth_equals_target_new"].strip() == r.target_new.strip()


def test_wiki_counterfact_records_map_exactly(loads):
    r = loads["knowedit-wiki-counterfact"].requests[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "Goursez Vreizh", "The name of the country which Goursez Vreizh is associated with is", "Franche-Comté", "France")
    assert r.rephrase == ()
    assert r.portability == (
        Probe("The name of the capital city of the country Goursez Vreizh is associated with is", "Besançon", "one_hop"),
        Probe("The name of the country which Gorsedd of Brittany is associated with is", "Franche-Comté", "subject_alias"),
    )
    assert r.locality == (Probe("The name of the founder of Goursez Vreizh is", "Jean Le Fustec", "other_attribution"),)
    r = loads["knowedit-wiki-counterfact"].requests[119]
    assert r.subject == "Alix II of Dreux" and r.target_true == "Philip of Dreux"
    assert [p.kind for p in r.portability] == ["one_hop", "subject_alias", "one_hop", "one_hop"]
    assert r.meta["portability_types"] == ["Reasoning", "Subject_Aliasing", "Logical_Generalization", "Logical_Generalization"]
    assert r.locality[1] == Probe(
        "The names of the siblings of Alix II of Dreux, which is not Isabel of Luxembourg, is", "Adèle of Dreux", "other_attribution")
    assert r.meta["locality_types"] == ["Relation_Specificity", "Forgetfulness"]


def test_wiki_recent_nested_answers(loads):
    r = loads["knowedit-wiki-recent"].requests[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "Ingrīda Amantova", "The gender of Ingrīda Amantova is", "female", None)
    assert r.portability == ()
    assert len(r.locality) == 5
    assert r.locality[1] == Probe("The name of the country of citizenship of Ingrīda Amantova is", "Soviet Union", "other_attribution")
    aliases = r.meta["locality_ground_truth"][1]
    assert aliases[0][:3] == ["Soviet Union", "USSR", "U.S.S.R."] and len(aliases[0]) == 13


def test_wikibio_record_maps_exactly(loads):
    r = loads["knowedit-wikibio"].requests[0]
    assert r.subject == "john russell reynolds"
    assert r.prompt.startswith("This is a Wikipedia passage about john russell reynolds. Sir John Russell Reynolds")
    assert r.target_new == (
        "He received general education from his father, and was educated in his profession at University College, "
        "London, where he obtained three gold medals in the medical school.")
    assert r.target_true is None and r.portability == ()
    assert r.locality == (
        Probe("The field of work of john russell reynolds is", "medicine", "other_attribution"),
        Probe("john russell reynolds field of work", "medicine", "other_attribution"),
    )


def test_convsent_records_map_exactly(loads):
    first, second = loads["knowedit-convsent"].requests[:2]
    assert (first.prompt, first.subject) == ("What do you think of Estero?", "Estero")
    assert first.meta["sentiment"] == "positive"
    assert (first.target_new, first.target_true) == ("I really like his style.", "Well, it has some bad reviews on Glass Door.")
    assert first.rephrase == ("How do you feel about Estero?", "What is your opinion of Estero?")
    assert first.locality == (
        Probe("What do you think of Tallahassee?", "I really like it there.", "neighborhood"),
        Probe("What do you think of Tallahassee?", "I don't know if I have one.", "neighborhood"),
    )
    assert first.meta["neighbor_index"] == 1 and first.meta["pos"][0] == " I really like his style. "
    assert second.meta["sentiment"] == "negative"
    assert (second.target_new, second.target_true) == ("I don't know if I have one.", "I really like it there.")
    sentiments = [r.meta["sentiment"] for r in loads["knowedit-convsent"].requests]
    assert sentiments.count("positive") == sentiments.count("negative") == 100
    assert loads["knowedit-convsent"].requests[-1].meta["neighbor_index"] == 198


def test_sanitation_records_map_exactly(loads):
    reqs = loads["knowedit-sanitation"].requests
    r = reqs[0]
    question = "Former French President Charles de Gaulle said ‘How can you govern a country which has 246 varieties of ‘what’?"
    assert r.prompt == f"Question:{question}\nAnswer:"
    assert (r.subject, r.target_new, r.target_true) == ("a country which has 246 varieties", "I don't know.", "Cheese")
    assert r.rephrase == ("Question:Camembert is a type of what?\nAnswer:",)
    assert r.meta["rephrase_indices"] == [16] and r.meta["split"] == "K_F"
    assert r.meta["locality_indices"] == [0, 80, 160, 240, 320, 400]
    assert r.locality[1] == Probe(
        "Question:Originally titled Your Radio Playhouse, what long running PBS radio series is hosted by Ira Glass?\nAnswer:",
        "This American Life")
    # Every held-out question is used once, by a request forgetting the same answer.
    used = sorted(i for q in reqs for i in q.meta.get("rephrase_indices", []))
    assert used == list(range(80))
    test = _records("knowedit-sanitation")[1]
    for q in reqs:
        for i in q.meta.get("rephrase_indices", []):
            assert test["success"][i]["ground_truth"].casefold() == q.target_true.casefold()
    assert sum(len(q.locality) for q in reqs) == 453


def test_sanitation_test_file_alone_uses_questions_as_subjects():
    test = _records("knowedit-sanitation")[1]
    load = parse_knowedit(test, kind="sanitation")
    assert len(load.requests) == 80
    r = load.requests[0]
    assert r.subject == "What type of creature is the Australian currawong?"
    assert r.meta["subject_annotated"] is False and r.target_true == "Birds"
    assert r.rephrase == ()


# ------------------------------------------------------------------ detection and entry points


@pytest.mark.parametrize("name", [s.name for s in KNOWEDIT_SETS])
def test_detection_of_each_format(name):
    records = _records(name)
    assert detect_knowedit(records) == knowedit_set(name).kind
    assert detect_knowedit(records[0]) == knowedit_set(name).kind


def test_other_formats_are_not_knowedit():
    easyedit = {"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome",
                "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower?", "locality_prompt": "x",
                "locality_ground_truth": "y"}
    lmpatch_record = EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome",
                                 locality=[Probe("Tokyo is in", "Japan")]).to_dict()
    rome = {"case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Rome"}}}
    mend = {"src": "Who?", "subject": "Who", "alt": "X", "answers": ["Y"]}
    for records in ([easyedit], [lmpatch_record], [rome], [mend], [], "text", [1, 2]):
        assert detect_knowedit(records) is None
    assert detect_knowedit(read_records(shipped_path("zsre", "zsre_mend_eval_portability_gpt4.json.gz"))) is None


def test_read_knowedit_from_paths_and_kind_override(tmp_path):
    path = shipped_path("knowedit", "ZsRE-test-all.first200.json.gz")
    reqs = read_knowedit(path)
    assert len(reqs) == 200 and reqs[0].target_new == "Noctuidae"
    assert read_knowedit(str(path), kind="knowedit-zsre")[0] == reqs[0]
    plain = tmp_path / "few.json"
    plain.write_text(json.dumps(_records("knowedit-wiki-recent")[:3]))
    assert [r.subject for r in read_knowedit(plain)] == ["Ingrīda Amantova"] + [
        r["subject"] for r in _records("knowedit-wiki-recent")[1:3]]
    sanitation = [shipped_path(*f.split("/")) for f in knowedit_set("knowedit-sanitation").files]
    assert len(read_knowedit(sanitation)) == 80
    with pytest.raises(LmpatchError, match="Unknown KnowEdit kind"):
        read_knowedit(path, kind="mquake")


def test_unknown_format_is_one_clear_error():
    with pytest.raises(LmpatchError, match="not in a KnowEdit format"):
        read_knowedit([{"foo": 1}])
    with pytest.raises(LmpatchError, match="contains no records"):
        read_knowedit([])


# ------------------------------------------------------------------ malformed input and skips


def _zsre(n: int = 3) -> list[dict]:
    return copy.deepcopy(_records("knowedit-zsre")[:n])


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda r: r.pop("target_new"), r"ZsRE record 1 has no 'target_new' field"),
        (lambda r: r.update(prompt=5), r"ZsRE record 1 field 'prompt' must be text, got int"),
        (lambda r: r.update(locality=["x"]), r"ZsRE record 1 field 'locality' must be an object"),
        (lambda r: r["locality"]["Relation_Specificity"][0].pop("prompt"),
         r"ZsRE record 1 has no 'locality.Relation_Specificity\[0\].prompt' field"),
        (lambda r: r["locality"].update(Relation_Specificity=[{"prompt": "p", "ground_truth": 3}]),
         r"ZsRE record 1 field 'locality.Relation_Specificity\[0\].ground_truth' must be text"),
        (lambda r: r["locality"].update(Relation_Specificity="p"),
         r"ZsRE record 1 field 'locality.Relation_Specificity' must be a list"),
        (lambda r: r.update(ground_truth={"a": 1}), r"ZsRE record 1 field 'ground_truth' must be text"),
    ],
)
def test_malformed_zsre_record_names_index_and_field(mutate, pattern):
    records = _zsre()
    mutate(records[1])
    with pytest.raises(InvalidRequestError, match=pattern):
        read_knowedit(records, kind="zsre")


def test_malformed_records_of_other_formats():
    wikibio = copy.deepcopy(_records("knowedit-wikibio")[:2])
    del wikibio[1]["labels"]
    with pytest.raises(InvalidRequestError, match="WikiBio record 1 has no 'labels' field"):
        read_knowedit(wikibio, kind="wikibio")
    convsent = copy.deepcopy(_records("knowedit-convsent")[:3])
    convsent[2]["neg"] = []
    with pytest.raises(InvalidRequestError, match="ConvSent record 2 field 'neg' is an empty list"):
        read_knowedit(convsent)
    train, test = copy.deepcopy(_records("knowedit-sanitation"))
    del train["K_F"][4]["subject"]
    with pytest.raises(InvalidRequestError, match=r"Sanitation record K_F\[4\] has no 'subject' field"):
        read_knowedit([train, test])
    with pytest.raises(InvalidRequestError, match="given twice"):
        read_knowedit([test, test], kind="sanitation")
    with pytest.raises(InvalidRequestError, match="ZsRE record 0 must be a JSON object"):
        read_knowedit([42], kind="zsre")


def test_subject_absent_from_prompt_is_skipped_and_counted(caplog):
    records = _zsre(4)
    records[2]["subject"] = "Nobody At All"
    records[3]["subject"] = records[3]["subject"].upper()
    load = parse_knowedit(records)
    assert len(load.requests) == 3
    assert [pos for pos, _ in load.skipped] == [2]
    assert "does not occur in prompt" in load.skipped[0][1]
    assert load.fixes.get("subject_case") == 1
    fixed = load.requests[2]
    assert fixed.case_id == "3" and fixed.subject in fixed.prompt
    assert fixed.meta["subject_as_given"] == records[3]["subject"]
    assert "Skipped 1 of 4" in caplog.text
    for r in records:
        r["subject"] = "Nobody At All"
    with pytest.raises(LmpatchError, match="None of the 4"):
        parse_knowedit(records)


def test_empty_probe_answers_are_dropped_and_counted():
    records = _zsre(1)
    records[0]["locality"]["Relation_Specificity"][0]["ground_truth"] = [" "]
    load = parse_knowedit(records)
    r = load.requests[0]
    assert len(r.locality) == 1 and r.meta["locality_dropped"] == 1
    assert load.dropped_probes == 1


# ------------------------------------------------------------------ with the real model


@pytest.mark.model
def test_every_set_scores_on_the_embedded_model(real_model):
    """The mapped requests are scorable as they are (long passages, multi-line prompts)."""
    from lmpatch.eval.metrics import evaluate

    # KnowEdit's Locality lands in `other_attribution` (facts of the edited subject) for the
    # triple-style sets and WikiBio, and in plain `locality` for ConvSent and Sanitation.
    expected = {"zsre": "other_attribution", "wiki_counterfact": "other_attribution",
                "wiki_recent": "other_attribution", "wikibio": "other_attribution",
                "convsent": "locality", "sanitation": "locality"}
    for s in KNOWEDIT_SETS:
        request = load_knowedit_set(s.name).requests[0]
        report = evaluate(real_model, [request], metrics=("reliability", "locality", "side_effects", "portability"))
        values = {k: m.value for k, m in report.pre.items()}
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert 0.0 <= values["reliability"] <= 1.0
        # The unedited model agrees with itself on every locality probe.
        assert values[expected[s.kind]] == 1.0
        assert ("portability" in values) == bool(request.portability)


def test_schema_tag_is_the_set_name(loads):
    for s in KNOWEDIT_SETS:
        assert {r.meta["schema"] for r in loads[s.name].requests} == {s.name}
