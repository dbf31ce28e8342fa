"""Audio files to float32 mono waveforms at a chosen rate; cheap file checks; cropping and padding.

Every file is checked before it is decoded: its header (``soundfile.info``) must declare a plausible sample
rate (:data:`MIN_SAMPLE_RATE` to :data:`MAX_SAMPLE_RATE`), channel count and length, a WAV/AIFF/W64/RF64
header must not promise more sample data than the file holds (a truncated file, which libsndfile would
otherwise read silently short), and the decoded size must fit in memory and in ``max_seconds``. A file that
fails to decode part way, or decodes fewer frames than its header declares, is reported as truncated or
corrupt. Every problem is one ``ValueError`` line naming the file.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from ..checks import check_size

__all__ = ["load_audio", "fit_length", "crop_start", "check_audio", "file_problem", "max_audio_seconds",
           "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MAX_CHANNELS", "MAX_SECONDS"]

HEAD_FRAMES = 16_384  # frames decoded by check_audio at each end to prove a file really decodes
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # only these can hold NaN or inf; PCM samples are always finite
_BLOCK = 1 << 18
RESAMPLER = "soxr_hq"  # librosa.resample res_type, for training data and evaluation alike
MIN_SAMPLE_RATE = 1_000  # Hz; a header outside [MIN, MAX] is corrupt (or not audio a model can use)
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 256
MAX_SECONDS = 4 * 3600.0  # the longest file load_audio decodes unless told otherwise
_ESTIMATED_LENGTH = ("MPEG",)  # formats whose header frame count is an estimate (VBR mp3): no short-read check


def max_audio_seconds(crop_seconds: float) -> float:
    """The longest file a loader that keeps a ``crop_seconds`` window decodes: 100 crops, at least an hour."""
    return max(3600.0, 100.0 * float(crop_seconds))


def _librosa_read(path: Path, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Fallback decoder for files soundfile cannot open: ``(channels, samples)`` float32 and the rate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns "PySoundFile failed. Trying audioread instead."
        y, sr = librosa.load(path, sr=None, mono=False, duration=duration)
    return np.atleast_2d(np.asarray(y, dtype=np.float32)), int(sr)


def _first_line(exc: BaseException) -> str:
    """A short reason: libsndfile's own words without the "Error opening '<path>': " prefix."""
    text = str(getattr(exc, "error_string", None) or exc).strip().rstrip(".")
    return text.splitlines()[0].strip() if text else type(exc).__name__


def file_problem(path: str | Path, what: str = "audio file") -> str | None:
    """Why ``path`` is not a readable non-empty file ("does not exist", "is a folder, not an audio file",
    "is empty (0 bytes)", ...), or None; never raises (a name too long or holding a NUL is a reason)."""
    path = Path(path)
    try:
        if not path.exists():
            return "does not exist"
        if path.is_dir():
            return f"is a folder, not an {what}" if what[0] in "aeiou" else f"is a folder, not a {what}"
        if not path.is_file():
            return "is not a regular file"
        if path.stat().st_size == 0:
            return "is empty (0 bytes)"
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a permission problem
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return None


# -- headers that promise more than the file holds --------------------------------------------------------
_RIFF_KINDS = {b"RIFF": "little", b"RIFX": "big", b"RF64": "little", b"BW64": "little"}
_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_MAX_CHUNKS = 4096
_EMPTY_FILE_BYTES = 4096  # a header and no samples; a bigger file that decodes nothing is broken


