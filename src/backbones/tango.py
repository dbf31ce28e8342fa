"""Tango-style music denoiser: a diffusers ``UNet2DConditionModel`` with cross-attention on text tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..registry import register
from ..schedules import NoiseSchedule
from .base import UNetDenoiser
from .loading import load_tango_unet

__all__ = ["TangoDenoiser"]


@register("denoiser", "tango")
class TangoDenoiser(UNetDenoiser):
    """Wraps the music UNet; ``latents`` are ``(batch, C, frames, mel_bins)``.

    The synapse is installed on ``layers`` (default: the decoder transformer
    layers), on their cross-attention (``attn2``).

    ``unet`` is a model spec (see :mod:`melfusion.backbones.loading`); its
    ``pretrained`` may be a diffusers UNet (folder or hub id, with
    ``subfolder``) or one of Tango's released checkpoints
    (``declare-lab/tango*``: ``pytorch_model_main.bin``, whose architecture
    then comes from ``config``, e.g. ``"tango_unet"``). Tango's models were
    trained with Stable Diffusion 2.1's noise schedule, which predicts ``v``.
    """

    attention = "attn2"

    def __init__(
        self,
        unet: Mapping[str, Any],
        layers: Sequence[str] | None = None,
        prediction_type: str = "epsilon",
        beta_schedule: str = "scaled_linear",
        weights: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.unet: UNet2DConditionModel = load_tango_unet(
            unet, "denoiser.unet", weights=weights, device=device, dtype=dtype
        )
        self.mark_published("unet", unet, weights)
        self._setup(layers, prediction_type)
        self.beta_schedule = beta_schedule

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """Stable Diffusion's schedule (betas 0.00085 to 0.012), which Tango was trained with."""
        return NoiseSchedule.ddpm(self.prediction_type, beta_schedule=self.beta_schedule)

    def forward(self, latents, timestep, text, text_mask=None, timing=None):
        return self.unet(latents, timestep, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
