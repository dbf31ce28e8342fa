"""The abstract parts a MelFusion model is composed of.

Every concrete part subclasses one of these and registers itself in the registry
of its kind (``melfusion.registry``). The pipeline talks to parts only through
these interfaces, so any part can be swapped for another of the same kind.

Tensor shapes are written in the docstrings; attention tensors are always
``(batch, heads, tokens, head_dim)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .synapse.features import FeatureCache


@dataclass(frozen=True)
class LayerInfo:
    """What the synapse needs to know about one attention layer.

    ``tokens`` is the key/value token count the layer sees (``None`` where it
    depends on the input, as for cross-attention over text); ``grid`` the
    ``(height, width)`` token grid for spatial self-attention, else ``None``.
    """

    name: str
    heads: int
    head_dim: int
    tokens: int | None = None
    grid: tuple[int, int] | None = None

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


class FeatureSource(abc.ABC):
    """A frozen image LDM that supplies per-timestep attention keys and values."""

    @property
    @abc.abstractmethod
    def layers(self) -> list[LayerInfo]:
        """The tapped layers, in order: names, heads, head size, token grid."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` images in [0, 1] -> ``(batch, C, h, w)`` latents."""

    @abc.abstractmethod
    def trajectory(self, latents: torch.Tensor, timesteps: torch.Tensor) -> FeatureCache:
        """DDIM-invert ``latents`` over ``timesteps``, capturing K/V per timestep and layer."""


class SynapseMixer(nn.Module, abc.ABC):
    """Mixes image keys/values into music keys/values, one learned weight set per layer."""

    @abc.abstractmethod
    def forward(
        self,
        layer: int,
        music: torch.Tensor,
        image: torch.Tensor,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Both inputs ``(batch, heads, tokens, head_dim)``; returns the same shape."""

    @abc.abstractmethod
    def alphas(self) -> torch.Tensor:
        """The current mixing weights (detached), one row per layer."""


class MusicDenoiser(nn.Module, abc.ABC):
    """A text-conditioned music LDM (wraps a diffusers ``UNet2DConditionModel``)."""

    @property
    @abc.abstractmethod
    def layers(self) -> list[LayerInfo]:
        """The decoder attention layers the synapse may be installed on."""

    @abc.abstractmethod
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        synapse_context: Any = None,
    ) -> torch.Tensor:
        """Predict noise (or v) for ``latents`` ``(batch, C, T, F)`` at ``timestep``."""


class LatentCodec(nn.Module, abc.ABC):
    """Maps mel spectrograms to diffusion latents and back."""

    latent_channels: int = 1

    @abc.abstractmethod
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, frames, mels)`` -> ``(batch, C, frames / f, mels / f)``."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`."""


class Vocoder(abc.ABC):
    """Mel spectrogram -> waveform."""

    sample_rate: int

    @abc.abstractmethod
    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, mels)`` log-mel -> ``(batch, samples)`` float waveform."""


class TextEncoder(abc.ABC):
    """Texts -> token embeddings for cross-attention."""

    dim: int

    @abc.abstractmethod
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ``(embeddings (batch, tokens, dim), mask (batch, tokens) bool)``."""
