"""The project's one way to write a file that is never seen half-written.

Every writer (run folders, checkpoints, reports, figures, study tables) goes through :func:`atomic_write`: the
content goes to a temporary file in the same folder, is flushed and fsynced, then ``os.replace`` puts it in
place, so a reader (or a process killed mid-write) sees either the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["append_line", "atomic_open", "atomic_save", "atomic_write", "atomic_write_json"]


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. The parent folder is created. On an exception the temporary
    file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> None:
    """Let ``writer(f)`` fill a binary file (``torch.save(obj, f)``, ``fig.savefig(f, format="png")``), then put
    it at ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        writer(f)


def append_line(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` and fsync it (a line cut by a kill is dropped by readers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
