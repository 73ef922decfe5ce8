"""The named datasets shipped with lmpatch.

A name stands for one or more files under ``lmpatch/data/files/``; several files are merged
by ``case_id`` (the ROME-schema CounterFact annotations are spread over three files that
share cases). The table is an immutable module constant: adding a dataset means adding a row.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmpatch.errors import LmpatchError


@dataclass(frozen=True)
class DatasetInfo:
    """A shipped dataset: its files (relative to the package's ``files/``) and what it is for."""

    name: str
    description: str
    files: tuple[str, ...]

    @property
    def merged(self) -> bool:
        return len(self.files) > 1


_DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        "counterfact",
        "CounterFact in the full ROME schema with portability, distracting-neighbour and "
        "subject-alias annotations (1,129 cases, ordered by case_id).",
        (
            "counterfact/rome/counterfact_portability_gpt4.json.gz",
            "counterfact/rome/counterfact_distracting_neighbor.json.gz",
            "counterfact/rome/counterfact_subject_replace.json.gz",
        ),
    ),
    DatasetInfo(
        "counterfact-train",
        "EasyEdit's CounterFact train split, one paraphrase and one neighbour per case (10,000); for tuning.",
        ("counterfact/counterfact-train.json.gz",),
    ),
    DatasetInfo(
        "counterfact-edit",
        "EasyEdit's CounterFact edit split, one paraphrase and one neighbour per case (10,000); for evaluation.",
        ("counterfact/counterfact-edit.json.gz",),
    ),
    DatasetInfo(
        "zsre",
        "zsRE question-answering edits from the MEND eval split, with one-hop portability questions (1,037).",
        ("zsre/zsre_mend_eval_portability_gpt4.json.gz",),
    ),
    DatasetInfo(
        "zsre-train",
        "A 1,000-record sample of the zsRE MEND train split; for tuning and training editors.",
        ("zsre/zsre_mend_train-1k.json.gz",),
    ),
)


def dataset_names() -> list[str]:
    """Names accepted by :func:`lmpatch.data.load_dataset` besides file paths."""
    return [info.name for info in _DATASETS]


def dataset_descriptions() -> dict[str, str]:
    """Name -> one-line description, for ``--help`` texts and listings."""
    return {info.name: info.description for info in _DATASETS}


def dataset_info(name: str) -> DatasetInfo:
    for info in _DATASETS:
        if info.name == name:
            return info
    raise LmpatchError(f"Unknown dataset {name!r}; named datasets are: {', '.join(dataset_names())}.")


def is_dataset_name(name: str) -> bool:
    return name in dataset_names()
