"""Writing files so that a reader never sees half of one: write beside it, then rename onto it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder; moved onto ``path`` when the block ends, removed if it fails.

    ``os.replace`` is atomic on one filesystem: readers see the old file or
    the new one, and an interrupted write leaves the old file in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write text or bytes to ``path`` atomically (see :func:`atomic_path`); ``fsync`` flushes to disk first."""
    with atomic_path(path) as tmp, open(tmp, "w" if isinstance(data, str) else "wb",
                                        **({"encoding": "utf-8"} if isinstance(data, str) else {})) as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
