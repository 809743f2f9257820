"""rewrite.files.write_atomically: a set of files is written in full, or the old set stays."""

import os

import pytest

from rewrite.files import write_atomically


def test_a_failed_write_leaves_the_old_set_and_no_temporary_file(tmp_path):
    write_atomically({tmp_path / "a.json": "old a", tmp_path / "b.bin": b"old b"})

    def fails(path):
        path.write_bytes(b"half of it")
        raise RuntimeError("serialiser failed")

    with pytest.raises(RuntimeError, match="serialiser failed"):
        write_atomically({tmp_path / "a.json": "new a", tmp_path / "b.bin": fails})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a.json": b"old a", "b.bin": b"old b"}


def test_new_files_get_ordinary_permissions_and_folders_are_made(tmp_path):
    write_atomically({tmp_path / "new" / "report.txt": "text"})
    path = tmp_path / "new" / "report.txt"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.read_text() == "text"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives, not mkstemp's private 0600


def test_a_folder_in_the_way_is_an_os_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomically({tmp_path / "taken": "text"})
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
