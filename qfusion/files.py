"""Files written atomically: a reader sees the old file or the whole new one, never half of it; and
JSON-lines files read with errors that name the line.

Every file qfusion writes outside a staged plugin directory (results, scores, fits, figures, logs,
configs) goes through :func:`write_atomically`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator


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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically. Returns ``path`` as a Path."""
    def dump(temporary: Path) -> None:
        with open(temporary, "x", newline="") as handle:
            handle.write(text)

    return write_atomically(path, dump)


def write_json(data, path: str | os.PathLike, *, sort_keys: bool = False) -> Path:
    """Write JSON-ready ``data`` to ``path`` (indented, ending in a newline), atomically.

    Non-finite floats (a fit's NaN interval) are written as ``null``, so the file is strict JSON.
    Returns ``path`` as a Path.
    """
    return write_text(path, json.dumps(_finite(data), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def read_json_lines(path: str | os.PathLike, where: Callable[[int], str]) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of the JSON-lines file at ``path``, in order.

    where: line number -> how an error names that line (e.g. ``"data.jsonl:3"``); a line that is not
        JSON is a ValueError "<where>: not JSON (<reason>)".
    """
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where(number)}: not JSON ({error})") from None


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
