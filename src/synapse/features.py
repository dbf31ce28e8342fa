"""The image feature cache: captured keys/values per timestep and layer."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["FeatureCache"]

KV = tuple[torch.Tensor, torch.Tensor]


class FeatureCache:
    """``timestep -> {layer name -> (keys, values)}``, each ``(batch, heads, tokens, head_dim)``.

    :meth:`at` returns the features of the nearest stored timestep, so a
    trajectory captured on a coarser grid can serve every sampling step.
    """

    def __init__(self):
        self._steps: dict[int, dict[str, KV]] = {}

    def add(self, timestep: int | torch.Tensor, features: dict[str, KV]) -> None:
        self._steps[int(timestep)] = dict(features)

    @property
    def timesteps(self) -> list[int]:
        return sorted(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[int]:
        return iter(self.timesteps)

    def at(self, timestep: int | torch.Tensor) -> dict[str, KV]:
        if not self._steps:
            raise LookupError("FeatureCache is empty")
        t = int(timestep)
        if t in self._steps:
            return self._steps[t]
        nearest = min(self._steps, key=lambda s: (abs(s - t), s))
        return self._steps[nearest]

    def map(self, fn) -> FeatureCache:
        """A new cache with ``fn(layer, keys, values) -> (keys, values)`` applied everywhere."""
        out = FeatureCache()
        for t, layers in self._steps.items():
            out.add(t, {name: fn(name, k, v) for name, (k, v) in layers.items()})
        return out

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for layers in self._steps.values()
                   for kv in layers.values() for x in kv)

    def __repr__(self) -> str:
        return f"FeatureCache(timesteps={len(self)}, layers={len(next(iter(self._steps.values()), {}))})"
