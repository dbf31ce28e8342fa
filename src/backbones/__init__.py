"""Backbones: image feature sources, music denoisers, text encoders and latent codecs."""

from .audioldm import AudioLDMDenoiser, ClapTextEncoder
from .codecs import AudioLDMVAECodec, IdentityCodec
from .stable_diffusion import StableDiffusionFeatureSource
from .tango import TangoDenoiser
from .text import MiniLMTextEncoder, T5TextEncoder

__all__ = ["StableDiffusionFeatureSource", "TangoDenoiser", "T5TextEncoder", "IdentityCodec", "AudioLDMVAECodec",
           "AudioLDMDenoiser", "ClapTextEncoder", "MiniLMTextEncoder"]
