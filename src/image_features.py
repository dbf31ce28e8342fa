"""The image side of generation: image features along the image trajectory, aligned to the music layers once
and remembered per image (``MelFusion.feature_cache``), so every step, guidance branch and sample reuses them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .synapse.features import FeatureCache, tensor_digest

__all__ = ["image_features", "music_tokens", "feature_key"]


def music_tokens(model: Any, text_tokens: int, latent_axes: Sequence[int] | None = None
                 ) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Key count and token grid of each paired music layer for a music latent with ``latent_axes``.

    Layers that cross-attend to text have ``text_tokens`` keys; layers that attend over the music tokens
    (AudioLDM) have a grid that scales with the latent, probed at the config's clip length and rescaled here.
    """
    probe = model.probe_shape()[1:]  # where build_synapse probed the grids
    text_tokens = model.denoiser.context_tokens(text_tokens)
    axes = tuple(latent_axes) if latent_axes is not None else probe
    tokens: list[int] = []
    grids: list[tuple[int, int] | None] = []
    for pair in model.synapse.pairs:
        grid = pair.music.grid
        if pair.music.tokens is None or grid is None or len(axes) != 2:
            tokens.append(text_tokens)
            grids.append(None)
            continue
        factor = (max(1, round(probe[0] / grid[0])), max(1, round(probe[1] / grid[1])))
        hw = (-(-axes[0] // factor[0]), -(-axes[1] // factor[1]))
        tokens.append(hw[0] * hw[1])
        grids.append(hw)
    return tokens, grids


def feature_key(model: Any, images: torch.Tensor, timesteps: tuple[int, ...], tokens: tuple, mode: str) -> tuple:
    """What shapes a cached feature set: the image content, the image timesteps, the music token counts, the
    trajectory mode, the feature source and the synapse (with the state of its learned aligners)."""
    # learned aligners change in place while training: a digest of their values is part of the key
    state = tuple(tensor_digest(p.detach()) for p in model.synapse.aligners.parameters())
    return (tensor_digest(images), timesteps, tokens, mode, model.feature_source.cache_key(), id(model.synapse),
            state)


def image_features(model: Any, images: torch.Tensor, timesteps: torch.Tensor | Sequence[int], text_tokens: int,
                   mode: str | None = None, latent_axes: Sequence[int] | None = None) -> FeatureCache:
    """Image features for image ``timesteps``, aligned to the music layers (``text_tokens`` keys where they
    attend text). See :meth:`MelFusion.image_features`."""
    mode = mode or model.config.synapse.image_trajectory
    ts = tuple(sorted({int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()}))
    tokens, grids = music_tokens(model, int(text_tokens), latent_axes)
    key = feature_key(model, images, ts, (tuple(tokens), tuple(grids)), mode)
    cached = model.feature_cache.get(key)
    if cached is not None:
        return cached

    def align(t: int, records: dict) -> dict:
        step = FeatureCache()
        step.add(t, records)
        return model.synapse.align(step, tokens, grids).at(t)

    with torch.no_grad():
        latents = model.feature_source.encode(images)
        cache = model.feature_source.trajectory(latents, ts, mode=mode, transform=align)
    model.feature_cache.put(key, cache)
    return cache
