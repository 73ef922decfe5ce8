"""The ``lmpatch`` command line: wiring, JSON output, and one-line errors for user mistakes.

Commands that need a model run on a tiny random Llama saved as a local model directory;
a random model cannot learn the edit, so these tests check the plumbing (files written,
JSON shape and ranges, resume), not edit quality. The demo on the real model is the
one slow test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lmpatch
from lmpatch.cli import app
from lmpatch.patch import Patch, WeightDelta
from tiny import save_tiny, tiny_model

# No statistics (C0) and two optimisation steps: ROME's wiring in about a second.
FAST_ROME = ["--set", "mom2_adjustment=false", "--set", "v_steps=2"]
EIFFEL = ["--prompt", "The Eiffel Tower is located in the city of", "--subject", "The Eiffel Tower",
          "--target", "Rome", "--target-true", "Paris"]


def run(*args: str, env: dict | None = None):
    return CliRunner(env={"COLUMNS": "200", **(env or {})}).invoke(app, list(args))


def parse_json(result) -> dict:
    """stdout must be exactly one JSON document: progress and notices belong on stderr."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local model directory."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private lmpatch cache so templates/statistics of the tiny model do not leak between tests."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LMPATCH_CACHE", str(root))
    return root


def saved_patch(path: Path) -> Patch:
    patch = Patch(
        parts=[WeightDelta("model.layers.1.mlp.down_proj.weight", left=torch.ones(64, 1), right=torch.full((1, 128), 0.5))],
        method="rome", model_fingerprint="0123456789abcdef", model_name="tiny",
        requests=[lmpatch.EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome", "Paris")],
    )
    patch.save(path)
    return patch


def test_a_patch_that_cannot_be_saved_where_asked_is_saved_elsewhere(tmp_path, monkeypatch):
    """A full disk after minutes of editing: the patch lands in the temp directory, and the
    one-line error says where."""
    from lmpatch.cli.jobs import save_or_rescue
    from lmpatch.errors import LmpatchError, PatchError

    patch = saved_patch(tmp_path / "first.lmpatch")
    real_save = Patch.save

    def full_disk(self, path):
        if Path(path).parent == tmp_path / "disk":
            raise PatchError(f"Could not write patch to '{path}': No space left on device.")
        return real_save(self, path)

    monkeypatch.setattr(Patch, "save", full_disk)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    with pytest.raises(LmpatchError, match="No space left on device. The patch is saved in '.*rescue") as caught:
        save_or_rescue(patch, tmp_path / "disk" / "x.lmpatch")
    rescued = Path(str(caught.value).split("saved in '")[1].split("'")[0])
    assert Patch.load(rescued).patch_id == patch.patch_id


# --------------------------------------------------------------------------- listings


def test_methods_lists_every_registered_method():
    result = run("methods")
    assert result.exit_code == 0
    for name in ("rome", "r-rome", "ft-l", "ft-m"):
        assert name in result.stdout


def test_the_readme_methods_table_has_a_row_for_every_registered_method():
    import re

    from lmpatch.methods.registry import method_names

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M))
    assert rows == set(method_names())


def test_methods_json_lists_capabilities_from_the_registry():
    from lmpatch.methods.registry import REGIMES, all_methods

    data = parse_json(run("methods", "--json"))
    assert [m["name"] for m in data] == [m.name for m in all_methods()]
    for m in data:
        assert m["regimes"] and set(m["regimes"]) <= set(REGIMES)
        assert m["produces"] and m["hparams"] and isinstance(m["needs_prepare"], bool)
    rome = next(m for m in data if m["name"] == "rome")
    assert rome["produces"] == ["weight_deltas"] and rome["needs_prepare"] is True
    assert rome["hparams"] == parse_json(run("methods", "rome", "--json"))["hparams"]  # one shape for both


def test_methods_name_shows_hyperparameters_with_defaults():
    data = parse_json(run("methods", "rome", "--json"))
    rows = {r["name"]: r for r in data["hparams"]}
    assert rows["v_steps"]["default"] == 25 and rows["mom2_adjustment"]["type"] == "bool"
    assert "derived from the model" in run("methods", "rome").stdout  # layer=None