def _declared_shortfall(path: Path) -> tuple[int, int] | None:
    """``(declared, present)`` bytes of sample data when a WAV/AIFF/W64/RF64 header declares more than the
    file holds (libsndfile then reads the file silently short); None when it does not, or cannot tell."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(40)
            if head[:16] == _W64_RIFF:
                return _w64_shortfall(f, size)
            if len(head) < 12:
                return None
            kind, form = head[:4], head[8:12]
            if kind in _RIFF_KINDS and form == b"WAVE":
                order, data_id = _RIFF_KINDS[kind], b"data"
            elif kind == b"FORM" and form in (b"AIFF", b"AIFC"):
                order, data_id = "big", b"SSND"
            else:
                return None
            ds64 = None
            pos = 12
            for _ in range(_MAX_CHUNKS):
                f.seek(pos)
                header = f.read(8)
                if len(header) < 8:
                    return None
                chunk, length = header[:4], int.from_bytes(header[4:], order)
                if chunk == b"ds64":
                    payload = f.read(16)
                    ds64 = int.from_bytes(payload[8:16], "little") if len(payload) == 16 else None
                if chunk == data_id:
                    if length == 0xFFFFFFFF and kind in (b"RF64", b"BW64"):
                        length = ds64
                    if not length or length == 0xFFFFFFFF:  # a streamed file: its length is "to the end"
                        return None
                    present = size - (pos + 8)
                    return (length, present) if length > present else None
                pos += 8 + length + (length & 1)
                if pos >= size:
                    return None
    except OSError:
        return None
    return None


def _w64_shortfall(f, size: int) -> tuple[int, int] | None:
    pos = 40
    for _ in range(_MAX_CHUNKS):
        f.seek(pos)
        header = f.read(24)
        if len(header) < 24:
            return None
        length = int.from_bytes(header[16:24], "little")  # includes the 24-byte chunk header
        if header[:4] == b"data":
            declared, present = length - 24, size - (pos + 24)
            return (declared, present) if declared > present else None
        if length < 24:
            return None
        pos += (length + 7) // 8 * 8
    return None


def _header_problem(path: Path, info, max_seconds: float | None) -> str | None:
    """What is wrong with a file soundfile can open, read from its header alone, or None."""
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        return (f"declares a sample rate of {info.samplerate} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz "
                "(a corrupt header?)")
    if not 1 <= info.channels <= MAX_CHANNELS:
        return f"declares {info.channels} channels, outside 1..{MAX_CHANNELS} (a corrupt header?)"
    shortfall = _declared_shortfall(path)
    if shortfall is not None:
        declared, present = shortfall
        return (f"is truncated: its header declares {declared} bytes of sample data, the file holds {present} "
                f"({info.frames} frames decode)")
    if info.frames <= 0:
        size = path.stat().st_size
        return "has no samples (zero-length)" if size <= _EMPTY_FILE_BYTES else \
            f"has no samples (zero-length) in {size} bytes: truncated or corrupt"
    seconds = info.frames / info.samplerate
    if max_seconds is not None and seconds > max_seconds:
        return f"is {seconds:.1f} s long, over the {max_seconds:g} s limit for this use"
    return None


def check_audio(path: str | Path, *, max_seconds: float | None = None) -> str | None:
    """None if ``path`` looks like usable audio, else what is wrong ("is empty (0 bytes)", ...).

    Reads the header (soundfile.info: rate, channels, a truncated WAV/AIFF), decodes the first and the last
    frames (a truncated FLAC or Ogg stops there), and scans float files whole for NaN/inf; formats
    soundfile cannot open go through librosa, decoding at most one second. ``max_seconds`` also refuses
    longer files (see :func:`max_audio_seconds`).
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        return problem
    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError) as sf_exc:
        try:
            y, rate = _librosa_read(path, duration=1.0)
        except Exception as exc:  # any decoder failure (audioread's NoBackendError, ...) means "unreadable"
            return f"cannot be decoded ({_first_line(sf_exc)}; librosa: {type(exc).__name__})"
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            return f"decodes at {rate} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz (a corrupt header?)"
        if y.size == 0:
            return "has no samples (zero-length)"
        return None if np.isfinite(y).all() else "has non-finite samples (NaN or inf)"
    problem = _header_problem(path, info, max_seconds)
    if problem:
        return problem
    try:
        return _decode_check(path, info)
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        return f"cannot be decoded (truncated or corrupt: {_first_line(exc)})"


def _decode_check(path: Path, info) -> str | None:
    with sf.SoundFile(path) as fh:
        head = fh.read(min(info.frames, HEAD_FRAMES), dtype="float32", always_2d=True)
        if head.shape[0] == 0:
            return f"is truncated (the header says {info.frames} frames, none decode)"
        if not np.isfinite(head).all():
            return "has non-finite samples (NaN or inf)"
        if info.subtype in FLOAT_SUBTYPES:
            decoded = head.shape[0]
            for block in fh.blocks(_BLOCK, dtype="float32", always_2d=True):
                decoded += block.shape[0]
                if not np.isfinite(block).all():
                    return "has non-finite samples (NaN or inf)"
            tail_end = decoded
        elif info.frames > HEAD_FRAMES and fh.seekable() and info.format not in _ESTIMATED_LENGTH:
            start = max(HEAD_FRAMES, info.frames - HEAD_FRAMES)
            fh.seek(start)
            tail = fh.read(info.frames - start, dtype="float32", always_2d=True)
            if not np.isfinite(tail).all():
                return "has non-finite samples (NaN or inf)"
            tail_end = start + tail.shape[0]
        else:
            tail_end = info.frames if info.frames > HEAD_FRAMES else head.shape[0]
        if tail_end < info.frames and info.format not in _ESTIMATED_LENGTH:
            return f"is truncated (the header says {info.frames} frames, only {tail_end} decode)"
    return None


