"""Vocoders: mel spectrogram -> waveform."""

from .griffin_lim import GriffinLimVocoder
from .hifigan import HiFiGANVocoder

__all__ = ["GriffinLimVocoder", "HiFiGANVocoder"]
