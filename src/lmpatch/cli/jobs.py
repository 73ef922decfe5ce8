"""What every command that computes a patch (``edit``, ``forget``, ``detox``, ``debias``) does
with its output path and its result: check the path first, save the patch, report it."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lmpatch.cli.console import print_json
from lmpatch.cli.options import slug
from lmpatch.errors import LmpatchError, PatchError
from lmpatch.fileio import writable_file_problem
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch


def check_out_path(path: Path | None) -> None:
    """Refuse an output path the patch could not be written to, before minutes of work."""
    if path is not None and (problem := writable_file_problem(path)):
        raise LmpatchError(f"Cannot write the patch to '{path}': {problem}.")


def save_or_rescue(patch: Patch, path: Path) -> Path:
    """Save ``patch`` at ``path``; if that fails (a full disk, a folder gone), save it in the
    temporary directory and say where, so the work is never thrown away."""
    try:
        return patch.save(path)
    except PatchError as exc:
        rescue = Path(tempfile.gettempdir()) / f"lmpatch-{patch.patch_id}.lmpatch"
        try:
            patch.save(rescue)
        except PatchError:
            raise exc from None
        raise LmpatchError(f"{exc} The patch is saved in '{rescue}' instead; move it where you want it.") from exc


def save_job_patch(patch: Patch, job: str, method: str, n: int, out_path: Path | None, model: LoadedModel,
                   as_json: bool) -> dict:
    """Save ``patch`` (default name ``JOB-METHOD-N-ID.lmpatch``) and return the job's report:
    ``patch.metrics[job]`` plus the patch id, path and model. With ``as_json`` the report is
    also printed as the command's one JSON object."""
    path = save_or_rescue(patch, out_path or Path(f"{job}-{slug(method)}-{n}-{patch.patch_id[:8]}.lmpatch"))
    report = {**patch.metrics[job], "patch_id": patch.patch_id, "path": str(path), "model": model.name}
    if as_json:
        print_json(json.dumps(report))
    return report
