"""An on-disk cache of audio embeddings, one ``.npy`` file per (embedder, weights, file content, settings).

The key is a sha256 over the embedder's identity (its name, settings and a
hash of its weights), the output name, the resampling settings and the
sha256 of the audio file's bytes, so renaming or moving a file keeps its
entry and changing weights, settings or content never reuses a stale one.
Entries are written atomically (a temporary file in the same folder, then
``os.replace``) and read with ``np.load(allow_pickle=False)``; an entry that
cannot be read is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..checks import NonFiniteError
from ..files import atomic_path

__all__ = ["CACHE_ENV", "default_cache_dir", "cache_key", "EmbeddingCache"]

CACHE_ENV = "MELFUSION_CACHE"


def default_cache_dir() -> Path:
    """``$MELFUSION_CACHE`` if set, else ``~/.cache/melfusion/embeddings``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "melfusion" / "embeddings"


def cache_key(*parts: str) -> str:
    """sha256 hex digest of the parts, joined unambiguously."""
    h = hashlib.sha256()
    for part in parts:
        data = str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class EmbeddingCache:
    """``get(key)`` / ``put(key, array)`` on a folder of ``.npy`` files (two-level fan-out by key prefix)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            value = np.load(path, allow_pickle=False)
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or not np.isfinite(value).all():
                raise ValueError("not a finite float array")
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)  # corrupt or truncated: recompute
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: np.ndarray) -> None:
        """Store a finite float array under ``key`` (a ``ValueError`` for anything else: it would never be read
        back); a cache folder that cannot be written only warns."""
        value = np.asarray(value)
        if value.dtype.kind != "f" or not np.isfinite(value).all():
            raise NonFiniteError(f"embedding cache: refusing to store {key[:12]}...: not a finite float array")
        path = self.path(key)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(value), allow_pickle=False)
        except OSError as exc:  # a read-only or full cache must not stop an evaluation
            import warnings

            warnings.warn(f"embedding cache: could not write {str(path)!r} ({exc})", RuntimeWarning, stacklevel=2)
