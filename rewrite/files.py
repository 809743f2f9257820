"""Writing outputs all or nothing: every file goes to a temporary name beside it, then is renamed into place.

A reader never sees half a file, and a run that fails while writing leaves the previous outputs as they were:
nothing is renamed until every file of the set is written in full.

>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> write_atomically({folder / "a.txt": b"one", folder / "b.txt": "two"})
>>> sorted(p.name for p in folder.iterdir()), (folder / "b.txt").read_text()
(['a.txt', 'b.txt'], 'two')
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["write_atomically"]

# What to write: bytes, text (UTF-8), or a function that writes the file at the path it is given.
Content = bytes | str | Callable[[Path], None]


def write_atomically(files: Mapping[Path, Content]) -> None:
    """Write every file of ``files`` under a temporary name in its own folder, then rename them all into place.

    Folders are created. Should writing any of them fail, the temporary files are removed, the targets keep
    their old contents, and the error (an ``OSError``, or whatever a writer function raised) propagates.
    """
    written: list[tuple[Path, Path]] = []
    mode = _new_file_mode()
    try:
        for target, content in files.items():
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                raise IsADirectoryError(21, "Is a directory", str(target))
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(handle)
            temporary = Path(name)
            written.append((temporary, target))
            _write(temporary, content)
            os.chmod(temporary, mode)  # mkstemp makes it private; the file gets what open() would give it
    except BaseException:
        for temporary, _ in written:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise
    for temporary, target in written:
        os.replace(temporary, target)  # atomic on one file system; the temporary file sits beside its target


def _new_file_mode() -> int:
    """The permissions a new file gets from ``open()``: 0o666 less the process's umask."""
    umask = os.umask(0o022)  # reading the umask means setting it; it is put back at once
    os.umask(umask)
    return 0o666 & ~umask


def _write(path: Path, content: Content) -> None:
    if callable(content):
        content(path)
        return
    data = content.encode("utf-8") if isinstance(content, str) else content
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
