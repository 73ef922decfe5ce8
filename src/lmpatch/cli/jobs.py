"""What every job command (``forget``, ``detox``) does with its result: save the patch, report it."""
from __future__ import annotations

import json
from pathlib import Path

from lmpatch.cli.console import print_json
from lmpatch.cli.options import slug
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch


def save_job_patch(patch: Patch, job: str, method: str, n: int, out_path: Path | None, model: LoadedModel,
                   as_json: bool) -> dict:
    """Save ``patch`` (default name ``JOB-METHOD-N-ID.lmpatch``) and return the job's report:
    ``patch.metrics[job]`` plus the patch id, path and model. With ``as_json`` the report is
    also printed as the command's one JSON object."""
    path = out_path or Path(f"{job}-{slug(method)}-{n}-{patch.patch_id[:8]}.lmpatch")
    patch.save(path)
    report = {**patch.metrics[job], "patch_id": patch.patch_id, "path": str(path), "model": model.name}
    if as_json:
        print_json(json.dumps(report))
    return report
