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

__all__ = ["AUDIO_EXTENSIONS", "RESAMPLER", "list_audio_files", "overlapping_files", "load_audio", "file_sha256"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".aiff", ".aif", ".opus")


def list_audio_files(directory: str | os.PathLike, name: str = "directory", recursive: bool = True,
                     exclude: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """The audio files (by extension) under ``directory``, sorted; a ``ValueError`` naming it if there are none.

    Folders in ``exclude`` (and everything under them) are left out wherever they sit in the tree, so a
    reference folder nested inside the generated one is never counted as generated. Symbolic links to
    folders are not followed (as ``Path.rglob``); links to files are listed.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{name}: {str(root)!r} is not a directory")
    skip = set()
    for folder in exclude:
        if folder is not None and Path(folder).is_dir():
            st = os.stat(folder)
            skip.add((st.st_dev, st.st_ino))
    files = []
    for top, dirs, names in os.walk(root):
        if recursive:
            dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(top, d))
                             and _inode(os.path.join(top, d)) not in skip)
        else:
            dirs[:] = []
        files.extend(Path(top) / n for n in names if Path(n).suffix.lower() in AUDIO_EXTENSIONS
                     and os.path.isfile(os.path.join(top, n)))
    files.sort()
    if not files:
        raise ValueError(f"{name}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {str(root)!r}")
    return files


def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def overlapping_files(a: Iterable[Path], b: Iterable[Path]) -> list[Path]:
    """The files of ``a`` that are also in ``b`` (the same file: a link, or the same path twice)."""
    inodes = {key for key in map(_inode, b) if key is not None}
    return [p for p in a if _inode(p) in inodes]


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` (the training data's reader: one decoder for both).

    A ``ValueError`` names the file when it is missing, a folder, empty, zero-length, truncated (its header
    declares more frames than it holds), corrupt, non-finite, has an implausible sample rate, or is longer
    than :data:`melfusion.datasets.audio.MAX_SECONDS` or this machine's memory allows.
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
