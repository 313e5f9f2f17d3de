"""Files that appear whole or not at all: the one way the harness writes what it keeps.

A crash, a full disk or a kill mid-write leaves the previous file (or none), never a torn one:
every write goes to a temp file in the target's folder, is flushed to disk, then renamed over the
target (``write_atomic``) or linked to a name that must not exist yet (``write_new``, which never
replaces an earlier run).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """path holds data, replacing what it held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _written_temp(path.parent, f".{path.name}.", data)
    try:
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_new(folder: Path, stem: str, suffix: str, data: str | bytes) -> Path:
    """folder/stem+suffix holding data, or stem-2+suffix etc. if taken: nothing is overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _written_temp(folder, f".{stem}.", data)
    try:
        for attempt in range(1, 1000):
            path = folder / (f"{stem}{suffix}" if attempt == 1 else f"{stem}-{attempt}{suffix}")
            try:
                os.link(tmp, path)  # fails, where a rename would replace, if path exists
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free file name for {stem}{suffix} in {folder}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _written_temp(folder: Path, prefix: str, data: str | bytes) -> str:
    """A temp file in folder holding data, on disk, with the mode a plain open() would give
    (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp
