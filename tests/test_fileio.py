"""Atomic writes: complete files under the real name, nothing left behind, shareable modes."""
from __future__ import annotations

import json
import os
import stat

import pytest

from lmpatch.fileio import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    default_file_mode,
    share_like_new_files,
)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
    assert default_file_mode() == 0o640


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_umask_mode_not_0600(tmp_path, umask, mask, expected):
    umask(mask)
    paths = [
        atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01"),
        atomic_write_text(tmp_path / "b.txt", "naïve"),
        atomic_write_json(tmp_path / "c.json", {"k": 1}),
    ]
    with atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"x")
    paths.append(tmp_path / "d.bin")
    assert [_mode(p) for p in paths] == [expected] * 4


def test_safetensors_writer_output_is_shareable(tmp_path, umask):
    """safetensors itself creates 0600 files; through atomic_path they get the umask mode."""
    import torch
    from safetensors.torch import load_file, save_file

    umask(0o022)
    with atomic_path(tmp_path / "t.safetensors") as tmp:
        save_file({"w": torch.arange(4.0)}, str(tmp))
    assert _mode(tmp_path / "t.safetensors") == 0o644
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["w"], torch.arange(4.0))


def test_content_is_complete_and_replaces_old_file(tmp_path):
    path = tmp_path / "sub" / "dir" / "x.json"  # parents are created
    atomic_write_json(path, {"a": [1, 2]})
    atomic_write_json(path, {"b": "é"}, indent=None)
    assert path.read_text(encoding="utf-8") == '{"b": "é"}\n'
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": "é"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_failure_inside_writer_leaves_nothing_and_keeps_old_file(tmp_path):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


def test_unserialisable_json_fails_before_touching_disk(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_json_default_hook(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"p": tmp_path}, default=str)
    assert json.loads((tmp_path / "x.json").read_text())["p"] == str(tmp_path)


def test_share_like_new_files_fixes_a_directory(tmp_path, umask):
    umask(0o022)
    (tmp_path / "m").mkdir()
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "m" / name).write_bytes(b"{}")
        os.chmod(tmp_path / "m" / name, 0o600)
    share_like_new_files(tmp_path / "m")
    assert {_mode(p) for p in (tmp_path / "m").iterdir()} == {0o644}


def test_write_jsonl_goes_through_atomic_write(tmp_path, umask):
    from lmpatch.data.jsonio import read_records, write_jsonl

    umask(0o027)
    path = write_jsonl(tmp_path / "out.jsonl.gz", [{"a": 1}, {"b": 2}])
    assert read_records(path) == [{"a": 1}, {"b": 2}]
    assert _mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.gz"]


def _has_marker(path):
    return (path / "done").is_file()


def test_atomic_dir_keeps_a_copy_another_process_placed_meanwhile(tmp_path):
    # Two jobs building the same cache entry: the first to finish may already be reading
    # its copy, so the second must not delete it to put its own in place.
    dest = tmp_path / "entry"
    with atomic_dir(dest, complete=_has_marker) as tmp:
        (tmp / "done").write_text("mine")
        dest.mkdir()
        (dest / "done").write_text("theirs")
        inode = dest.stat().st_ino
    assert (dest / "done").read_text() == "theirs" and dest.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]   # the temporary copy is gone


def test_atomic_dir_replaces_an_incomplete_leftover(tmp_path):
    dest = tmp_path / "entry"
    dest.mkdir()
    (dest / "half").write_text("crashed writer")
    with atomic_dir(dest, complete=_has_marker) as tmp:
        (tmp / "done").write_text("mine")
    assert sorted(p.name for p in dest.iterdir()) == ["done"]
    assert (dest / "done").read_text() == "mine"
