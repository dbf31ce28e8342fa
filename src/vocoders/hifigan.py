"""HiFi-GAN as in AudioLDM (``SpeechT5HifiGan``, ``vocoder/`` of ``cvssp/audioldm-s-full-v2``): 16 kHz, 64 mels."""

from __future__ import annotations

from typing import Any

import torch

from ..interfaces import Vocoder
from ..registry import register

__all__ = ["HiFiGANVocoder"]


@register("vocoder", "hifigan")
class HiFiGANVocoder(Vocoder):
    """``pretrained``: a diffusers pipeline folder or hub id (``vocoder/`` of ``cvssp/audioldm-s-full-v2``), or a
    Tango repository or folder holding ``pytorch_model_vae.bin``, whose ``vocoder.`` tensors are the HiFi-GAN
    Tango decodes with (give ``subfolder=None``), or that file itself."""

    def __init__(self, pretrained: str | None = None, config: dict | str | None = None,
                 subfolder: str | None = "vocoder", weights: bool = True, device: Any = None, dtype: Any = None):
        from ..backbones.loading import load_audioldm_vocoder

        super().__init__()
        spec = {"pretrained": pretrained, "config": config, "subfolder": subfolder if pretrained else None}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.model = load_audioldm_vocoder(spec, "vocoder", weights=weights, device=device,
                                           dtype=dtype).requires_grad_(False)
        self.mark_published("model", spec, weights)
        self.sample_rate = int(self.model.config.sampling_rate)

    @torch.no_grad()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim == 4:
            mel = mel[:, 0]
        param = next(self.model.parameters())
        return self.model(mel.to(param.device, param.dtype)).float()
