"""Load edit requests from a named shipped dataset or from any user file.

A bad record must not cost the user a whole run: records that cannot become a valid
:class:`EditRequest` are repaired when the repair is unambiguous, otherwise skipped and
counted (one warning per load). A file whose format cannot be recognised at all is an error.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmpatch.data.jsonio import read_records, write_jsonl
from lmpatch.data.merge import annotate_by_question, merge_by_case_id
from lmpatch.data.paths import shipped_path
from lmpatch.data.registry import dataset_info, dataset_names, is_dataset_name, is_knowedit_name
from lmpatch.data.schemas import detect_schema, to_request
from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.request import EditRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadResult:
    """Everything a load produced, including what was repaired or skipped and why."""

    source: str
    schema: str
    requests: tuple[EditRequest, ...]
    skipped: tuple[tuple[int, str], ...] = ()  # (position in the file, reason)
    fixes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.requests) + len(self.skipped)


def _shipped_records(relative: str) -> list[Any]:
    return read_records(shipped_path(*relative.split("/")))


def _raw_records(name_or_path: str | Path) -> tuple[str, list[Any]]:
    if isinstance(name_or_path, str) and is_dataset_name(name_or_path):
        info = dataset_info(name_or_path)
        groups = [(f, _shipped_records(f)) for f in info.files]
        records = merge_by_case_id(groups) if info.merged else groups[0][1]
        if info.annotations:
            records = annotate_by_question(records, [(f, _shipped_records(f)) for f in info.annotations])
        return f"dataset {info.name!r}", records
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise LmpatchError(
            f"No dataset named {str(name_or_path)!r} and no file at {path}; give a path to a JSON/JSONL file "
            f"or one of: {', '.join(dataset_names())}."
        )
    records = read_records(path)
    return str(path), records


def read_dataset(name_or_path: str | Path) -> LoadResult:
    """All records of a dataset as requests, with the repair and skip accounting."""
    from lmpatch.data.knowedit import detect_knowedit, load_knowedit_set, parse_knowedit

    if isinstance(name_or_path, str) and is_knowedit_name(name_or_path):
        return _from_knowedit(load_knowedit_set(name_or_path))
    source, records = _raw_records(name_or_path)
    if not records:
        raise LmpatchError(f"{source} contains no records.")
    # KnowEdit records also match the generic EasyEdit shape, whose reading would lose
    # their nested locality/portability categories: recognise them first.
    # EasyEdit writes the same top-level keys with parallel prompt/answer lists inside the
    # categories; those records fall through to the generic schema.
    kind = detect_knowedit(records)
    if kind is not None:
        try:
            return _from_knowedit(parse_knowedit(records, kind, source))
        except InvalidRequestError as exc:
            logger.debug("%s looks like KnowEdit %s but is not (%s); reading it generically", source, kind, exc)
    schema = detect_schema(records[0], source)
    requests, skipped, fixes = [], [], Counter()
    for position, record in enumerate(records):
        try:
            request, applied = to_request(schema, record, position)
        except InvalidRequestError as exc:
            skipped.append((position, str(exc)))
            continue
        requests.append(request)
        fixes.update(applied)
    if not requests:
        raise LmpatchError(
            f"None of the {len(records)} records in {source} is a usable edit request "
            f"({schema.name} format); first problem: {skipped[0][1]}"
        )
    return LoadResult(source, schema.name, tuple(requests), tuple(skipped), dict(fixes))


def _from_knowedit(load) -> LoadResult:
    return LoadResult(load.source, f"knowedit-{load.kind}", tuple(load.requests), tuple(load.skipped), dict(load.fixes))


def _check_slice(n: int | None, offset: int) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise LmpatchError(f"n must be a non-negative whole number or None, got {n!r}.")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise LmpatchError(f"offset must be a non-negative whole number, got {offset!r}.")


def load_dataset(name_or_path: str | Path, n: int | None = None, offset: int = 0) -> list[EditRequest]:
    """Edit requests from a named dataset (see :func:`dataset_names`) or a JSON/JSONL(.gz) file.

    ``offset``/``n`` select records after skipping, so ``n`` is the number of usable requests.
    The file format (ROME CounterFact, EasyEdit, zsRE/MEND or lmpatch's own) is detected.
    """
    _check_slice(n, offset)
    result = read_dataset(name_or_path)
    if result.skipped:
        position, reason = result.skipped[0]
        logger.warning(
            "Skipped %d of %d records in %s that are not valid edit requests (first, record %d: %s)",
            len(result.skipped), result.total, result.source, position + 1, reason,
        )
    if result.fixes:
        logger.info("Repaired records in %s: %s", result.source, ", ".join(f"{k} x{v}" for k, v in sorted(result.fixes.items())))
    end = None if n is None else offset + n
    return list(result.requests[offset:end])


def save_requests(path: str | Path, requests: Iterable[EditRequest]) -> Path:
    """Write requests as JSON Lines (gzip when the name ends in ``.gz``); ``load_dataset`` reads them back."""
    return write_jsonl(Path(path).expanduser(), (request.to_dict() for request in requests))


def case_ids(requests: Iterable[EditRequest]) -> frozenset[str]:
    """The case ids of ``requests``, e.g. to keep tuning and test cases apart."""
    return frozenset(r.case_id for r in requests if r.case_id is not None)


def drop_cases(requests: Iterable[EditRequest], excluded: Iterable[str]) -> list[EditRequest]:
    """``requests`` without those whose case_id is in ``excluded`` (e.g. the tuning split's ids)."""
    excluded = {str(c) for c in excluded}
    return [r for r in requests if r.case_id not in excluded]
