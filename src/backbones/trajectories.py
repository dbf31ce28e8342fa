"""Image trajectory modes: how the image latent travels through the image LDM's timesteps while its features
are captured. One small object per mode, registered under the kind ``trajectory``; a new mode is one class::

    @register("trajectory", "my_mode")
    class MyMode(Trajectory):
        def run(self, source, latents, timesteps, on_step): ...

A mode drives an image source that offers DDIM primitives (Stable Diffusion's does): ``invert(latents, ts,
on_step)``, ``sample(latents, ts, on_step)``, ``add_noise(latents, t, noise)`` and ``evaluate(latents, t)``;
``on_step(t)`` must be called right after the image model's evaluation at each of ``timesteps``, which is
when the features of ``t`` are captured. Training uses the same names (``TrainConfig.image_features``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..registry import register

__all__ = ["Trajectory", "ReverseTrajectory", "InversionTrajectory", "NoiseTrajectory"]


class Trajectory:
    """Base of the modes: ``run`` captures features at each timestep; ``evaluations`` counts image-model calls."""

    def __init__(self, **unused: Any):
        pass

    def evaluations(self, steps: int) -> int:
        return steps

    def run(self, source: Any, latents: torch.Tensor, timesteps: Sequence[int], on_step: Callable[[int], None]
            ) -> None:
        raise NotImplementedError


@register("trajectory", "reverse")
class ReverseTrajectory(Trajectory):
    """The paper: DDIM-invert the clean latent to the largest timestep, then capture along the deterministic
    reverse pass from there (two image-model calls per timestep)."""

    def evaluations(self, steps: int) -> int:
        return 2 * steps

    def run(self, source, latents, timesteps, on_step):
        source.sample(source.invert(latents, timesteps), timesteps, on_step=on_step)


@register("trajectory", "inversion")
class InversionTrajectory(Trajectory):
    """Capture during the DDIM inversion itself (one call per timestep)."""

    def run(self, source, latents, timesteps, on_step):
        source.invert(latents, timesteps, on_step=on_step)


@register("trajectory", "noise")
class NoiseTrajectory(Trajectory):
    """Forward-noise the clean latent to each timestep with one fixed noise draw (seed ``seed``) and capture
    there (no inversion; the released code's inference feeds random latents)."""

    def __init__(self, seed: int = 0, **unused: Any):
        self.seed = int(seed)

    def run(self, source, latents, timesteps, on_step):
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float64).to(latents.device)
        for t in timesteps:
            x = source.add_noise(latents, torch.full((latents.shape[0],), int(t), dtype=torch.long), noise)
            source.evaluate(x, int(t))
            on_step(int(t))
