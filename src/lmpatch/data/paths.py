"""Where the data files shipped inside the package live.

The files sit next to this module (``lmpatch/data/files/``) so that a plain
``pip install`` carries them and nothing is fetched at run time; wheels are
installed unpacked, so a filesystem path is always available.
"""
from __future__ import annotations

from pathlib import Path

from lmpatch.errors import LmpatchError

FILES_DIR = Path(__file__).resolve().parent / "files"


def shipped_path(*parts: str) -> Path:
    """Path of a shipped file, e.g. ``shipped_path("wikitext-2-raw", "wiki.test.raw.gz")``.

    Raises instead of returning a dangling path, because a missing shipped file means a
    broken installation and the user should hear that, not a later ``FileNotFoundError``.
    """
    path = FILES_DIR.joinpath(*parts)
    if not path.is_file():
        raise LmpatchError(
            f"The shipped data file {path} is missing; reinstall lmpatch (the package data was not installed)."
        )
    return path
