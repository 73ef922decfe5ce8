"""What a run directory was made by, so that resuming never mixes two different runs.

A run resumes by skipping the requests whose records are already in ``records.jsonl``,
matched by case id. Without more, ``lmpatch eval --method grace --out DIR`` on a
directory a ROME run left behind would skip every request and report ROME's records
under GRACE's name. So each run writes ``run.json`` (method, settings, model, regime,
metrics) when it starts, and a resume whose own identity differs is refused with the
fields that differ. Directories from before ``run.json`` are checked by the method their
records carry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpatch.errors import LmpatchError
from lmpatch.eval.records import RECORDS_FILE, read_records
from lmpatch.fileio import atomic_write_json
from lmpatch.patch.jsonable import json_dict

RUN_FILE = "run.json"


def run_identity(**fields: Any) -> dict:
    """The fields as JSON reads them back (tuples become lists, dataclasses dicts), so a
    resume compares like with like; ``None`` fields are left out."""
    return json_dict({k: v for k, v in fields.items() if v is not None}, "run identity")


def claim_run(out: Path, identity: dict, resume: bool) -> None:
    """Record ``identity`` as ``out``'s run, refusing a resume of a different run.

    The CLI's ``--no-resume`` (``resume=False``) starts the directory afresh, so it may
    always claim it."""
    path = out / RUN_FILE
    if resume:
        previous = _read(path)
        if previous is not None:
            differ = [k for k in sorted(set(previous) | set(identity)) if previous.get(k) != identity.get(k)]
            if differ:
                shown = "; ".join(f"{k}: {_short(previous.get(k))} there, {_short(identity.get(k))} now" for k in differ)
                raise LmpatchError(f"{out} holds a different run ({shown}); give a new --out, or --no-resume "
                                   "(resume=False) to start it afresh.")
        else:
            methods = {r.get("method") for r in read_records(out / RECORDS_FILE)} - {None}
            if methods and methods != {identity.get("method")}:
                raise LmpatchError(f"{out} holds records of {', '.join(sorted(methods))}, not "
                                   f"{identity.get('method')}; give a new --out, or --no-resume (resume=False) "
                                   "to start it afresh.")
    atomic_write_json(path, identity)


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LmpatchError(f"{path} is not readable ({exc}); remove it, or use --no-resume.") from exc
    return value if isinstance(value, dict) else None


def _short(value: Any, limit: int = 80) -> str:
    text = "none" if value is None else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"
