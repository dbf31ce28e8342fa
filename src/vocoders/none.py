"""No vocoder: the codec already decodes to a waveform (Stable Audio's Oobleck VAE)."""

from __future__ import annotations

from typing import Any

import torch

from ..interfaces import Vocoder
from ..registry import register

__all__ = ["NoVocoder"]


@register("vocoder", "none")
class NoVocoder(Vocoder):
    """Passes the codec's waveform ``(batch, samples)`` or ``(batch, channels, samples)`` through, as
    float."""

    def __init__(self, sample_rate: int = 44100, weights: bool = True, device: Any = None, dtype: Any = None):
        # weights/device/dtype: the build arguments shared by all parts; there are no weights
        super().__init__()
        if not (isinstance(sample_rate, int) and not isinstance(sample_rate, bool) and sample_rate > 0):
            raise ValueError(f"sample_rate: expected a positive int, got {sample_rate!r}")
        self.sample_rate = sample_rate

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        waveform = torch.as_tensor(waveform)
        if waveform.ndim not in (2, 3):
            raise ValueError(
                f"waveform: expected (batch, samples) or (batch, channels, samples), "
                f"got {tuple(waveform.shape)}"
            )
        return (
            waveform if waveform.is_floating_point() and waveform.dtype == torch.float32 else waveform.float()
        )
