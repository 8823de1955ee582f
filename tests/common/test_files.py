"""common.files: a file appears whole or not at all; a failed write leaves nothing behind; a full disk is named."""
import errno
import os

import pytest

from common.files import NoSpaceError, atomic_dir, atomic_path, is_no_space, write_json, write_text


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "m.json"
    write_json(str(p), {"b": 1, "a": 2})
    assert p.read_text() == '{\n  "a": 2,\n  "b": 1\n}'
    write_text(str(p), "new")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["m.json"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(str(p)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_atomic_dir_replaces_a_directory_only_on_success(tmp_path):
    d = tmp_path / "out"
    with atomic_dir(str(d)) as tmp:
        (open(os.path.join(tmp, "a"), "w")).close()
    assert os.listdir(d) == ["a"]
    with pytest.raises(ValueError):
        with atomic_dir(str(d)) as tmp:
            (open(os.path.join(tmp, "b"), "w")).close()
            raise ValueError
    assert os.listdir(d) == ["a"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_full_disk_errors_are_recognised_also_when_wrapped():
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos; basic_ios::clear: iostream error")
    assert is_no_space(wrapped)
    assert not is_no_space(OSError(errno.EACCES, "Permission denied"))
    e = NoSpaceError("/x/y")
    assert "no space left on the filesystem of /x/y" in str(e)
