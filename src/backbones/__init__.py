"""Backbones: image feature sources, music denoisers, text encoders and latent codecs."""

from .audioldm import AudioLDMDenoiser, ClapTextEncoder
from .codecs import AudioLDMVAECodec, IdentityCodec
from .stable_audio import OobleckCodec, StableAudioDenoiser
from .stable_diffusion import StableDiffusionFeatureSource
from .tango import TangoDenoiser
from .text import MiniLMTextEncoder, T5TextEncoder
from .trajectories import InversionTrajectory, NoiseTrajectory, ReverseTrajectory, Trajectory

__all__ = ["StableDiffusionFeatureSource", "TangoDenoiser", "T5TextEncoder", "IdentityCodec", "AudioLDMVAECodec",
           "AudioLDMDenoiser", "ClapTextEncoder", "MiniLMTextEncoder", "Trajectory",
           "ReverseTrajectory", "InversionTrajectory", "NoiseTrajectory", "StableAudioDenoiser",
           "OobleckCodec"]
