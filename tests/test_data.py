"""Dataset loaders and the data files shipped inside the package."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest

from lmpatch.data import (
    case_ids,
    dataset_descriptions,
    dataset_info,
    dataset_names,
    drop_cases,
    load_dataset,
    read_dataset,
    save_requests,
    shipped_path,
)
from lmpatch.data.jsonio import read_records
from lmpatch.data.paths import FILES_DIR
from lmpatch.errors import LmpatchError
from lmpatch.request import EditRequest, Probe

# name -> (usable requests, skipped records, repairs applied)
EXPECTED = {
    "counterfact": (1129, 0, {}),
    "counterfact-train": (10000, 0, {}),
    "counterfact-edit": (10000, 0, {}),
    "zsre": (1037, 0, {"target_true_equals_target_new": 29}),
    "zsre-train": (998, 2, {"target_true_equals_target_new": 17}),
}

ROME_RECORD = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "{} is located in the city of",
        "relation_id": "P131",
        "target_new": {"str": "Rome", "id": "Q220"},
        "target_true": {"str": "Paris", "id": "Q90"},
        "subject": "The Eiffel Tower",
    },
    "paraphrase_prompts": ["Tourists flock there. The Eiffel Tower stands in"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
    "attribute_prompts": ["The Colosseum is located in the city of"],
    "generation_prompts": ["The Eiffel Tower is surrounded by"],
}
EASYEDIT_RECORD = {
    "case_id": 3,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
ZSRE_RECORD = {
    "subject": "IAAF Combined Events Challenge",
    "src": "When was the inception of IAAF Combined Events Challenge?",
    "pred": "2011",
    "rephrase": "When was the IAAF Combined Events Challenge launched?",
    "alt": "2006",
    "answers": ["1998"],
    "loc": "nq question: what is the name of the last episode of spongebob",
    "loc_ans": "The String",
    "cond": "2011 >> 2006 || When was the inception of IAAF Combined Events Challenge?",
}


@pytest.fixture(scope="module")
def loaded():
    """Each named dataset read once per module: the big splits take a few tenths of a second."""
    return {name: read_dataset(name) for name in dataset_names()}


def _write(path: Path, records, jsonl: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# ---------------------------------------------------------------- named datasets


def test_dataset_names_and_descriptions():
    assert dataset_names() == list(EXPECTED)
    descriptions = dataset_descriptions()
    assert set(descriptions) == set(EXPECTED)
    for text in descriptions.values():
        assert text.strip() and "\n" not in text


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_dataset_counts_and_every_record_accounted_for(loaded, name):
    result = loaded[name]
    count, skipped, fixes = EXPECTED[name]
    assert len(result.requests) == count
    assert len(result.skipped) == skipped
    assert result.fixes == fixes
    raw = sum(len(read_records(shipped_path(*f.split("/")))) for f in dataset_info(name).files)
    if name == "counterfact":
        raw_ids = {r["case_id"] for f in dataset_info(name).files for r in read_records(shipped_path(*f.split("/")))}
        raw = len(raw_ids)
    assert result.total == raw
    assert all(r.case_id is not None for r in result.requests)
    assert len(case_ids(result.requests)) == count


def test_zsre_train_skips_the_records_with_an_empty_new_answer(loaded):
    assert [pos for pos, _ in loaded["zsre-train"].skipped] == [534, 723]
    assert all("empty" in reason for _, reason in loaded["zsre-train"].skipped)


def test_counterfact_is_ordered_by_case_id_and_merges_every_annotation(loaded):
    requests = loaded["counterfact"].requests
    ids = [int(r.case_id) for r in requests]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert (ids[0], ids[-1]) == (34, 21833)
    first = requests[0]  # case 34 is in all three files
    assert first.meta["alternative_subject"] == "L. Cars"
    assert len(first.meta["distracting_neighborhood_prompts"]) == 10
    assert first.portability == (
        Probe("What popular food from Laurent Cars' city of employment is famous worldwide?", "Philly cheesesteak"),
    )
    with_portability = sum(bool(r.portability) for r in requests)
    assert with_portability == 1031  # the 98 subject-replace-only cases have none
    assert sum("distracting_neighborhood_prompts" in r.meta for r in requests) == 804
    assert sum("alternative_subject" in r.meta for r in requests) == 213


def test_counterfact_rome_record_fields(loaded):
    by_id = {r.case_id: r for r in loaded["counterfact"].requests}
    r = by_id["4482"]
    assert r.prompt == "Spike Hughes originates from"
    assert r.subject == "Spike Hughes"
    assert (r.target_new, r.target_true) == ("Philadelphia", "London")
    assert r.rephrase == (
        "Incumbent Mayor Jim Suttle sought a second term in office. Spike Hughes is native to",
        "Amateur Athletic Union (AAU). Spike Hughes was born in",
    )
    assert len(r.locality) == 10
    assert r.locality[0] == Probe("Max Mosley originates from", "London")
    assert {p.answer for p in r.locality} == {"London"}
    assert r.portability == (
        Probe("What famous food is associated with the city where Spike Hughes originates from?", "Cheesesteaks"),
    )
    m = r.meta
    assert m["schema"] == "rome"
    assert (m["relation_id"], m["target_new_id"], m["target_true_id"], m["pararel_idx"]) == ("P19", "Q935334", "Q84", 14235)
    assert m["Recalled Relation"] == "(Philadelphia, known for, cheesesteaks)"
    assert m["attribute_prompts"][0] == "Mike Dennis originates from" and len(m["attribute_prompts"]) == 10
    assert m["generation_prompts"][0] == "Spike Hughes currently lives in"
    assert m["unrelated_relation"]["question"] == "What is Spike Hughes an instance of?"
    assert m["distracting_neighborhood_prompts"][0] == "Spike Hughes originates from Philadelphia. Max Mosley originates from"
    assert "alternative_subject" not in m


def test_counterfact_easyedit_record_fields(loaded):
    r = loaded["counterfact-edit"].requests[0]
    assert r == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase=("Where Danielle Darrieux is from, people speak the language of",),
        locality=(Probe("Michel Rocard is a native speaker of", "French"),),
        case_id="0",
    )
    assert r.portability == ()
    assert r.meta == {"schema": "easyedit"}


def test_zsre_record_fields(loaded):
    r = loaded["zsre"].requests[0]
    assert r.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert r.subject == "IAAF Combined Events Challenge"
    assert (r.target_new, r.target_true) == ("2006", "1998")
    assert r.rephrase == ("When was the IAAF Combined Events Challenge launched?",)
    # The locality question keeps its "nq question: " prefix, as in EasyEdit's and ROME's zsRE evaluation.
    assert r.locality == (Probe("nq question: what is the name of the last episode of spongebob", "The String"),)
    assert r.portability == (
        Probe("What type of sports event is the IAAF Combined Events Challenge, which was established in 2006?", "Athletics"),
    )
    assert r.case_id == "0"
    assert r.meta["schema"] == "zsre"
    assert r.meta["pred"] == "2011" and r.meta["answers"] == ["1998"]
    assert r.meta["Recalled Relation"] == "(IAAF Combined Events Challenge, event type, athletics)"


def test_zsre_answer_equal_to_new_target_keeps_the_edit_without_target_true(loaded):
    fixed = [r for r in loaded["zsre"].requests if "target_true_equals_target_new" in r.meta.get("fixes", [])]
    assert len(fixed) == 29
    song_kai = next(r for r in fixed if r.subject == "Song Kai")
    assert song_kai.target_new == "male" and song_kai.target_true is None
    assert song_kai.meta["answers"] == ["male"]


def test_tuning_and_test_cases_can_be_kept_apart(loaded):
    test = loaded["counterfact"].requests
    train_ids = case_ids(loaded["counterfact-train"].requests)
    assert len(case_ids(test) & train_ids) == 48
    kept = drop_cases(test, train_ids)
    assert len(kept) == 1129 - 48
    assert not case_ids(kept) & train_ids
    assert not case_ids(loaded["counterfact-edit"].requests) & train_ids


# ---------------------------------------------------------------- slicing


def test_n_and_offset_select_records_after_loading(loaded):
    full = loaded["counterfact-edit"].requests
    part = load_dataset("counterfact-edit", n=5, offset=10)
    assert part == list(full[10:15])
    assert [r.case_id for r in part] == [r.case_id for r in full[10:15]]
    assert load_dataset("zsre", n=0) == []
    assert load_dataset("zsre", offset=1030) == list(loaded["zsre"].requests[1030:])
    assert load_dataset("zsre", n=3, offset=5000) == []
    assert len(load_dataset("counterfact", n=7)) == 7


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"offset": -2}, {"n": 1.5}])
def test_bad_slice_arguments_are_rejected(kwargs):
    with pytest.raises(LmpatchError, match="non-negative"):
        load_dataset("zsre", **kwargs)


# ---------------------------------------------------------------- user files


@pytest.mark.parametrize(
    "filename, records, jsonl, schema",
    [
        ("cf.json", [ROME_RECORD], False, "rome"),
        ("cf.jsonl.gz", [ROME_RECORD], True, "rome"),
        ("ee.jsonl", [EASYEDIT_RECORD], True, "easyedit"),
        ("ee.json.gz", [EASYEDIT_RECORD], False, "easyedit"),
        ("zs.json", ZSRE_RECORD, False, "zsre"),  # a single object, not a list
        ("zs.json.gz", [ZSRE_RECORD], True, "zsre"),  # JSON Lines under a .json name
        ("zs.data", [ZSRE_RECORD, ZSRE_RECORD], True, "zsre"),  # no telling extension at all
    ],
)
def test_schema_is_detected_per_file(tmp_path, filename, records, jsonl, schema):
    path = _write(tmp_path / filename, records, jsonl)
    result = read_dataset(str(path))
    assert result.schema == schema
    r = result.requests[0]
    if schema == "rome":
        assert r.prompt == "The Eiffel Tower is located in the city of"
        assert (r.subject, r.target_new, r.target_true, r.case_id) == ("The Eiffel Tower", "Rome", "Paris", "7")
        assert r.locality == (Probe("The Louvre is located in the city of", "Paris"),)
        assert r.meta["attribute_prompts"] == ["The Colosseum is located in the city of"]
        assert r.portability == ()
    elif schema == "easyedit":
        assert (r.prompt, r.target_true, r.case_id) == (EASYEDIT_RECORD["prompt"], "French", "3")
        assert r.locality == (Probe("Michel Rocard is a native speaker of", "French"),)
    else:
        assert (r.prompt, r.target_new, r.target_true) == (ZSRE_RECORD["src"], "2006", "1998")
        assert r.locality[0].prompt.startswith("nq question: ")


def test_load_dataset_accepts_a_path_object(tmp_path):
    path = _write(tmp_path / "ee.json", [EASYEDIT_RECORD, dict(EASYEDIT_RECORD, case_id=4)])
    assert [r.case_id for r in load_dataset(path)] == ["3", "4"]


def test_saved_requests_load_back_identically(tmp_path, loaded):
    originals = list(loaded["counterfact"].requests[:3]) + list(loaded["zsre"].requests[:2])
    for name in ("saved.jsonl", "saved.jsonl.gz"):
        path = save_requests(tmp_path / "sub" / name, originals)
        assert path.exists()
        result = read_dataset(path)
        assert result.schema == "lmpatch"
        assert list(result.requests) == originals
        assert [r.meta for r in result.requests] == [r.meta for r in originals]
    with gzip.open(tmp_path / "sub" / "saved.jsonl.gz", "rt") as fh:
        assert len(fh.read().splitlines()) == 5


def test_lmpatch_schema_reads_plain_request_dicts(tmp_path):
    record = {"prompt": "The capital of France is", "subject": "France", "target_new": "Lyon",
              "locality": [{"prompt": "The capital of Japan is", "answer": "Tokyo"}], "source": "manual"}
    (r,) = load_dataset(_write(tmp_path / "mine.jsonl", [record], jsonl=True))
    assert r.locality == (Probe("The capital of Japan is", "Tokyo"),)
    assert (r.case_id, r.meta) == ("0", {"source": "manual"})


# ---------------------------------------------------------------- repairs and skips


def test_zsre_subject_case_is_repaired_and_hopeless_records_skipped(tmp_path, caplog):
    lower = dict(ZSRE_RECORD, subject="iaaf combined events challenge")
    absent = dict(ZSRE_RECORD, subject="Tour de France")
    empty_target = dict(ZSRE_RECORD, alt="")
    path = _write(tmp_path / "zs.json", [lower, ZSRE_RECORD, absent, empty_target])
    with caplog.at_level(logging.WARNING, logger="lmpatch.data"):
        requests = load_dataset(path)
    assert len(requests) == 2
    assert requests[0].subject == "IAAF Combined Events Challenge"
    assert requests[0].meta["subject_as_given"] == "iaaf combined events challenge"
    assert requests[0].meta["fixes"] == ["subject_case"]
    assert "fixes" not in requests[1].meta
    assert [r.case_id for r in requests] == ["0", "1"]
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 2 of 4 records" in warnings[0].getMessage()
    result = read_dataset(path)
    assert [pos for pos, _ in result.skipped] == [2, 3]
    assert "does not occur in prompt" in result.skipped[0][1]


def test_a_file_whose_records_all_fail_is_an_error(tmp_path):
    path = _write(tmp_path / "bad.json", [dict(EASYEDIT_RECORD, subject="Nobody")] * 3)
    with pytest.raises(LmpatchError, match="None of the 3 records.*does not occur"):
        load_dataset(path)


# ---------------------------------------------------------------- clear errors


def test_missing_file_names_the_path_and_the_named_datasets(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(LmpatchError) as info:
        load_dataset(str(missing))
    assert str(missing) in str(info.value) and "counterfact-train" in str(info.value)


def test_unknown_record_format_names_the_expected_fields(tmp_path):
    path = _write(tmp_path / "other.json", [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(LmpatchError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "match no format" in message and "['answer', 'question']" in message
    for expected in ("requested_rewrite", "src, subject, alt", "ground_truth", "target_new"):
        assert expected in message


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "a"}\n{broken\n', "line 2 is not valid JSON"),
        (b"42", "expected a list of edit records"),
        (b"[]", "contains no records"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"\x1f\x8bnot really gzip", "cannot be decompressed"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(LmpatchError, match=match):
        load_dataset(path)


def test_a_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(LmpatchError, match="not a file"):
        load_dataset(tmp_path)


def test_malformed_rome_records_are_skipped_with_a_reason(tmp_path):
    no_template = json.loads(json.dumps(ROME_RECORD))
    no_template["requested_rewrite"]["prompt"] = "The Eiffel Tower is in"
    no_target = json.loads(json.dumps(ROME_RECORD))
    del no_target["requested_rewrite"]["target_new"]
    result = read_dataset(_write(tmp_path / "cf.json", [ROME_RECORD, no_template, no_target]))
    assert len(result.requests) == 1
    reasons = [reason for _, reason in result.skipped]
    assert "'{}'" in reasons[0] and "'target_new'" in reasons[1]


# ---------------------------------------------------------------- shipped files


def _attribution_hashes(folder: Path) -> dict[str, str]:
    text = (folder / "ATTRIBUTION.md").read_text()
    return dict(re.findall(r"^\| (\S+\.gz) \| ([0-9a-f]{64}) \|$", text, flags=re.MULTILINE))


def test_shipped_files_exist_with_attribution_and_are_only_compressed():
    data_files = sorted(p for p in FILES_DIR.rglob("*.gz"))
    assert {p.relative_to(FILES_DIR).as_posix() for p in data_files} == {
        "counterfact/counterfact-train.json.gz",
        "counterfact/counterfact-edit.json.gz",
        "counterfact/rome/counterfact_portability_gpt4.json.gz",
        "counterfact/rome/counterfact_distracting_neighbor.json.gz",
        "counterfact/rome/counterfact_subject_replace.json.gz",
        "zsre/zsre_mend_eval_portability_gpt4.json.gz",
        "zsre/zsre_mend_train-1k.json.gz",
        "wikitext-2-raw/wiki.test.raw.gz",
    }
    for path in data_files:
        assert path.stat().st_size < 6 * 2**20
        attribution = (path.parent / "ATTRIBUTION.md").read_text()
        assert "commit" in attribution and "License" in attribution
        expected = _attribution_hashes(path.parent)
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == expected[path.name]
        if path.parent.name != "wikitext-2-raw":
            assert "MIT License" in (path.parent / "LICENSE").read_text()
    wiki = (FILES_DIR / "wikitext-2-raw" / "ATTRIBUTION.md").read_text()
    assert "CC BY-SA 3.0" in wiki or "Attribution-ShareAlike 3.0" in wiki
    assert "GNU Free Documentation License" in wiki


def test_every_registered_file_is_shipped():
    for name in dataset_names():
        for relative in dataset_info(name).files:
            assert shipped_path(*relative.split("/")).is_file()
    assert shipped_path("wikitext-2-raw", "wiki.test.raw.gz") == FILES_DIR / "wikitext-2-raw" / "wiki.test.raw.gz"
    with pytest.raises(LmpatchError, match="reinstall"):
        shipped_path("nope.json.gz")
