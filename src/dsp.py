"""Mel filterbank, STFT, inverse STFT and Griffin-Lim in numpy, numerically equal to librosa's.

Generation needs these on every call (the Griffin-Lim vocoder and the mel front end's basis). librosa's
own versions pull in numba and its JIT-compiled helpers on first use, which costs several seconds on a
fresh install; these do the same arithmetic with numpy alone. ``tests/test_dsp.py`` checks them against
librosa (``librosa.filters.mel``, ``librosa.stft``, ``librosa.istft``, ``librosa.griffinlim``).

Conventions (librosa's defaults): a periodic Hann window of ``win_length`` samples centred in ``n_fft``;
``center=True`` frames with ``n_fft // 2`` zeros padded at both ends; the inverse divides the
overlap-added frames by the overlap-added squared window wherever that sum is not tiny.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["griffin_lim", "istft", "mel_filterbank", "stft"]

# the Slaney mel scale (librosa's htk=False): linear below 1 kHz, logarithmic above
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    high = hz >= _MIN_LOG_HZ
    return np.where(high, _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    high = mel >= _MIN_LOG_MEL
    return np.where(high, _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL)), hz)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """``(n_mels, 1 + n_fft // 2)`` float32 triangular filters on the Slaney mel scale, area-normalised
    (``librosa.filters.mel`` with its defaults: ``htk=False``, ``norm="slaney"``)."""
    if fmax is None:
        fmax = sample_rate / 2.0
    if not 0.0 <= fmin < fmax:
        raise ValueError(f"fmin, fmax: expected 0 <= fmin < fmax, got {fmin}, {fmax}")
    fft_hz = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


@lru_cache(maxsize=16)
def _window(win_length: int, n_fft: int) -> np.ndarray:
    """The periodic Hann window centred in ``n_fft`` (read-only: cached, as Griffin-Lim asks for it twice
    per iteration)."""
    if not 0 < win_length <= n_fft:
        raise ValueError(f"win_length: expected 1..n_fft ({n_fft}), got {win_length}")
    n = np.arange(win_length)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)  # periodic ("fftbins")
    left = (n_fft - win_length) // 2
    window = np.pad(hann, (left, n_fft - win_length - left))
    window.flags.writeable = False
    return window


@lru_cache(maxsize=16)
def _window_sum(win_length: int, n_fft: int, hop_length: int, n_frames: int, size: int, dtype: np.dtype) -> np.ndarray:
    """The overlap-added squared window over ``n_frames`` frames, trimmed like the signal (read-only)."""
    square = (_window(win_length, n_fft) ** 2).astype(dtype)
    total = n_fft + hop_length * (n_frames - 1)
    norm = np.zeros(total, dtype=dtype)
    for i in range(n_frames):
        norm[i * hop_length:i * hop_length + n_fft] += square
    norm = _fit(norm[n_fft // 2:], size)
    norm.flags.writeable = False
    return norm


def stft(y: np.ndarray, n_fft: int, hop_length: int, win_length: int | None = None) -> np.ndarray:
    """``(samples,)`` -> ``(1 + n_fft // 2, frames)`` complex spectrum (centred, zero-padded frames)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y: expected a 1-D waveform, got shape {y.shape}")
    window = _window(win_length or n_fft, n_fft)
    padded = np.pad(y, n_fft // 2)
    if padded.shape[0] < n_fft:
        raise ValueError(f"y: {y.shape[0]} samples is too short for n_fft={n_fft}")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    return np.fft.rfft(frames * window, axis=-1).T


def istft(spectrum: np.ndarray, n_fft: int, hop_length: int, win_length: int | None = None,
          length: int | None = None) -> np.ndarray:
    """Inverse of :func:`stft` by windowed overlap-add, ``length`` samples long if given."""
    spectrum = np.asarray(spectrum)
    if spectrum.ndim != 2 or spectrum.shape[0] != 1 + n_fft // 2:
        raise ValueError(f"spectrum: expected (1 + n_fft // 2 = {1 + n_fft // 2}, frames), got {spectrum.shape}")
    win_length = win_length or n_fft
    window = _window(win_length, n_fft)
    n_frames = spectrum.shape[-1]
    if length:
        n_frames = min(n_frames, int(np.ceil((length + 2 * (n_fft // 2)) / hop_length)))
    frames = np.fft.irfft(spectrum[:, :n_frames], n=n_fft, axis=0).T * window  # (frames, n_fft)
    total = n_fft + hop_length * (n_frames - 1)
    signal = np.zeros(total, dtype=frames.dtype)
    for i in range(n_frames):
        signal[i * hop_length:i * hop_length + n_fft] += frames[i]
    start = n_fft // 2
    size = length if length else total - 2 * start
    signal = _fit(signal[start:], size)
    norm = _window_sum(win_length, n_fft, hop_length, n_frames, size, signal.dtype)
    ok = norm > np.finfo(norm.dtype).tiny
    signal[ok] /= norm[ok]
    return signal


def _fit(x: np.ndarray, size: int) -> np.ndarray:
    return x[:size].copy() if x.shape[0] >= size else np.pad(x, (0, size - x.shape[0]))


def griffin_lim(magnitude: np.ndarray, n_iter: int, n_fft: int, hop_length: int, win_length: int | None = None,
                length: int | None = None, momentum: float = 0.99, seed: int = 0) -> np.ndarray:
    """Waveform whose STFT magnitude approximates ``magnitude`` (``(1 + n_fft // 2, frames)``).

    The fast Griffin-Lim of Perraudin et al. (2013): each iteration re-estimates the phase from the STFT
    of the current waveform, extrapolated by ``momentum`` from the previous estimate. The initial phase
    is uniform random from ``numpy.random.RandomState(seed)``, as in ``librosa.griffinlim(...,
    random_state=seed)``.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter: expected a positive int, got {n_iter}")
    if momentum < 0:
        raise ValueError(f"momentum: expected >= 0, got {momentum}")
    magnitude = np.asarray(magnitude)
    if magnitude.ndim != 2 or magnitude.shape[0] != 1 + n_fft // 2:
        raise ValueError(f"magnitude: expected (1 + n_fft // 2 = {1 + n_fft // 2}, frames), got {magnitude.shape}")
    magnitude = magnitude.astype(np.result_type(magnitude.dtype, np.float32), copy=False)  # ints: float64
    rng = np.random.RandomState(seed)
    phase = np.exp(1j * 2 * np.pi * rng.random_sample(size=magnitude.shape))
    estimate = magnitude * phase
    eps = np.finfo(magnitude.dtype).tiny
    previous = None
    for _ in range(n_iter):
        rebuilt = stft(istft(estimate, n_fft, hop_length, win_length, length), n_fft, hop_length, win_length)
        estimate = rebuilt if previous is None else rebuilt - (momentum / (1 + momentum)) * previous
        estimate = magnitude * estimate / (np.abs(estimate) + eps)
        previous = rebuilt
    return istft(estimate, n_fft, hop_length, win_length, length)


_hz_to_mel, _mel_to_hz = hz_to_mel, mel_to_hz  # the earlier private names
