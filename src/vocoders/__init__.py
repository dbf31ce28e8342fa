"""Vocoders: mel spectrogram -> waveform."""

from .griffin_lim import GriffinLimVocoder
from .hifigan import HiFiGANVocoder
from .none import NoVocoder

__all__ = ["GriffinLimVocoder", "HiFiGANVocoder", "NoVocoder"]
