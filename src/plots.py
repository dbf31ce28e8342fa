"""Figures the library writes: a mel spectrogram as a PNG (time in seconds, frequency in Hz on a mel axis, a dB
colour bar, the prompt as the title).

matplotlib is imported on first use, so ``import melfusion`` stays light; the figures are plain
``matplotlib.figure.Figure`` objects rendered by Agg, never registered with pyplot (a notebook's backend is
left alone and there is nothing to close). The y axis is the Slaney mel
scale of :func:`melfusion.dsp.mel_filterbank` (librosa's default): mel band ``i`` of ``n`` is drawn centred on
its filter's centre frequency, ``n + 2`` points equally spaced in mel from ``fmin`` to ``fmax`` taking the
``i + 1``-th, and the ticks are labelled in Hz. Frame ``k`` is centred on ``k * hop_length / sample_rate``
seconds (the front end's STFT is centred).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dsp import hz_to_mel, mel_to_hz

__all__ = ["spectrogram_png", "spectrogram_figure", "draw_mel", "to_db", "mel_band_hz", "mel_tick_hz", "short_title"]

#: how the values of a mel spectrogram relate to its level: the factor that turns them into dB
#: (``ln_amplitude``: natural log of a magnitude, ``20 / ln 10``; ``ln_power``: natural log of a power,
#: ``10 / ln 10``; ``db``: already dB)
DB_PER_UNIT = {"ln_amplitude": 20.0 / math.log(10.0), "ln_power": 10.0 / math.log(10.0), "db": 1.0}
#: the frequencies the y axis may be labelled at, Hz
TICK_CANDIDATES_HZ = (0, 100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000)
#: the colour scale spans this many dB below the loudest cell (quieter cells share the darkest colour)
TOP_DB = 80.0
#: prompts longer than this many characters are cut at a word boundary in the title
TITLE_CHARS = 70


def to_db(mel: np.ndarray, values: str = "ln_amplitude") -> tuple[np.ndarray, str]:
    """``(level in dB, colour bar label)`` of a log-mel; ``values`` says what the numbers are (see
    :data:`DB_PER_UNIT`). The reference is 1.0 of the mel filterbank's output (magnitude or power)."""
    if values not in DB_PER_UNIT:
        raise ValueError(f"values: expected one of {', '.join(DB_PER_UNIT)}, got {values!r}")
    db = np.asarray(mel, dtype=np.float64) * DB_PER_UNIT[values]
    what = {"ln_amplitude": "mel magnitude", "ln_power": "mel power", "db": "mel level"}[values]
    return db, f"level, dB (re 1.0 {what})"


