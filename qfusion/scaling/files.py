"""Writing the scaling analysis's files atomically: a reader sees the old file or the whole new one."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let ``write(temporary)`` write a file beside ``path``, then move it onto ``path`` in one step.

    The temporary file is a hidden file in the same directory (so the move is a rename); it is
    removed if ``write`` fails. Returns ``path`` as a Path.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: no directory {str(path.parent)!r} to write {str(path)!r} in")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json(data, path: str | os.PathLike) -> Path:
    """Write JSON-ready ``data`` to ``path`` (indented), atomically. Returns ``path`` as a Path."""

    def dump(temporary: Path) -> None:
        with open(temporary, "x") as handle:
            json.dump(data, handle, indent=2)

    return write_atomically(path, dump)
