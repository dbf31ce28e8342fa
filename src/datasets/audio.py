"""Audio files to float32 mono waveforms at a chosen rate; cheap file checks; cropping and padding."""

from __future__ import annotations

import warnings
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

__all__ = ["load_audio", "fit_length", "crop_start", "check_audio"]

HEAD_FRAMES = 16_384  # frames decoded by check_audio to prove a file really decodes
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # only these can hold NaN or inf; PCM samples are always finite
_BLOCK = 1 << 18
RESAMPLER = "soxr_hq"  # librosa.resample res_type, for training data and evaluation alike


def _librosa_read(path: Path, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Fallback decoder for files soundfile cannot open: ``(channels, samples)`` float32 and the rate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns "PySoundFile failed. Trying audioread instead."
        y, sr = librosa.load(path, sr=None, mono=False, duration=duration)
    return np.atleast_2d(np.asarray(y, dtype=np.float32)), int(sr)


def check_audio(path: str | Path) -> str | None:
    """None if ``path`` looks like usable audio, else what is wrong ("is empty (0 bytes)", ...).

    Reads the header (soundfile.info), decodes the first frames, and scans float files for NaN/inf;
    formats soundfile cannot open go through librosa, decoding at most one second.
    """
    path = Path(path)
    if not path.is_file():
        return "does not exist"
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError) as sf_exc:
        try:
            y, _ = _librosa_read(path, duration=1.0)
        except Exception as exc:  # any decoder failure (audioread's NoBackendError, ...) means "unreadable"
            return f"cannot be decoded ({_first_line(sf_exc)}; librosa: {type(exc).__name__})"
        if y.size == 0:
            return "has no samples (zero-length)"
        return None if np.isfinite(y).all() else "has non-finite samples (NaN or inf)"
    if info.frames == 0:
        return "has no samples (zero-length)"
    try:
        with sf.SoundFile(path) as fh:
            head = fh.read(min(info.frames, HEAD_FRAMES), dtype="float32", always_2d=True)
            if head.shape[0] == 0:
                return f"is truncated (the header says {info.frames} frames, none decode)"
            if not np.isfinite(head).all():
                return "has non-finite samples (NaN or inf)"
            if info.subtype in FLOAT_SUBTYPES:
                for block in fh.blocks(_BLOCK, dtype="float32", always_2d=True):
                    if not np.isfinite(block).all():
                        return "has non-finite samples (NaN or inf)"
    except (sf.SoundFileError, RuntimeError) as exc:
        return f"cannot be decoded ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    """A short reason: libsndfile's own words without the "Error opening '<path>': " prefix."""
    text = str(getattr(exc, "error_string", None) or exc).strip().rstrip(".")
    return text.splitlines()[0] if text else type(exc).__name__


def load_audio(path: str | Path, sample_rate: int, *, name: str = "audio") -> np.ndarray:
    """``(samples,)`` float32 mono at ``sample_rate`` from any rate, channel count or subtype.

    Channels are averaged; rates are converted with librosa.resample (soxr_hq). Unreadable, empty,
    zero-length or non-finite audio raises ValueError naming ``name`` and the file.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate: expected a positive integer, got {sample_rate!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: no such file {str(path)!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"{name}: file {str(path)!r} is empty (0 bytes)")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # (frames, channels)
        wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    except (sf.SoundFileError, RuntimeError) as sf_exc:
        try:
            y, rate = _librosa_read(path)
        except Exception as exc:  # any decoder failure means "unreadable"
            raise ValueError(f"{name}: cannot decode {str(path)!r} as audio "
                             f"({_first_line(sf_exc)}; librosa: {type(exc).__name__})") from None
        wave = y.mean(axis=0)
    if wave.size == 0:
        raise ValueError(f"{name}: {str(path)!r} has no samples (zero-length audio)")
    if not np.isfinite(wave).all():
        raise ValueError(f"{name}: {str(path)!r} has non-finite samples (NaN or inf)")
    if rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=rate, target_sr=int(sample_rate), res_type=RESAMPLER)
    return np.ascontiguousarray(wave, dtype=np.float32)


def crop_start(num_samples: int, length: int, rng: np.random.Generator | None = None) -> int:
    """Where a ``length`` window starts in ``num_samples``: uniform in [0, num_samples - length] with ``rng``,
    else 0; 0 whenever the clip is not longer than the window."""
    if num_samples <= length or rng is None:
        return 0
    return int(rng.integers(0, num_samples - length, endpoint=True))


def fit_length(wave: np.ndarray, length: int, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """``wave`` (1-D) cut or zero-padded (at the end) to exactly ``length`` samples, as a new array.

    Longer clips are cropped at a uniform random start drawn from ``rng``, or at the start without one.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave: expected a 1-D array (samples,), got shape {wave.shape}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected a non-negative integer, got {length!r}")
    out = np.zeros(int(length), dtype=wave.dtype)
    start = crop_start(wave.shape[0], int(length), rng)
    piece = wave[start:start + int(length)]
    out[: piece.shape[0]] = piece
    return out
