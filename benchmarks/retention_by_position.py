"""Which edits a sequential run kept: the final scores of its scored edits by when they were made.

A sequential run (``lmpatch eval --mode sequential``, ``benchmarks/scale.py``) scores a
sample of its edits on the final model. Averaged, that hides *which* edits are lost: the
early ones, worn away by the batches after them, or the late ones, written weakly against
everything already preserved. This reads the run's ``records.jsonl`` and prints the scores
per slice of the run (``--slices``, by update number), so the two can be told apart.

    python benchmarks/retention_by_position.py runs/scale/ultraedit-b100-10000
    python benchmarks/retention_by_position.py RUN_DIR OTHER_RUN_DIR --slices 5
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

SCORES = (("efficacy", "efficacy"), ("paraphrase_score", "paraphrase"), ("neighborhood_score", "neighbourhood"))


def scored_records(run_dir: Path) -> list[dict]:
    """The run's records that were scored on the final model (they carry ``post``)."""
    path = run_dir / "records.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir} has no records.jsonl: give the directory of one sequential run.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if isinstance(r.get("post"), dict) and "update" in r]


def by_slice(records: list[dict], slices: int) -> list[tuple[range, int, dict[str, float]]]:
    """Per slice of update numbers: the updates it covers, its scored edits and their mean scores."""
    last = max(r["update"] for r in records) + 1
    size = -(-last // slices)
    out = []
    for start in range(0, last, size):
        part = [r for r in records if start <= r["update"] < start + size]
        if part:
            means = {key: _mean([float(r["post"][key]) for r in part if key in r["post"]]) for key, _ in SCORES}
            out.append((range(start, min(start + size, last)), len(part), means))
    return out


def _mean(values: list[float]) -> float:
    """Their mean; NaN for none (a score the run did not measure is not a zero)."""
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="directories of sequential runs")
    ap.add_argument("--slices", type=int, default=10, help="how many slices of the run (default 10)")
    args = ap.parse_args()
    if args.slices < 1:
        raise SystemExit("--slices must be at least 1.")
    console = Console()
    for run_dir in args.runs:
        records = scored_records(run_dir)
        if not records:
            raise SystemExit(f"{run_dir}: no record was scored on the final model.")
        table = Table(title=f"{run_dir}: final scores by when the edit was made")
        for col in ("updates", "scored edits", *(label for _, label in SCORES)):
            table.add_column(col)
        for updates, n, means in by_slice(records, args.slices):
            table.add_row(f"{updates.start}-{updates.stop - 1}", str(n), *(f"{means[key]:.3f}" for key, _ in SCORES))
        console.print(table)


if __name__ == "__main__":
    main()
