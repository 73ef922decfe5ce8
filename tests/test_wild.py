"""Generation-based ("in the wild") metrics: QAEdit's protocol (lmpatch.eval.wild).

The protocol pieces (cut, SQuAD normalisation, exact match) are checked on strings; the
early stop on stop strings on a tiny random model, whose greedy continuations are
arbitrary tokens, so the stop strings are taken from its own output; the wiring
(default metrics, pre pass reused for locality, JSON, report) on the same model.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmpatch.cli import app
from lmpatch.eval import metrics as M
from lmpatch.eval import wild
from lmpatch.eval.multihop import normalize_answer
from lmpatch.eval.scoring import decode_rows, generate, generate_ids
from lmpatch.eval.wild import WILD_MAX_TOKENS, WILD_STOPS, WildGenerations
from lmpatch.model.stops import cut_at
from lmpatch.request import EditRequest, Probe
from test_eval import head_patch, tiny_requests
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Hi", "A longer prompt than the others here", "Q: who?"]
WILD_KEYS = {"reliability_wild", "generalization_wild", "locality_wild"}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# --------------------------------------------------------------------------- the protocol on strings


def test_protocol_constants():
    assert WILD_MAX_TOKENS == 50 and set(WILD_STOPS) == {".", "\n"}


def test_normalize_is_squad():
    assert wild.normalize("  The Eiffel   Tower! ") == "eiffel tower"
    assert wild.normalize("An apple, a pear") == "apple pear"
    assert wild.normalize("Theodore Athens") == "theodore athens"  # articles only as whole words
    assert wild.normalize("U.S.") == "us"  # punctuation removed, not turned into spaces
    assert wild.normalize("Don't") == "dont"
    assert wild.normalize("") == ""
    # Why multihop's normaliser is not reused: it splits on punctuation instead.
    assert normalize_answer("U.S.") == "u s" != wild.normalize("U.S.")


def test_cut_at_the_first_stop_string():
    assert wild.cut(" Paris. It is") == " Paris"
    assert wild.cut(" Paris\nQ: next. A:") == " Paris"
    assert wild.cut(" Rome is big\nsecond line") == " Rome is big"
    assert wild.cut(" no stop at all") == " no stop at all"
    assert wild.cut(".leading") == "" and wild.cut("\nParis") == ""
    assert cut_at("a;b,c", [",", ";"]) == "a" and cut_at("abc", []) == "abc"


def test_exact_match_after_cut_and_normalisation():
    assert wild.matches_target(" Rome.", "Rome")
    assert wild.matches_target(" the rome\nQ: more", " Rome")
    assert wild.matches_target("ROME!", "Rome")
    assert not wild.matches_target(" Rome, Italy.", "Rome")  # exact match, not prefix
    assert not wild.matches_target(" Romeo", "Rome")
    assert not wild.matches_target(" It is Rome.", "Rome")
    assert not wild.matches_target("\nRome", "Rome")  # the answer ended before it began
    assert not wild.matches_target(" St. Louis", "St. Louis")  # the protocol's known limit
    assert not wild.matches_target("", "The")  # a target that normalises to nothing never matches
    assert wild.same_answer(" Tokyo.", "tokyo\nand more") and wild.same_answer("", "\n")
    assert not wild.same_answer(" Tokyo", " Kyoto")


# --------------------------------------------------------------------------- stopping on text


def _first_prefix_with(ids: list[int], stops, model) -> list[int]:
    """The shortest prefix of ``ids`` whose decoded text contains a stop string (all if none)."""
    for n in range(1, len(ids) + 1):
        if any(s in decode_rows(model, [ids[:n]])[0] for s in stops):
            return ids[:n]
    return ids


def test_stop_texts_end_each_row_on_its_own(model):
    free = generate_ids(model, PROMPTS, max_new_tokens=12, batch_size=8)
    assert all(len(row) == 12 for row in free)  # a random model never emits EOS this early
    # A stop string the first row produces at its 5th token: that row must end there.
    stop = model.tokenizer.decode([free[0][4]]).strip()
    assert stop
    stops = (stop, "\n")
    stopped = generate_ids(model, PROMPTS, max_new_tokens=12, batch_size=8, stop_texts=stops)
    expected = [_first_prefix_with(row, stops, model) for row in free]
    assert stopped == expected
    assert len(stopped[0]) <= 5 < 12
    assert any(len(row) == 12 for row in stopped)  # other rows ran on, unchanged
    # Rows finishing early do not change the others: same as generating each alone.
    assert generate_ids(model, PROMPTS, max_new_tokens=12, batch_size=1, stop_texts=stops) == stopped
    # generate() cuts the text before the stop string.
    texts = generate(model, PROMPTS, max_new_tokens=12, batch_size=8, stop_texts=stops)
    assert texts == [cut_at(t, stops) for t in decode_rows(model, expected)]
    assert stop not in texts[0]
    # Per-row limits still hold with stop strings.
    limited = generate_ids(model, PROMPTS, max_new_tokens=[2, 12, 12, 3], batch_size=8, stop_texts=stops)
    assert limited == [e[:n] for e, n in zip(expected, [2, 12, 12, 3])]


def test_without_stop_texts_generate_gets_the_same_arguments(model, monkeypatch):
    seen = []
    real = model.generate

    def spy(**kwargs):
        seen.append(set(kwargs))
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_ids(model, PROMPTS[:2], max_new_tokens=3)
    generate_ids(model, PROMPTS[:2], max_new_tokens=3, stop_texts=None)
    generate_ids(model, PROMPTS[:2], max_new_tokens=3, stop_texts=(".",))
    assert "stopping_criteria" not in seen[0] and seen[0] == seen[1]
    assert seen[2] == seen[0] | {"stopping_criteria"}


def test_wild_generation_is_at_most_50_tokens_and_stops_at_the_stop_strings(model, monkeypatch):
    ids = generate_ids(model, PROMPTS, max_new_tokens=WILD_MAX_TOKENS, stop_texts=WILD_STOPS)
    texts = decode_rows(model, ids)
    for row, text in zip(ids, texts):
        assert len(row) <= WILD_MAX_TOKENS
        # Either a stop string ended the row (at its last token) or it ran to the limit.
        assert len(row) == WILD_MAX_TOKENS or any(s in text for s in WILD_STOPS)
    calls = []
    monkeypatch.setattr(wild, "generate_ids", lambda *a, **k: calls.append(k) or [[] for _ in a[1]])
    assert wild.generate_raw(model, ["a", "b"], batch_size=4) == ["", ""]
    assert calls == [{"max_new_tokens": 50, "batch_size": 4, "stop_texts": (".", "\n")}]


# --------------------------------------------------------------------------- per-request values


REQ = EditRequest(
    prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
    rephrase=["France's capital is", "The French capital is"],
    locality=[Probe("The capital of Japan is", "Tokyo"), Probe("The capital of Peru is", "Lima"),
              Probe("France has a river called the", "Seine", "other_attribution")],
)


def test_values_pre_and_post_and_locality_against_the_unedited_answers():
    groups = frozenset({"wild"})
    pre = M.RequestScores(wild_texts=WildGenerations(" Paris.", [" Paris", "\nRome"], [" Tokyo.", " Lima\n"]))
    post = M.RequestScores(wild_texts=WildGenerations(" Rome. It", [" rome!", " Paris"], [" tokyo, Japan", " Lima."]))
    v_pre = M.request_values(REQ, pre, pre, groups)
    assert (v_pre["reliability_wild"], v_pre["generalization_wild"], v_pre["locality_wild"]) == (0.0, 0.0, 1.0)
    v = M.request_values(REQ, post, pre, groups)
    assert v["reliability_wild"] == 1.0
    assert v["generalization_wild"] == 0.5
    assert v["locality_wild"] == 0.5  # "tokyo japan" is not "tokyo"; " Lima." is " Lima\n"
    # The raw texts are kept, uncut, per pass.
    assert v["wild_generations"] == {"prompt": " Rome. It", "rephrase": [" rome!", " Paris"],
                                     "locality": [" tokyo, Japan", " Lima."]}
    assert v_pre["wild_generations"]["locality"] == [" Tokyo.", " Lima\n"]
    # Nothing generated (the group was not measured in that pass): nothing to report.
    empty = M.request_values(REQ, M.RequestScores(), M.RequestScores(), groups)
    assert (empty["reliability_wild"], empty["generalization_wild"], empty["locality_wild"]) == (None, None, None)
    with pytest.raises(ValueError, match="different locality prompts"):
        M.request_values(REQ, post, M.RequestScores(wild_texts=WildGenerations(" Paris", [], [" Tokyo"])), groups)


def test_wild_is_a_default_group_with_its_protocol():
    assert "wild" in M.DEFAULT_METRICS
    assert set(M.GROUPS["wild"]) == WILD_KEYS
    assert all(M.PROTOCOLS[k] == M.GENERATION_WILD == "generation_wild_exact_match" for k in WILD_KEYS)
    assert M.resolve_metrics(["locality_wild"]) == {"wild"}
    from lmpatch.cli.evaluate import select_metrics

    assert "wild" in select_metrics(None, None)[0]
    assert "wild" in select_metrics(None, "generation")[0]
    assert "wild" not in select_metrics(None, "teacher_forced")[0]


# --------------------------------------------------------------------------- evaluate


def test_pre_generations_are_made_once_and_reused_for_locality(model, monkeypatch):
    calls = []
    real = wild.generate_raw
    monkeypatch.setattr(wild, "generate_raw", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    reqs = tiny_requests(2)
    report = M.evaluate(model, reqs, patch=head_patch(model, scale=5.0), metrics=["wild"], batch_size=4)
    # One batched call per pass over prompt + 2 rephrases + 1 plain neighbourhood probe per request.
    assert calls == [8, 8]
    assert set(report.pre) == set(report.post) == WILD_KEYS
    assert report.pre["locality_wild"].value == 1.0
    assert all(m.protocol == "generation_wild_exact_match" and m.n == 2 for m in report.post.values())
    for rec in report.records:
        pre, post = rec["pre"]["wild_generations"], rec["post"]["wild_generations"]
        assert len(pre["rephrase"]) == 2 and len(pre["locality"]) == 1
        expected = sum(wild.same_answer(a, b) for a, b in zip(post["locality"], pre["locality"])) / len(pre["locality"])
        assert rec["post"]["locality_wild"] == expected
        assert rec["post"]["reliability_wild"] == float(wild.matches_target(post["prompt"], "Rome"))
    json.loads(report.to_json())


def test_a_zero_patch_changes_no_answer(model):
    report = M.evaluate(model, tiny_requests(2), patch=head_patch(model, scale=0.0), metrics=["wild"])
    assert report.post["locality_wild"].value == 1.0
    for rec in report.records:
        assert rec["pre"]["wild_generations"] == rec["post"]["wild_generations"]


# --------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-wild")
    model.model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def test_eval_json_has_pre_and_post_wild_metrics(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPATCH_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "eval", "--model", str(tiny_dir), "--data", "counterfact", "--n", "1", "--set", "mom2_adjustment=false",
        "--set", "v_steps=2", "--metrics", "reliability,wild", "--out", str(run_dir), "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    data = json.loads(result.stdout)
    for table in ("metrics", "metrics_pre"):
        assert WILD_KEYS <= set(data[table])
        assert all(0.0 <= data[table][k] <= 1.0 for k in WILD_KEYS)
    assert data["metrics_pre"]["locality_wild"] == 1.0
    assert {data["protocols"][k] for k in WILD_KEYS} == {"generation_wild_exact_match"}
    record = json.loads((run_dir / "records.jsonl").read_text().splitlines()[0])
    for side in ("pre", "post"):
        gens = record[side]["wild_generations"]
        assert isinstance(gens["prompt"], str) and len(gens["locality"]) == 10  # CounterFact's neighbourhood


def test_report_shows_the_wild_rows_with_their_protocol(tmp_path):
    from lmpatch.report import build_table, load_runs, to_markdown
    from lmpatch.report.catalog import protocol_tag, spec_for

    assert {spec_for(k).section for k in WILD_KEYS} == {"In the wild"}
    assert protocol_tag("generation_wild_exact_match", {}) == "GW"
    run = tmp_path / "run"
    run.mkdir()
    summary = {"method": "rome", "model": "m", "regime": "single", "n": 4, "data": "zsre",
               "metrics": {"reliability": 0.9, "reliability_wild": 0.25, "generalization_wild": 0.5,
                           "locality_wild": 0.75},
               "metrics_pre": {"reliability": 0.1, "reliability_wild": 0.0, "generalization_wild": 0.0,
                               "locality_wild": 1.0},
               "protocols": {"reliability": "teacher_forced_token_accuracy",
                             **{k: "generation_wild_exact_match" for k in WILD_KEYS}}}
    (run / "summary.json").write_text(json.dumps(summary))
    table = build_table(load_runs([run]))
    md = to_markdown(table)
    rows = {r.spec.key: r for r in table.rows}
    assert rows["reliability_wild"].tags == ("GW",) and rows["reliability_wild"].cells == ("0.000 → 0.250",)
    assert rows["locality_wild"].cells == ("0.750",)  # pre is 1 by definition, not shown
    assert "Reliability [GW]" in md and "[GW] generation_wild_exact_match" in "\n".join(table.notes())


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench_wild", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_benchmarks_measure_and_show_the_wild_metrics():
    lifelong = _bench("lifelong")
    assert "wild" in lifelong.DEFAULT_METRICS
    assert WILD_KEYS <= {key for _, key, _ in lifelong.COLUMNS}
    survey = _bench("survey_table")
    assert "wild" in survey.CF_METRICS and "wild" in survey.ZSRE_METRICS
