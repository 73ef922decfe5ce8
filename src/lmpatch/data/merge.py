"""Union of record files that annotate the same cases.

EasyEdit spread its CounterFact annotations (portability, distracting neighbours, subject
aliases) over separate files that repeat the core record; merging by ``case_id`` gives one
record per case carrying every annotation, so each edit is evaluated once with all probes.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from lmpatch.errors import LmpatchError

logger = logging.getLogger(__name__)


def _case_order(record: dict) -> tuple[int, int, str]:
    case_id = str(record["case_id"])
    return (0, int(case_id), "") if case_id.lstrip("-").isdigit() else (1, 0, case_id)


def merge_by_case_id(groups: Iterable[tuple[str, list[Any]]]) -> list[dict]:
    """One record per ``case_id`` with the keys of all its copies, ordered by case_id.

    ``groups`` pairs a source name (for messages) with its records. When two copies disagree
    on a key, differing ``portability`` annotations are all kept (as a list); for any other
    key the first file wins and the disagreement is logged.
    """
    merged: dict[str, dict] = {}
    disagreements = 0
    for source, records in groups:
        for record in records:
            if not isinstance(record, dict) or record.get("case_id") is None:
                raise LmpatchError(f"Cannot merge {source}: every record needs a case_id.")
            base = merged.setdefault(str(record["case_id"]), {})
            for key, value in record.items():
                if key not in base or base[key] == value:
                    base[key] = value
                elif key == "portability":
                    kept = base[key] if isinstance(base[key], list) else [base[key]]
                    extra = value if isinstance(value, list) else [value]
                    base[key] = kept + [v for v in extra if v not in kept]
                else:
                    disagreements += 1
    if disagreements:
        logger.warning("Merging kept the first file's value for %d fields whose copies disagree.", disagreements)
    return sorted(merged.values(), key=_case_order)
