"""A user-defined mixer, registered from outside the melfusion package (see docs/extending.md)."""

import torch
from torch import nn

from melfusion.registry import register
from melfusion.synapse import BaseMixer, straight_through_clamp


@register("mixer", "temperature_convex")
class TemperatureConvexMixer(BaseMixer):
    """One weight per layer, ``a_l = sigmoid(w_l / temperature)``: smooth, never exactly 0 or 1."""

    def __init__(self, num_layers, num_heads=None, head_dim=None, temperature: float = 1.0, **unused):
        super().__init__(num_layers, num_heads, head_dim)
        if temperature <= 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature}")
        self.temperature = temperature
        self.logit = nn.Parameter(torch.zeros(num_layers))

    def weight(self, layer, music, image, timestep):
        return straight_through_clamp(torch.sigmoid(self.logit[layer] / self.temperature))

    def raw_alphas(self):
        return torch.sigmoid(self.logit / self.temperature)
