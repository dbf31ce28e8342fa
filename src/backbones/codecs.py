"""Latent codecs: identity (mel is the latent) and the AudioLDM VAE."""

from __future__ import annotations

from typing import Any

import torch

from ..interfaces import LatentCodec
from ..registry import register

__all__ = ["IdentityCodec", "AudioLDMVAECodec"]


@register("codec", "identity")
class IdentityCodec(LatentCodec):
    """The mel spectrogram ``(batch, 1, frames, mels)`` is the latent."""

    latent_channels = 1
    downsample = 1

    def __init__(self, weights: bool = True, device: Any = None, dtype: Any = None):
        super().__init__()  # no weights: the build arguments shared by all parts are accepted and unused

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return mel

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


@register("codec", "audioldm_vae")
class AudioLDMVAECodec(LatentCodec):
    """AudioLDM's ``AutoencoderKL`` (``vae/`` of ``cvssp/audioldm-s-full-v2``): 8 latent channels, /4."""

    def __init__(self, pretrained: str | None = None, config: str | dict | None = None,
                 subfolder: str = "vae", weights: bool = True, device: Any = None, dtype: Any = None):
        super().__init__()
        from diffusers import AutoencoderKL

        from .loading import build_model

        spec = {"pretrained": pretrained, "config": config, "subfolder": subfolder if pretrained else None}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.vae = build_model(AutoencoderKL, spec, "codec", weights=weights, device=device,
                               dtype=dtype).requires_grad_(False)
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(mel).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample
