"""Editing datasets: shipped CounterFact and zsRE files, and loaders for user files."""
from lmpatch.data.loaders import LoadResult, case_ids, drop_cases, load_dataset, read_dataset, save_requests
from lmpatch.data.paths import shipped_path
from lmpatch.data.registry import DatasetInfo, dataset_descriptions, dataset_info, dataset_names

__all__ = [
    "DatasetInfo",
    "LoadResult",
    "case_ids",
    "dataset_descriptions",
    "dataset_info",
    "dataset_names",
    "drop_cases",
    "load_dataset",
    "read_dataset",
    "save_requests",
    "shipped_path",
]