def mel_band_hz(n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """The centre frequency (Hz) of each of ``n_mels`` mel bands from ``fmin`` to ``fmax``: where each triangle of
    :func:`melfusion.dsp.mel_filterbank` peaks (``librosa.mel_frequencies(n_mels + 2, fmin, fmax)[1:-1]``)."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), int(n_mels) + 2)[1:-1])


def mel_tick_hz(fmin: float, fmax: float, min_gap: float = 0.06) -> list[float]:
    """The frequencies (Hz) to label on a mel axis from ``fmin`` to ``fmax``: round values in range, each at
    least ``min_gap`` of the axis above the one before (the lower one is kept)."""
    lo, hi = float(hz_to_mel(fmin)), float(hz_to_mel(fmax))
    ticks: list[float] = []
    last = -math.inf
    for hz in TICK_CANDIDATES_HZ:
        if not fmin - 1e-9 <= hz <= fmax + 1e-9:
            continue
        pos = float(hz_to_mel(hz))
        if (pos - last) >= min_gap * (hi - lo):
            ticks.append(float(hz))
            last = pos
    return ticks


def short_title(prompt: str | None, limit: int = TITLE_CHARS) -> str:
    """The figure title for ``prompt``: quoted, cut at a word boundary (with an ellipsis) past ``limit``
    characters, on one line."""
    if prompt is None:
        return "mel spectrogram"
    text = " ".join(str(prompt).split())
    if not text:
        return "mel spectrogram (no text prompt)"
    if len(text) > limit:
        cut = text[: limit - 1]
        space = cut.rfind(" ")
        text = (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:.-") + "\u2026"
    return f"mel spectrogram: \u201c{text}\u201d"


def _check_number(value: Any, name: str, *, low: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return value


def draw_mel(ax: Any, mel: np.ndarray, *, sample_rate: float | None = None, hop_length: int | None = None,
             fmin: float = 0.0, fmax: float | None = None, values: str = "ln_amplitude", top_db: float = TOP_DB,
             cmap: str = "magma", max_columns: int | None = None) -> tuple[Any, str]:
    """Draw a ``(frames, mels)`` log-mel on ``ax``; return ``(the image, its colour bar label)``.

    With ``sample_rate`` and ``hop_length`` the x axis is seconds (else frames); with ``sample_rate`` or ``fmax``
    the y axis is frequency on the mel scale, labelled in Hz (``fmax`` defaults to ``sample_rate / 2``; else
    mel bands). The colours are dB (:func:`to_db`), the loudest cell down to ``top_db`` below it. More frames
    than ``max_columns`` (the pixels the axes will get) are max-pooled in runs of neighbours first, so a short
    loud note is never dropped by the nearest-neighbour drawing.
    """
    from matplotlib.image import NonUniformImage

    mel = np.asarray(mel, dtype=np.float64)
    if mel.ndim != 2 or 0 in mel.shape:
        raise ValueError(f"mel: expected (frames, mels), got shape {mel.shape}")
    frames, bands = mel.shape
    db, label = to_db(mel, values)
    finite = db[np.isfinite(db)]
    vmax = float(finite.max()) if finite.size else 0.0
    vmin = max(float(finite.min()) if finite.size else vmax, vmax - _check_number(top_db, "top_db"))

    if sample_rate is not None and hop_length is not None:
        step = _check_number(hop_length, "hop_length") / _check_number(sample_rate, "sample_rate")
        x_lim = (0.0, (frames - 0.5) * step) if frames > 1 else (-0.5 * step, 0.5 * step)
        ax.set_xlabel("time (s)")
    else:
        step = 1.0
        x_lim = (-0.5, frames - 0.5)
        ax.set_xlabel("frame")
    x = np.arange(frames) * step
    if max_columns is not None and frames > max(int(max_columns), 1):
        group = -(-frames // max(int(max_columns), 1))
        pad = -frames % group
        padded = np.concatenate([db, np.full((pad, bands), np.nan)]) if pad else db
        with np.errstate(invalid="ignore"):
            db = np.nanmax(padded.reshape(-1, group, bands), axis=1)
        x = (np.arange(len(db)) * group + (group - 1) / 2) * step  # each run's middle
        x[-1] = min(x[-1], (frames - 1) * step)
        frames = len(db)
    if fmax is None and sample_rate is not None:
        fmax = _check_number(sample_rate, "sample_rate") / 2.0
    if fmax is not None:
        fmin = _check_number(fmin, "fmin", strict=False)
        fmax = _check_number(fmax, "fmax")
        if fmin >= fmax:
            raise ValueError(f"fmin, fmax: expected fmin < fmax, got {fmin:g}, {fmax:g}")
        lo, hi = float(hz_to_mel(fmin)), float(hz_to_mel(fmax))
        y = hz_to_mel(mel_band_hz(bands, fmin, fmax))  # each band's filter centre, in mel
        y_lim = (lo, hi)
        ticks = mel_tick_hz(fmin, fmax)
        ax.set_yticks(hz_to_mel(ticks))
        ax.set_yticklabels([f"{t:.0f}" for t in ticks])
        ax.set_ylabel("frequency (Hz, mel scale)")
    else:
        y = np.arange(bands, dtype=np.float64)
        y_lim = (-0.5, bands - 0.5)
        ax.set_ylabel("mel band")
    # a nearest-neighbour image on uneven centres: each cell reaches halfway to its neighbours, the outer ones
    # to the axis limits (one frame or band alone is a plain block)
    if frames == 1:
        x = np.array([x_lim[0], x_lim[1]])
        db = np.repeat(db, 2, axis=0)
    if bands == 1:
        y = np.array([y_lim[0], y_lim[1]])
        db = np.repeat(db, 2, axis=1)
    image = NonUniformImage(ax, interpolation="nearest", cmap=cmap, extent=(*x_lim, *y_lim))
    image.set_data(x, y, db.T)
    image.set_clim(vmin, vmax if vmax > vmin else vmin + 1.0)
    ax.add_image(image)
    ax.set_xlim(*x_lim)
    ax.set_ylim(*y_lim)
    return image, label


def spectrogram_figure(mel: np.ndarray, *, sample_rate: float | None = None, hop_length: int | None = None,
                       n_mels: int | None = None, fmin: float = 0.0, fmax: float | None = None,
                       values: str = "ln_amplitude", title: str | None = None,
                       sections: Sequence[tuple[float, float]] = (), top_db: float = TOP_DB,
                       dpi: float = 100.0) -> Any:
    """The matplotlib ``Figure`` :func:`spectrogram_png` saves (a plain ``matplotlib.figure.Figure``, not
    registered with pyplot: nothing to close, and the user's backend is left alone; ``savefig`` renders it
    with Agg).

    ``title`` is the prompt (see :func:`short_title`); ``sections`` the ``(start, end)`` seconds of a
    storyboard's or long piece's sections, whose inner boundaries are drawn as faint dashed lines (on a time
    axis in seconds only). ``n_mels``, when given, must be ``mel.shape[1]``. ``dpi``: the resolution it will be
    saved at (more frames than pixels are max-pooled: :func:`draw_mel`).
    """
    from matplotlib.figure import Figure

    mel = np.asarray(mel, dtype=np.float64)
    if mel.ndim != 2:
        raise ValueError(f"mel: expected (frames, mels), got shape {mel.shape}")
    if n_mels is not None and n_mels != mel.shape[1]:
        raise ValueError(f"n_mels: the mel has {mel.shape[1]} bands, not {n_mels}")
    seconds = None
    if sample_rate is not None and hop_length is not None:
        seconds = mel.shape[0] * _check_number(hop_length, "hop_length") / _check_number(sample_rate, "sample_rate")
    width = float(np.clip(6.0 + 0.4 * (seconds or 0.0), 8.0, 16.0))  # longer pieces get a wider figure
    fig = Figure(figsize=(width, 3.6), dpi=_check_number(dpi, "dpi"))
    ax = fig.subplots()
    image, label = draw_mel(ax, mel, sample_rate=sample_rate, hop_length=hop_length, fmin=fmin, fmax=fmax,
                            values=values, top_db=top_db, max_columns=int(width * fig.dpi))
    if seconds is not None:
        for start, _ in list(sections)[1:]:
            ax.axvline(float(start), color="white", alpha=0.6, linestyle="--", linewidth=1.0)
    ax.set_title(short_title(title), fontsize=10)
    fig.colorbar(image, ax=ax, label=label, pad=0.015, fraction=0.05)
    fig.tight_layout()
    return fig


def spectrogram_png(mel: np.ndarray, path: str | Path, scale: int = 4, *, overwrite: bool = True,
                    sample_rate: float | None = None, hop_length: int | None = None, n_mels: int | None = None,
                    fmin: float = 0.0, fmax: float | None = None, values: str = "ln_amplitude",
                    title: str | None = None, sections: Sequence[tuple[float, float]] = ()) -> Path:
    """``(frames, mels)`` log-mel -> a PNG figure at ``path``: time on x, frequency (Hz, mel scale) on y, low
    bands at the bottom, a dB colour bar and the prompt as the title (see :func:`spectrogram_figure` for the
    keywords; without ``sample_rate``/``hop_length``/``fmax`` the axes are frames and mel bands).

    ``scale`` sets the resolution (25 dpi per unit: 4 is 100 dpi). The figure is rendered in memory and written
    beside ``path``, then renamed onto it; an existing file is refused unless ``overwrite``.
    """
    from .files import write_atomic

    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or not 1 <= scale <= 16:
        raise ValueError(f"scale: expected an int from 1 to 16, got {scale!r}")
    fig = spectrogram_figure(mel, sample_rate=sample_rate, hop_length=hop_length, n_mels=n_mels, fmin=fmin,
                             fmax=fmax, values=values, title=title, sections=sections, dpi=25 * int(scale))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)  # Agg, whatever pyplot's backend is
    return write_atomic(path, buffer.getvalue(), overwrite=overwrite)