def load_audio(path: str | Path, sample_rate: int, *, name: str = "audio",
               max_seconds: float | None = MAX_SECONDS) -> np.ndarray:
    """``(samples,)`` float32 mono at ``sample_rate`` from any rate, channel count or subtype.

    Channels are averaged; rates are converted with librosa.resample (soxr_hq). A ``ValueError`` naming
    ``name`` and the file is raised, before anything is decoded where the header tells, for a missing,
    empty, zero-length, truncated or corrupt file, a header with an implausible rate or channel count, a
    file longer than ``max_seconds`` (default :data:`MAX_SECONDS`; None: no limit but memory) or too big
    for this machine's memory, and non-finite samples.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or not 1 <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate: expected a positive integer up to {MAX_SAMPLE_RATE}, got {sample_rate!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0
                                        and math.isfinite(max_seconds)):
        raise ValueError(f"max_seconds: expected a positive number of seconds or None, got {max_seconds!r}")
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise ValueError(f"{name}: {str(path)!r} {problem}" if problem != "does not exist"
                         else f"{name}: no such file {str(path)!r}")
    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError) as sf_exc:
        wave, rate = _load_fallback(path, name, sf_exc, max_seconds)
    else:
        problem = _header_problem(path, info, max_seconds)
        if problem:
            raise ValueError(f"{name}: {str(path)!r} {problem}")
        wave, rate = _decode(path, info, name, sample_rate), info.samplerate
    if wave.size == 0:
        raise ValueError(f"{name}: {str(path)!r} has no samples (zero-length audio)")
    if not np.isfinite(wave).all():
        raise ValueError(f"{name}: {str(path)!r} has non-finite samples (NaN or inf)")
    if rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=rate, target_sr=int(sample_rate), res_type=RESAMPLER)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _decode(path: Path, info, name: str, sample_rate: int) -> np.ndarray:
    """The file's channel mean, decoded block by block (memory: the mono result, checked first)."""
    frames = int(info.frames)
    out_samples = math.ceil(frames * sample_rate / info.samplerate)
    check_size(4 * (frames + out_samples) + 4 * _BLOCK * info.channels, name,
               f"decoding {str(path)!r} ({frames} frames x {info.channels} channels)")
    wave = np.empty(frames, dtype=np.float32)
    done = 0
    try:
        with sf.SoundFile(path) as fh, np.errstate(invalid="ignore", over="ignore"):  # NaN is caught after
            while done < frames:
                block = fh.read(min(_BLOCK, frames - done), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                wave[done:done + block.shape[0]] = block.mean(axis=1, dtype=np.float64) if block.shape[1] > 1 else block[:, 0]
                done += block.shape[0]
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise ValueError(f"{name}: {str(path)!r} is truncated or corrupt: decoding failed after {done} of "
                         f"{frames} frames ({_first_line(exc)})") from None
    if done < frames:
        if info.format not in _ESTIMATED_LENGTH:
            raise ValueError(f"{name}: {str(path)!r} is truncated: its header declares {frames} frames, only "
                             f"{done} decode")
        wave = wave[:done]
    return wave


def _load_fallback(path: Path, name: str, sf_exc: BaseException, max_seconds: float | None):
    """librosa for what soundfile cannot open (m4a, aac, ...), decoding at most ``max_seconds`` + 1 s."""
    try:
        y, rate = _librosa_read(path, duration=None if max_seconds is None else max_seconds + 1.0)
    except Exception as exc:  # any decoder failure means "unreadable"
        raise ValueError(f"{name}: cannot decode {str(path)!r} as audio "
                         f"({_first_line(sf_exc)}; librosa: {type(exc).__name__})") from None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{name}: {str(path)!r} decodes at {rate} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz "
                         "(a corrupt header?)")
    if max_seconds is not None and y.shape[-1] > max_seconds * rate:
        raise ValueError(f"{name}: {str(path)!r} is longer than the {max_seconds:g} s limit for this use")
    return y.mean(axis=0), rate


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
