"""What every diffusers-UNet music denoiser shares: its decoder layers, prediction type and input channels."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import UNet2DConditionModel

from ..interfaces import LayerInfo, MusicDenoiser
from ..synapse.install import decoder_layers, layer_info

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

    def _setup(self, layers: Sequence[str] | None, prediction_type: str) -> None:
        self.layer_names = list(layers) if layers is not None else decoder_layers(self.unet)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type = prediction_type

    @property
    def layers(self) -> list[LayerInfo]:
        return [layer_info(self.unet, name, self.attention) for name in self.layer_names]

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels
