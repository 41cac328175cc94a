"""Atomic file writes shared by every package (pure Python: the torch-free contract modules use them too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of `data`, never a part.

    The bytes go to a temporary file in the same directory, are fsync'ed, and replace `path` with one
    rename; the directory is fsync'ed too, so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves no partial file behind
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # name the file the user knows, not the temporary one
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power cut) left in `directory` and
    its subfolders; returns them. Call it only while no writer is running there."""
    stale = [p for p in Path(directory).rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
