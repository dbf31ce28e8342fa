"""What every diffusers-UNet music denoiser shares: its decoder layers, latent shape, prediction type, saving."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..interfaces import LayerInfo, MusicDenoiser
from ..synapse.install import decoder_layers, install_hook, layer_info

__all__ = ["UNetDenoiser", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


class UNetDenoiser(MusicDenoiser):
    """Base of the denoisers that wrap a ``UNet2DConditionModel`` (``self.unet``).

    Subclasses build the UNet, then call :meth:`_setup`; the synapse is
    installed on ``layer_names`` (default: the decoder transformer layers),
    on their ``attention`` (``attn2``).
    """

    attention = "attn2"
    unet: UNet2DConditionModel
    #: the sub-folder save_weights writes (a diffusers UNet folder, loadable by diffusers alone)
    weight_folders = ("unet",)

    def _setup(self, layers: Sequence[str] | None, prediction_type: str) -> None:
        self.layer_names = list(layers) if layers is not None else decoder_layers(self.unet)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type = prediction_type

    @property
    def layers(self) -> list[LayerInfo]:
        names = self.layer_names
        depth = {name: i / max(1, len(names) - 1) for i, name in enumerate(names)}
        return [_with_depth(layer_info(self.unet, name, self.attention), depth[name]) for name in names]

    def probe_layers(self, names: Sequence[str], latent_shape: Sequence[int]) -> list[LayerInfo]:
        from ..synapse.wiring import probe_layers

        infos = probe_layers(self.unet, list(names), self.attention, tuple(latent_shape))
        depth = {info.name: info.depth for info in self.layers}
        return [_with_depth(info, depth.get(info.name)) for info in infos]

    def install_synapse(self, hook, layers: Sequence[str]):
        return install_hook(self.unet, hook, list(layers), self.attention)

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def downsampling(self) -> int:
        """How many times the UNet halves its input: the time axis must be a multiple of ``2 ** levels``."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def latent_shape(self, codec_shape: Sequence[int], round_up: bool = True) -> tuple[int, ...]:
        channels, frames, bins = (int(n) for n in codec_shape)
        m = self.downsampling
        frames = -(-frames // m) * m if round_up else frames - frames % m
        if frames <= 0:
            raise ValueError("seconds: the clip is too short for this model")
        return channels, frames, bins

    def activation_bytes(self, latent_shape: Sequence[int], rows: int) -> int:
        # the widest UNet level's activations: about 16 tensors of the latent grid at the first level's width
        cells = 1
        for n in latent_shape[1:]:
            cells *= int(n)
        return rows * cells * int(self.unet.config.block_out_channels[0]) * 4 * 16

    def stored_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def save_weights(self, folder) -> str:
        self.unet.save_pretrained(Path(folder) / "unet", safe_serialization=True)
        return "unet"

    def load_weights(self, folder) -> None:
        from .loading import load_diffusers_folder

        load_diffusers_folder(self.unet, Path(folder) / "unet", "model")


def _with_depth(info: LayerInfo, depth: float | None) -> LayerInfo:
    from dataclasses import replace

    return replace(info, depth=depth)
