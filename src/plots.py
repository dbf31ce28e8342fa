"""Small image outputs without a plotting dependency: a mel spectrogram as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["spectrogram_png"]

# a perceptually ordered dark-blue -> yellow ramp (anchor colours, linearly interpolated)
_ANCHORS = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float64)


def _colour(values: np.ndarray) -> np.ndarray:
    pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return ((1 - frac) * _ANCHORS[lo] + frac * _ANCHORS[lo + 1]).astype(np.uint8)


def spectrogram_png(mel: np.ndarray, path: str | Path, scale: int = 4, *, overwrite: bool = True) -> Path:
    """``(frames, mels)`` log-mel -> PNG, time on x, low mel bins at the bottom."""
    mel = np.asarray(mel, dtype=np.float64)
    if mel.ndim != 2:
        raise ValueError(f"mel: expected (frames, mels), got shape {mel.shape}")
    lo, hi = np.nanpercentile(mel, 1), np.nanpercentile(mel, 99)
    norm = (mel - lo) / (hi - lo if hi > lo else 1.0)
    rgb = _colour(norm.T[::-1])
    im = Image.fromarray(rgb).resize((rgb.shape[1] * max(1, scale // 2), rgb.shape[0] * scale), Image.NEAREST)
    import io

    from .files import write_atomic

    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue(), overwrite=overwrite)
