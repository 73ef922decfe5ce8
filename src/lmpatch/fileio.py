"""Writing files so that a reader never sees half of one, with shareable permissions.

Every file lmpatch writes (patches, caches, run summaries, reports) goes to a temporary
name in the destination directory and is renamed into place only once it is complete:
a crash or a full disk leaves the previous file (or none), never a truncated one that a
later run would trust. The temporary file is removed when writing fails.

Permissions: ``tempfile.mkstemp`` and the safetensors writer both create files readable
by the owner only (0600). Renamed into place unchanged, a saved patch or a statistics
cache could not be shared with a team, so every finished file gets the mode an ordinary
``open(path, "w")`` would have given it: ``0666 & ~umask`` (usually 0644).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

_CREATE_MODE = 0o666


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which briefly changes it for every
    thread; Linux reports it in ``/proc/self/status``, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a newly created regular file gets under the current umask."""
    return _CREATE_MODE & ~current_umask()


def share_like_new_files(path: str | os.PathLike) -> None:
    """Give ``path`` (or every file below it, for a directory) the umask-based file mode.

    For writers that produce a whole directory (``save_pretrained``), whose files may be
    created 0600 by the safetensors writer.
    """
    path = Path(path)
    mode = default_file_mode()
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        os.chmod(file, mode)


def write_failure(exc: BaseException) -> str:
    """What went wrong in a failed write, for a one-line error: the OS's words for an
    ``OSError``, the part after safetensors' own prefix for its errors (it reports a full
    disk as "Error while serializing: I/O error: No space left on device")."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).split(": ", 1)[-1]


def writable_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file could not be written at ``path`` (None when it can), found without writing it.

    Commands that compute for minutes before they save ask this first, so a mistyped
    output path fails in a second instead of after the work."""
    path = Path(path).expanduser()
    if path.is_dir():
        return "it is a directory"
    parent = path.parent
    while not parent.exists():  # the directories atomic_path would create: the first existing one decides
        parent = parent.parent
    if not parent.is_dir():
        return f"'{parent}' is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"'{parent}' is not writable"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it becomes ``path``, on failure it is removed.

    For writers that insist on a file name (``safetensors.torch.save_file``,
    ``Figure.savefig``). The temporary name ends in ``.tmp``, so writers that guess the
    format from the suffix must be told the format explicitly. Parent directories are
    created as needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it becomes ``path``,
    on failure it is removed, so no reader ever sees a half-written directory.

    ``complete`` says whether a directory already at ``path`` is a finished copy. When
    another process placed one while this one was writing (two jobs building the same
    cache entry), that copy is kept and this one dropped: both came from the same inputs,
    and the other process may already be reading it. Only an incomplete leftover is
    replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        share_like_new_files(tmp)
        if path.exists() and complete(path):
            return
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path.exists() and complete(path)):  # not a lost race with an equally good copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike,
    data: Any,
    *,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``data`` as UTF-8 JSON (non-ASCII kept readable, newline-terminated) atomically.

    The document is serialised before anything touches the disk, so data JSON cannot
    represent fails without creating a file.
    """
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=default) + "\n"
    return atomic_write_text(path, text)
