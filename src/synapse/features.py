"""The image feature cache: captured keys/values per timestep and layer."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator

import torch

__all__ = ["FeatureCache", "FeatureStore", "tensor_digest"]

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


def tensor_digest(x: torch.Tensor) -> str:
    """A content hash of a tensor (shape, dtype and values), for cache keys."""
    x = x.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """A small LRU of :class:`FeatureCache` objects, keyed by image content and the settings that shape them.

    ``MelFusion`` keeps one (``model.feature_cache``): a repeated image with
    the same sampling timesteps, trajectory, resolution and text length skips
    the image UNet entirely. ``max_items=0`` disables it. ``hits`` and
    ``misses`` count lookups.
    """

    def __init__(self, max_items: int = 8, max_bytes: int | None = 2 * 1024**3):
        if max_items < 0:
            raise ValueError(f"max_items: expected an int >= 0, got {max_items}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, FeatureCache] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> FeatureCache | None:
        cache = self._items.get(key)
        if cache is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return cache

    def put(self, key: Hashable, cache: FeatureCache) -> None:
        if self.max_items == 0:
            return
        self._items[key] = cache
        self._items.move_to_end(key)
        while len(self._items) > self.max_items or (
            self.max_bytes is not None and len(self._items) > 1 and self.nbytes() > self.max_bytes
        ):
            self._items.popitem(last=False)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self._items.values())

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __repr__(self) -> str:
        return (f"FeatureStore(items={len(self)}/{self.max_items}, {self.nbytes() / 2**20:.1f} MiB, "
                f"hits={self.hits}, misses={self.misses})")
