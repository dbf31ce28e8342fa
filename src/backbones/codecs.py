"""Latent codecs: identity (mel is the latent) and the AudioLDM VAE."""

from __future__ import annotations

from typing import Any

import torch

from ..interfaces import LatentCodec
from ..registry import register

__all__ = ["MelCodec", "IdentityCodec", "AudioLDMVAECodec"]


class MelCodec(LatentCodec):
    """Base of the codecs whose latent is a (downsampled) mel image ``(C, frames / f, mels / f)``."""

    output = "mel"

    def latent_shape(self, seconds: float, sample_rate: int, hop_length: int, n_mels: int) -> tuple[int, ...]:
        mel_frames = -(-int(round(seconds * sample_rate)) // hop_length)
        return (int(self.latent_channels), -(-mel_frames // self.downsample), n_mels // self.downsample)


@register("codec", "identity")
class IdentityCodec(MelCodec):
    """The mel spectrogram ``(batch, 1, frames, mels)`` is the latent, optionally standardised.

    ``latent = (mel - shift) / scale``. Log-mel values sit far from zero (around -6 for quiet music), and a
    diffusion model trained on data with a large mean cannot correct the mean when sampling starts from
    zero-mean noise (the schedule's terminal signal is not zero), so a model trained from scratch on mels
    should set ``shift``/``scale`` to its data's mean and spread (the ``mini`` preset: -6 and 2).
    """

    latent_channels = 1
    downsample = 1

    def __init__(self, shift: float = 0.0, scale: float = 1.0, weights: bool = True, device: Any = None,
                 dtype: Any = None):
        super().__init__()  # no weights: the build arguments shared by all parts are accepted and unused
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale: expected a positive number, got {scale!r}")
        self.shift = float(shift)
        self.scale = float(scale)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        if self.shift == 0.0 and self.scale == 1.0:
            return mel
        return (mel - self.shift) / self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.shift == 0.0 and self.scale == 1.0:
            return latents
        return latents * self.scale + self.shift


@register("codec", "audioldm_vae")
class AudioLDMVAECodec(MelCodec):
    """AudioLDM's ``AutoencoderKL``: 8 latent channels, /4.

    ``pretrained`` is a diffusers pipeline folder or hub id (``vae/`` of ``cvssp/audioldm-s-full-v2``), or a
    Tango repository or folder holding ``pytorch_model_vae.bin`` (the VAE Tango was trained on; give
    ``subfolder=None`` and ``config="tango_vae"``), or that file itself.
    """

    def __init__(self, pretrained: str | None = None, config: str | dict | None = None,
                 subfolder: str | None = "vae", weights: bool = True, device: Any = None, dtype: Any = None):
        super().__init__()
        from .loading import load_audioldm_vae

        spec = {"pretrained": pretrained, "config": config, "subfolder": subfolder if pretrained else None}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.vae = load_audioldm_vae(spec, "codec", weights=weights, device=device,
                                     dtype=dtype).requires_grad_(False)
        self.mark_published("vae", spec, weights)
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(mel).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample
