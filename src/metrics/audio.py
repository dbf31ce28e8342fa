"""Finding, reading and resampling the audio files to evaluate.

Files are read with soundfile (wav, flac, ogg, ...) and, for what it cannot
read (mp3, m4a, ...), with ``librosa.load``; channels are averaged to mono
and the samples resampled with ``librosa.resample`` (soxr, high quality) to
the rate each embedder was trained at. The resampler is part of the
embedding cache key: a different resampler gives (slightly) different
embeddings.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..datasets.audio import RESAMPLER

__all__ = ["AUDIO_EXTENSIONS", "RESAMPLER", "list_audio_files", "load_audio", "file_sha256"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".aiff", ".aif", ".opus")


def list_audio_files(directory: str | os.PathLike, name: str = "directory", recursive: bool = True) -> list[Path]:
    """The audio files (by extension) under ``directory``, sorted; a ``ValueError`` naming it if there are none."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{name}: {str(root)!r} is not a directory")
    pattern = root.rglob("*") if recursive else root.glob("*")
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise ValueError(f"{name}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {str(root)!r}")
    return files


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` (the training data's reader: one decoder for both).

    A ``ValueError`` names the file when it is missing, empty, zero-length,
    non-finite or cannot be decoded.
    """
    from ..datasets.audio import load_audio as _load

    return _load(path, int(sample_rate), name="audio file")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Paths as ``Path`` objects; a ``ValueError`` naming those that are missing."""
    out = [Path(p) for p in paths]
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise ValueError(f"audio files not found: {', '.join(missing[:10])}"
                         + (f" ... ({len(missing)} in all)" if len(missing) > 10 else ""))
    return out