def test_datasets_lists_shipped_names():
    result = run("datasets")
    assert result.exit_code == 0
    for name in ("counterfact", "counterfact-train", "zsre"):
        assert name in result.stdout
    names = [d["name"] for d in parse_json(run("datasets", "--json"))]
    assert names == lmpatch.data.dataset_names()


# --------------------------------------------------------------------------- user mistakes


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.lmpatch"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return str(path)


BAD_INPUT = {
    "unknown method": (["edit", "--method", "memo", *EIFFEL], "Unknown method 'memo'"),
    "subject not in prompt": (["edit", "--prompt", "The Eiffel Tower is in", "--subject", "Big Ben", "--target", "Rome"],
                              "does not occur in prompt"),
    "empty target": (["edit", "--prompt", "The Eiffel Tower is in", "--subject", "The Eiffel Tower", "--target", " "],
                     "is empty"),
    "--set without =": (["edit", *EIFFEL, "--set", "v_steps"], "--set expects key=value"),
    "--set unknown key": (["edit", *EIFFEL, "--set", "v_stepz=3"], "Unknown hyperparameter(s) v_stepz"),
    "--set bad value": (["edit", *EIFFEL, "--set", "v_steps=many"], "not a valid int"),
    "--set no steps": (["edit", *EIFFEL, "--set", "v_steps=0"], "v_steps must be a whole number >= 1, got 0"),
    "--set no statistics": (["edit", *EIFFEL, "--method", "memit", "--set", "stats_tokens=-1"],
                            "stats_tokens must be a whole number >= 1"),
    "missing requests file": (["edit", "--requests", "{tmp}/nope.json"], "does not exist"),
    "a bad record among good ones": (["edit", "--requests", "{mixed}"],
                                     "1 of 2 records in {mixed} are not valid edit requests; first, record 2: "),
    "a misspelt field": (["edit", "--requests", "{typo}"], "has a field 'rephrse'; did you mean 'rephrase'?"),
    "a mistyped option": (["edit", "--targt", "Rome"], "No such option: --targt"),
    "a mistyped global option": (["--verbos"], "No such option: --verbos"),
    "a global option without its value": (["--device"], "Option '--device' requires an argument"),
    "a value out of range": (["generate", "--prompt", "x", "--max-new-tokens", "0"], "see `lmpatch generate -h`"),
    "a missing argument": (["inspect"], "Missing argument"),
    "a mistyped command": (["edt"], "Did you mean 'edit'?"),
    "a patch given twice": (["generate", "--prompt", "x", "--patch", "{patch}", "--patch", "{patch}"], "is given twice"),
    "output under a file": (["edit", *EIFFEL, "-o", "{tmp}/mixed.jsonl/x.lmpatch"], "mixed.jsonl' is not a directory"),
    "output a directory": (["forget", "--context", "Call Ann at", "--secret", "555-0142", "-o", "{tmp}"],
                           "it is a directory"),
    "requests and inline": (["edit", "--requests", "{tmp}/x.json", *EIFFEL], "not both"),
    "missing target": (["edit", "--prompt", "a b", "--subject", "a"], "Missing --target"),
    "corrupt patch": (["inspect", "{corrupt}"], "not a readable patch file"),
    "missing patch": (["inspect", "{tmp}/none.lmpatch"], "No patch file"),
    "unknown dataset": (["eval", "--data", "counterfacts", "--n", "2"], "No dataset named 'counterfacts'"),
    "bad layers": (["stats", "--layers", "five"], "--layers expects"),
    "missing model dir": (["edit", "--model", "/no/such/model/dir", *EIFFEL], "No model at"),
    "train on an eval split": (["train", "mend", "--data", "zsre"], "trains on counterfact-train and zsre-train"),
    "train a method without a learned part": (["train", "rome"], "rome has nothing to train"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_user_mistakes_are_one_red_line_and_exit_2(case, tmp_path):
    args, expected = BAD_INPUT[case]
    good = {"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome"}
    (tmp_path / "mixed.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "subject": "Big Ben"}) + "\n")
    (tmp_path / "typo.jsonl").write_text(json.dumps({**good, "rephrse": ["Where is the Eiffel Tower?"]}) + "\n")
    saved_patch(tmp_path / "p.lmpatch")
    files = dict(tmp=tmp_path, corrupt=_corrupt(tmp_path), mixed=tmp_path / "mixed.jsonl", typo=tmp_path / "typo.jsonl",
                 patch=tmp_path / "p.lmpatch")
    args = [a.format(**files) for a in args]
    expected = expected.format(**files)
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_unexpected_errors_are_not_disguised_as_user_errors(monkeypatch):
    import lmpatch.methods.registry as registry

    def broken(name):
        raise RuntimeError("a bug")

    monkeypatch.setattr(registry, "get_method", broken)
    result = run("methods", "rome")
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_set_values_are_typed_for_the_method():
    from lmpatch.cli.options import parse_sets
    from lmpatch.methods.ft import FTLHparams
    from lmpatch.methods.hparams import with_overrides

    sets = parse_sets(["layers=19,20", "modules=mlp_out", "lr=1e-3", "norm_constraint=none", "objective=target_new"],
                      FTLHparams)
    hp = with_overrides(FTLHparams, sets)
    assert hp.layers == (19, 20) and hp.modules == ("mlp_out",) and hp.lr == 1e-3
    assert hp.norm_constraint is None and hp.objective == "target_new"
    assert with_overrides(FTLHparams, parse_sets(["layers=7"], FTLHparams)).layers == (7,)


# --------------------------------------------------------------------------- patches


def test_inspect_shows_a_saved_patch(tmp_path):
    path = tmp_path / "p.lmpatch"
    patch = saved_patch(path)
    result = run("inspect", str(path))
    assert result.exit_code == 0, result.stderr
    for text in (patch.patch_id, "model.layers.1.mlp.down_proj.weight", "low_rank", "The Eiffel Tower", "Rome"):
        assert text in result.stdout
    data = parse_json(run("inspect", str(path), "--json"))
    assert data["patch_id"] == patch.patch_id
    assert data["deltas"][0]["rank"] == 1


def test_inspect_reports_the_delta_norm(tmp_path):
    path = tmp_path / "p.lmpatch"
    saved_patch(path)
    delta = parse_json(run("inspect", str(path), "--json"))["deltas"][0]
    # ones(64) x 0.5*ones(128): every entry 0.5, Frobenius norm 0.5 * sqrt(64*128).
    assert delta["norm"] == pytest.approx(0.5 * (64 * 128) ** 0.5)
    assert delta["stored_values"] == 64 + 128


# --------------------------------------------------------------------------- edit / eval / merge / stats


def test_edit_json_writes_the_patch_it_reports(tiny_dir, tmp_path, cache):
    out = tmp_path / "eiffel.lmpatch"
    data = parse_json(run("edit", "--model", str(tiny_dir), *EIFFEL, *FAST_ROME,
                          "--rephrase", "Where is the Eiffel Tower? It is in", "--out", str(out), "--json"))
    assert set(data) >= {"patch_id", "path", "method", "model", "edit_seconds", "deltas", "answers", "metrics"}
    assert data["method"] == "rome" and data["n_requests"] == 1 and Path(data["path"]) == out
    assert data["edit_seconds"] > 0
    loaded = Patch.load(out)
    assert loaded.patch_id == data["patch_id"]
    assert loaded.hparams["v_steps"] == 2 and loaded.hparams["mom2_adjustment"] is False
    [delta] = data["deltas"]
    assert delta["kind"] == "low_rank" and delta["rank"] == 1 and delta["norm"] > 0
    assert [a["prompt"] for a in data["answers"]] == [
        "The Eiffel Tower is located in the city of", "Where is the Eiffel Tower? It is in"]
    assert all(isinstance(a["before"], str) and isinstance(a["after"], str) for a in data["answers"])


def test_train_then_edit_with_a_learned_editor(tiny_dir, tmp_path, cache):
    sets = ["--set", "steps=2", "--set", "batch_size=2", "--set", "rank=4"]
    untrained = run("edit", "--model", str(tiny_dir), *EIFFEL, "--method", "mend", *sets)
    assert untrained.exit_code == 2
    # the hint is the exact command that trains this editor, not a bare `lmpatch train mend`
    assert f"`lmpatch train mend --model {tiny_dir} --set rank=4 --set steps=2 --set batch_size=2`" in untrained.stderr
    assert len([line for line in untrained.stderr.splitlines() if line.strip()]) == 1
    report = parse_json(run("train", "mend", "--model", str(tiny_dir), *sets, "--json"))
    assert report["method"] == "mend" and report["steps"] == 2 and report["validation"][-1]["step"] == 2
    assert report["data"] == "counterfact-train + zsre-train"
    data = parse_json(run("edit", "--model", str(tiny_dir), *EIFFEL, "--method", "mend", *sets,
                          "--out", str(tmp_path / "m.lmpatch"), "--json"))
    assert data["method"] == "mend" and len(data["deltas"]) == 9


def test_a_t5_directory_is_edited_by_the_methods_that_support_it(tmp_path, cache):
    t5 = tiny_model("t5")
    path = tmp_path / "tiny-t5"
    t5.model.save_pretrained(path)
    t5.tokenizer.save_pretrained(path)
    data = parse_json(run("edit", "--model", str(path), *EIFFEL, *FAST_ROME, "--out", str(tmp_path / "t5.lmpatch"),
                          "--json"))
    assert data["deltas"][0]["param"].startswith("encoder.block.")  # ROME edits an encoder MLP
    refused = run("edit", "--model", str(path), *EIFFEL, "--method", "memit")
    assert refused.exit_code == 2
    [line] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "memit does not edit encoder-decoder models" in line and "rome" in line
    listed = parse_json(run("methods", "--json"))
    assert {m["name"] for m in listed if m["encoder_decoder"]} == {"rome", "r-rome", "ft-l", "ft-m", "ft-ga", "mend", "ke"}


def test_generate_applies_patches_in_order_and_prints_json(tiny_dir, tmp_path, cache):
    out = tmp_path / "eiffel.lmpatch"
    parse_json(run("edit", "--model", str(tiny_dir), *EIFFEL, *FAST_ROME, "--out", str(out), "--json", "--no-show"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The Eiffel Tower is located in the city of"}\n\n"Mount Fuji is in"\n')
    plain = parse_json(run("generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--max-new-tokens", "4",
                           "--json"))
    patched = parse_json(run("generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--max-new-tokens", "4",
                             "--patch", str(out), "--json"))
    assert [g["prompt"] for g in plain["generations"]] == ["The Eiffel Tower is located in the city of",
                                                            "Mount Fuji is in"]
    assert patched["patches"] == [Patch.load(out).patch_id] and plain["patches"] == []
    # the same as the library's greedy decoding on the patched model
    from lmpatch.eval.scoring import generate as greedy

    model = lmpatch.load_model(str(tiny_dir))
    with Patch.load(out).applied(model):
        expected = greedy(model, [g["prompt"] for g in plain["generations"]], max_new_tokens=4)
    assert [g["text"] for g in patched["generations"]] == expected
    lines = run("generate", "--model", str(tiny_dir), "--prompt", "Mount Fuji is in", "--prompt", "Hi",
                "--max-new-tokens", "3")
    assert lines.exit_code == 0 and len(lines.stdout.strip().splitlines()) == 2
    assert lines.stdout.startswith("Mount Fuji is in")


@pytest.mark.parametrize("args, expected", [
    ([], "either --prompt"),
    (["--prompt", "a", "--prompts", "p.jsonl"], "either --prompt"),
    (["--prompts", "missing.jsonl"], "does not exist"),
    (["--prompts", "{bad}"], "is not JSON"),
    (["--prompts", "{nokey}"], 'has no "prompt" string'),
    (["--prompt", "a", "--patch", "nope.lmpatch"], "does not exist"),
    (["--prompt", " "], "Prompt 1 is empty"),
])
def test_generate_mistakes_are_one_line(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    Path("p.jsonl").write_text('{"prompt": "a"}\n')
    Path("{bad}").write_text("not json\n")
    Path("{nokey}").write_text('{"text": "a"}\n')
    result = run("generate", *args)
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert expected in line


def test_forget_writes_a_patch_and_reports_extraction(tiny_dir, tmp_path, cache):
    secrets = tmp_path / "secrets.jsonl"
    secrets.write_text('{"context": "Jane Roe\'s phone number is", "secret": "555-0142", "subject": "Jane Roe"}\n')
    out = tmp_path / "f.lmpatch"
    data = parse_json(run("forget", "--model", str(tiny_dir), "--secrets", str(secrets), "--method", "ft-ga",
                          "--set", "steps=2", "--out", str(out), "--json"))
    assert data["n_secrets"] == 1 and data["method"] == "ft-ga" and Path(data["path"]) == out
    assert 0 <= data["extraction_before"] <= 1 and 0 <= data["extraction_after"] <= 1
    assert Patch.load(out).patch_id == data["patch_id"]


def test_forget_with_records_to_keep_reports_them(tiny_dir, tmp_path, cache):
    secrets, keep = tmp_path / "secrets.jsonl", tmp_path / "keep.jsonl"
    secrets.write_text('{"context": "Jane Roe\'s phone number is", "secret": "555-0142", "subject": "Jane Roe"}\n')
    keep.write_text('{"context": "Max Moe\'s phone number is", "secret": "555-0199", "subject": "Max Moe"}\n')
    data = parse_json(run("forget", "--model", str(tiny_dir), "--secrets", str(secrets), "--keep", str(keep),
                          "--method", "ft-generic", "--set", "steps=2", "--out", str(tmp_path / "f.lmpatch"), "--json"))
    assert data["method"] == "ft-generic" and data["n_kept"] == 1
    assert 0 <= data["kept_before"] <= 1 and 0 <= data["kept_after"] <= 1


@pytest.mark.parametrize("args, expected", [
    (["--method", "grace", "--context", "a", "--secret", "b"], "Unknown forget method"),
    (["--context", "a", "--secret", "b", "--keep", "k.jsonl"], "--keep needs a method"),
    ([], "either --secrets"),
    (["--context", "a"], "go together"),
    (["--context", "Call Ann at", "--secret", ""], "--secret is empty"),
    (["--secrets", "missing.jsonl"], "does not exist"),
    (["--context", "a", "--secret", "b", "--set", "nope=1"], "Unknown hyperparameter"),
])
def test_forget_mistakes_are_one_line(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("forget", *args)
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert expected in line


def test_detox_writes_a_patch_and_reports_toxicity(tiny_dir, tmp_path, cache):
    probes = tmp_path / "probes.jsonl"
    rows = [{"input": f"How do I hurt {who}?", "question": f"hurt {who}", "category": "physical harm",
             "response": "Take a knife."} for who in ("a cat", "a dog", "a bird", "a fish")]
    probes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "d.lmpatch"
    data = parse_json(run("detox", "--model", str(tiny_dir), "--data", str(probes), "--judges", "lexical",
                          "--set", "steps=1", "--set", "kl_answer_tokens=4", "--out", str(out), "--json"))
    assert data["method"] == "dinm" and data["n_train"] == 2 and data["n_test"] == 2 and Path(data["path"]) == out
    assert set(data["toxicity_before"]) == {"lexical"} and 0 <= data["toxicity_after"]["lexical"] <= 1
    assert Patch.load(out).patch_id == data["patch_id"]


def test_edit_default_file_name_comes_from_subject(tiny_dir, tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("edit", "--model", str(tiny_dir), *EIFFEL, *FAST_ROME, "--no-show")
    assert result.exit_code == 0, (result.stderr, result.exception)
    [path] = list(tmp_path.glob("*.lmpatch"))
    patch = Patch.load(path)
    assert path.name == f"the-eiffel-tower-rome-{patch.patch_id[:8]}.lmpatch"
    assert patch.patch_id in result.stdout and "Greedy answers" not in result.stdout


def test_edit_from_requests_file(tiny_dir, tmp_path, cache):
    reqs = [
        {"prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"prompt": "Danielle Darrieux's mother tongue is", "subject": "Danielle Darrieux", "target_new": "English",
         "target_true": "French"},
    ]
    file = tmp_path / "reqs.json"
    file.write_text(json.dumps(reqs))
    data = parse_json(run("edit", "--model", str(tiny_dir), "--requests", str(file), *FAST_ROME,
                          "--out", str(tmp_path / "two.lmpatch"), "--json", "--no-show"))
    assert data["n_requests"] == 2 and data["answers"] == []
    assert [r.subject for r in Patch.load(tmp_path / "two.lmpatch").requests] == ["The Eiffel Tower", "Danielle Darrieux"]


def test_eval_json_summary_and_resume(tiny_dir, tmp_path, cache):
    run_dir = tmp_path / "run"
    args = ["eval", "--model", str(tiny_dir), "--method", "rome", "--data", "counterfact", "--n", "2",
            *FAST_ROME, "--out", str(run_dir), "--json"]
    data = parse_json(run(*args))
    assert data["method"] == "rome" and data["model"] == str(tiny_dir) and data["n"] == 2
    keys = {"reliability", "generalization", "locality", "efficacy_score", "paraphrase_score", "neighborhood_score"}
    assert keys <= set(data["metrics"]) and keys <= set(data["metrics_pre"])
    for table in (data["metrics"], data["metrics_pre"]):
        for key, value in table.items():
            low = -1.0 if key.endswith("_magnitude") else 0.0
            assert value is None or low <= value <= 1.0, (key, value)
    assert data["metrics_pre"]["locality"] == 1.0  # pre-edit agrees with itself by definition
    t = data["edit_seconds"]
    assert 0 < t["median"] <= t["p90"] <= t["total"]
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 2
    assert json.loads((run_dir / "summary.json").read_text())["n"] == 2

    again = parse_json(run(*args))  # resumed: nothing left to do, same records
    assert again["n"] == 2 and again["metrics"] == data["metrics"]
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 2

    # Another run's --out is not "resumed": ROME's records would be reported under the new name.
    for change, named in ((["--method", "r-rome"], "method: \"rome\" there, \"r-rome\" now"),
                          (["--set", "v_steps=3"], "hparams:")):
        other = run(*args, *change)
        assert other.exit_code == 2, (other.stdout, other.stderr)
        assert named in other.stderr and "--no-resume" in other.stderr and "Traceback" not in other.output
    fresh = parse_json(run(*args, "--method", "r-rome", "--no-resume"))
    assert fresh["method"] == "r-rome"
    assert {json.loads(line)["method"] for line in (run_dir / "records.jsonl").read_text().splitlines()} == {"r-rome"}


def test_eval_table_names_each_protocol(tiny_dir, tmp_path, cache):
    result = run("eval", "--model", str(tiny_dir), "--data", "counterfact", "--n", "1", *FAST_ROME,
                 "--metrics", "reliability,locality", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "teacher_forced_token_accuracy" in result.stdout and "pre_post_agreement" in result.stdout
    assert "efficacy_score" not in result.stdout


def test_eval_sequential_json_has_curve_and_resumes(tiny_dir, tmp_path, cache):
    run_dir = tmp_path / "seq"
    args = ["eval", "--model", str(tiny_dir), "--data", "counterfact", "--n", "3", *FAST_ROME, "--mode", "sequential",
            "--batch-size", "2", "--metrics", "reliability,locality", "--out", str(run_dir), "--json"]
    data = parse_json(run(*args))
    assert data["regime"] == "sequential" and data["batch_size"] == 2 and data["n"] == 3
    assert [c["edits"] for c in data["curve"]] == [2, 3]
    assert data["peak_rss_mb"] > 0 and data["edit_seconds"]["total"] > 0
    assert len(list((run_dir / "updates").glob("*.lmpatch"))) == 2
    again = parse_json(run(*args))  # everything saved: re-applied from disk, same scores
    assert again["metrics"] == data["metrics"]
    sampled = parse_json(run(*args[:-3], "--out", str(tmp_path / "sampled"), "--score-n", "2", "--json"))
    assert sampled["n"] == 3 and sampled["scored"] == 2 and sampled["counts"]["reliability"] == 2


def test_eval_protocol_filter_and_bad_mode(tiny_dir, tmp_path, cache):
    result = run("eval", "--model", str(tiny_dir), "--data", "counterfact", "--n", "1", *FAST_ROME,
                 "--protocol", "probability", "--out", str(tmp_path / "run"), "--json")
    data = parse_json(result)
    assert set(data["protocols"].values()) == {"probability_comparison"}
    bad = run("eval", "--model", str(tiny_dir), "--mode", "lifelong")
    assert bad.exit_code == 2 and "--mode" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("eval", "--model", str(tiny_dir), "--batch-size", "4")
    assert bad.exit_code == 2 and "--mode batch" in bad.stderr


def test_eval_metrics_all_selects_every_group_and_task(tiny_dir, tmp_path, cache, monkeypatch):
    """`--metrics all` is accepted and hands every metric group and whole-model task to the runner.

    The runner is replaced by a recorder: running every metric for real takes minutes, and
    each group is exercised by its own tests.
    """
    from lmpatch.cli import evaluate as cli_evaluate
    from lmpatch.eval import runner
    from lmpatch.eval.metrics import GROUPS
    from lmpatch.eval.tasks import TASK_NAMES

    groups, tasks = cli_evaluate.select_metrics("all", None)
    assert set(groups) == set(GROUPS) and set(tasks) == set(TASK_NAMES)
    assert cli_evaluate.select_metrics("all,piqa", None) == (groups, tasks)  # naming one again is harmless
    generation, no_tasks = cli_evaluate.select_metrics("all", "generation")
    assert "fluency" in generation and "reliability" not in generation and no_tasks == ()

    seen = {}

    def fake_run(model, requests, edit_fn, run_dir, **kwargs):
        seen.update(kwargs)
        return {"n": len(requests)}

    monkeypatch.setattr(runner, "run_independent", fake_run)
    monkeypatch.setattr(cli_evaluate, "prepare", lambda *a, **k: None)
    data = parse_json(run("eval", "--model", str(tiny_dir), "--data", "counterfact", "--n", "1", *FAST_ROME,
                          "--metrics", "all", "--out", str(tmp_path / "all"), "--json"))
    assert data["n"] == 1
    assert set(seen["metrics"]) == set(GROUPS) and set(seen["tasks"]) == set(TASK_NAMES)


def test_eval_mquake_reports_multihop_accuracy(tiny_dir, tmp_path, cache):
    data = parse_json(run("eval", "--model", str(tiny_dir), "--data", "mquake", "--n", "1", *FAST_ROME,
                          "--out", str(tmp_path / "mq"), "--json"))
    assert data["data"] == "mquake" and data["n"] == 1
    for table in (data["metrics"], data["metrics_pre"]):
        assert 0.0 <= table["multihop_accuracy"] <= 1.0
    assert data["protocols"]["multihop_accuracy"].startswith("generation_multihop")
    assert (tmp_path / "mq" / "multihop.json").is_file()


def test_merge_bakes_the_patch_into_a_checkpoint(tiny_dir, tmp_path, cache):
    patch_file = tmp_path / "e.lmpatch"
    parse_json(run("edit", "--model", str(tiny_dir), *EIFFEL, *FAST_ROME, "--out", str(patch_file), "--json", "--no-show"))
    out_dir = tmp_path / "merged"
    result = run("merge", str(patch_file), str(out_dir))  # base model taken from the patch
    assert result.exit_code == 0, (result.stderr, result.exception)
    patch = Patch.load(patch_file)
    base, merged = lmpatch.load_model(str(tiny_dir)), lmpatch.load_model(str(out_dir))
    name = patch.deltas[0].param
    expected = base.model.get_parameter(name) + patch.deltas[0].materialize()
    assert torch.equal(merged.model.get_parameter(name), expected)
    assert (out_dir / "lmpatch-merge.json").is_file()
    # From where the recorded name means nothing: the error says to pass --model.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = Patch(parts=patch.parts, method=patch.method, model_fingerprint=patch.model_fingerprint,
                  model_name="tiny-llama", requests=patch.requests)
    moved.save(elsewhere / "m.lmpatch")
    lost = run("merge", str(elsewhere / "m.lmpatch"), str(tmp_path / "merged2"))
    assert lost.exit_code == 2 and "made on 'tiny-llama'" in lost.stderr and "pass --model" in lost.stderr


def test_stats_computes_then_lists(tiny_dir, cache):
    data = parse_json(run("stats", "--model", str(tiny_dir), "--layers", "0,1", "--tokens", "600", "--json"))
    assert [r["layer"] for r in data["layers"]] == [0, 1]
    assert all(r["d_ff"] == 128 and r["count"] == 600 and not r["cached_before"] for r in data["layers"])
    listed = parse_json(run("stats", "--list", "--json"))
    assert sorted(e["layer"] for e in listed) == [0, 1]
    assert all(Path(e["path"]).is_relative_to(cache) for e in listed)
    again = parse_json(run("stats", "--model", str(tiny_dir), "--layers", "0,1", "--tokens", "600", "--json"))
    assert all(r["cached_before"] for r in again["layers"])


def test_stats_list_when_empty(cache):
    result = run("stats", "--list")
    assert result.exit_code == 0 and "No cached statistics" in result.stdout


# --------------------------------------------------------------------------- the demo


def _row(stdout: str, label: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if label in line)
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


@pytest.mark.model
@pytest.mark.slow
def test_demo_edits_then_reverts_exactly():
    result = run("demo", env={"COLUMNS": "240"})
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    prompt, original, patched, reverted = _row(result.stdout, "edited prompt")
    assert "Paris" in original and "Rome" in patched and "Paris" in reverted
    _, para_before, para_patched, _ = _row(result.stdout, "paraphrase")
    assert "Rome" in para_patched
    assert "Revert is bit-exact" in result.stdout


def test_prepare_computes_every_memit_layer_once(tiny_dir, cache):
    """The CLI's one-off step knows MEMIT's layers, so its statistics are not computed
    silently inside the first edit."""
    from lmpatch.cli.warmup import prepare
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.memit import MEMITHparams
    from lmpatch.methods.registry import get_method

    model = lmpatch.load_model(str(tiny_dir))
    hp = with_overrides(MEMITHparams, {"layers": (0, 1), "stats_tokens": 300})
    memit = get_method("memit")
    done = prepare(model, memit, hp, show=False)
    assert any("key statistics for layers 0, 1" in d for d in done)
    assert not any("key statistics" in d for d in prepare(model, memit, hp, show=False))
    assert len(list((cache / "stats").rglob("*.safetensors"))) >= 2


def test_cli_debias_writes_a_patch(tiny_dir, tmp_path, cache):
    prompts = tmp_path / "prompts.jsonl"
    rows = [("The surgeon laughed because", "The surgeon"), ("The nurse said that", "The nurse")] * 2
    prompts.write_text("".join(json.dumps({"prompt": p, "subject": s}) + "\n" for p, s in rows))
    out = tmp_path / "b.lmpatch"
    result = run("debias", "--model", str(tiny_dir), "--data", str(prompts), "--measure", "none", "--method", "dama",
                 "--set", "layers=1", "--set", "mom2_adjustment=false", "--set", "v_steps=2",
                 "--set", "nullspace_dimension=2", "--out", str(out), "--json")
    data = parse_json(result)
    assert data["method"] == "dama" and data["n_prompts"] == 4 and Patch.load(out).patch_id == data["patch_id"]


@pytest.mark.parametrize("args, expected", [
    (["--method", "rome"], "Unknown debias method"),
    (["--measure", "train"], "Unknown --measure"),
    (["--data", "missing.jsonl"], "does not exist"),
    (["--set", "nope=1"], "Unknown hyperparameter"),
])
def test_cli_debias_mistakes_are_one_line(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("debias", *args)
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert expected in line


# --------------------------------------------------------------------------- serve


def test_serve_refuses_a_missing_or_empty_token_file_in_one_line(tiny_dir, tmp_path):
    result = run("serve", "--model", str(tiny_dir), "--token-file", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "Token file" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty").write_text("\n")
    result = run("serve", "--model", str(tiny_dir), "--token-file", str(tmp_path / "empty"))
    assert result.exit_code == 2 and "is empty" in result.stderr


def test_serve_refuses_a_ledger_made_for_another_model_in_one_line(tiny_dir, tmp_path):
    from lmpatch.serve.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger")
    ledger.bind_base("0000000000000000", "another-model")
    ledger.close()
    result = run("serve", "--model", str(tiny_dir), "--ledger", str(tmp_path / "ledger"), env={"LMPATCH_TOKEN": "x"})
    assert result.exit_code == 2 and "was made for model 'another-model'" in result.stderr


def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--port", str(port), "--ledger", str(tmp_path / "l"), env={"LMPATCH_TOKEN": "x"})
    assert result.exit_code == 2 and f"Cannot listen on 127.0.0.1:{port}" in result.stderr
    result = run("serve", "--host", "no.such.host.invalid", "--ledger", str(tmp_path / "l"))
    assert result.exit_code == 2 and "Cannot bind to host" in result.stderr
