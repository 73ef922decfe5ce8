"""benchmarks/retention_by_position.py: the final scores of a run's scored edits, by slice of the run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("retention_by_position", ROOT / "benchmarks" / "retention_by_position.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path


def test_slices_average_only_the_scored_edits_of_their_updates(script, tmp_path):
    post = lambda ok, para: {"efficacy": ok, "paraphrase_score": para, "neighborhood_score": 1.0}  # noqa: E731
    rows = [
        {"case_id": "a", "update": 0, "post": post(True, 1.0)},
        {"case_id": "b", "update": 0},                            # edited, not scored
        {"case_id": "c", "update": 1, "post": post(False, 0.0)},
        {"case_id": "d", "update": 2, "post": post(False, 0.5)},
        {"case_id": "e", "update": 3, "post": post(True, 0.5)},
    ]
    records = script.scored_records(_run(tmp_path, rows))
    assert [r["case_id"] for r in records] == ["a", "c", "d", "e"]
    slices = script.by_slice(records, 2)
    assert [(list(u), n) for u, n, _ in slices] == [([0, 1], 2), ([2, 3], 2)]
    assert slices[0][2] == {"efficacy": 0.5, "paraphrase_score": 0.5, "neighborhood_score": 1.0}
    assert slices[1][2]["efficacy"] == 0.5 and slices[1][2]["paraphrase_score"] == 0.5


def test_a_directory_without_records_is_one_clear_error(script, tmp_path):
    with pytest.raises(SystemExit, match="no records.jsonl"):
        script.scored_records(tmp_path)


def test_a_score_no_edit_of_a_slice_has_is_not_counted_as_zero(script):
    records = [{"update": 0, "post": {"efficacy": True}}, {"update": 0, "post": {"efficacy": False, "paraphrase_score": 1.0}}]
    (_, n, means), = script.by_slice(records, 1)
    assert n == 2 and means["efficacy"] == 0.5 and means["paraphrase_score"] == 1.0
    assert means["neighborhood_score"] != means["neighborhood_score"]  # NaN: not measured
