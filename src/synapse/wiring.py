"""Pairing image layers with music layers, probing token counts, and the ``Synapse`` module.

:class:`Synapse` owns everything the visual synapse learns (the mixer and one
aligner per layer pair); it is what training optimises and what
``save_pretrained`` writes beside the music UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..interfaces import LayerInfo
from ..registry import registry
from .features import FeatureCache
from .install import capture, layer_info

__all__ = ["probe_layers", "LayerPair", "Synapse"]


def probe_layers(unet: nn.Module, names: Sequence[str], which: str, sample_shape: Sequence[int],
                 context_tokens: int = 77) -> list[LayerInfo]:
    """Layer infos with token counts and grids, from one forward pass of a meta-device copy of ``unet``.

    ``sample_shape`` is ``(channels, height, width)`` of the UNet input. No
    memory is used and no weights are read.
    """
    with torch.device("meta"):
        ghost = type(unet).from_config(unet.config)
    handle = capture(ghost, names, which=which)
    shapes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name in names:
        module = dict(ghost.named_modules())[name]

        def hook(mod, args, kwargs, _name=name):
            x = args[0] if args else kwargs["hidden_states"]
            if x.ndim == 4:
                shapes[_name] = (x.shape[2], x.shape[3])

        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        x = torch.empty(1, *sample_shape, device="meta")
        ctx = torch.empty(1, context_tokens, ghost.config.cross_attention_dim or 1, device="meta")
        kwargs: dict[str, Any] = {}
        if getattr(ghost.config, "class_embed_type", None) == "simple_projection":
            kwargs["class_labels"] = torch.empty(1, ghost.config.projection_class_embeddings_input_dim, device="meta")
        with torch.no_grad():
            ghost(x, torch.tensor(1, device="meta"), encoder_hidden_states=ctx, **kwargs)
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    out = []
    for name in names:
        keys = handle.records[name][0]
        info = layer_info(unet, name, which)
        grid = shapes.get(name) if which == "attn1" else None
        out.append(replace(info, tokens=int(keys.shape[2]) if which == "attn1" else None, grid=grid))
    return out


@dataclass(frozen=True)
class LayerPair:
    image: LayerInfo
    music: LayerInfo


class Synapse(nn.Module):
    """The mixer plus one aligner per (image layer, music layer) pair."""

    def __init__(self, image_layers: Sequence[LayerInfo], music_layers: Sequence[LayerInfo],
                 mixer: str | nn.Module = "convex", aligner: str = "pool",
                 mixer_params: dict[str, Any] | None = None, aligner_params: dict[str, Any] | None = None):
        super().__init__()
        if len(image_layers) != len(music_layers):
            raise ValueError(
                f"layers: {len(image_layers)} image layers cannot pair one to one with {len(music_layers)} music layers"
            )
        if not image_layers:
            raise ValueError("layers: the synapse needs at least one layer pair")
        self.pairs = [LayerPair(i, m) for i, m in zip(image_layers, music_layers, strict=True)]
        heads = [m.heads for m in music_layers]
        head_dims = {m.head_dim for m in music_layers}
        if isinstance(mixer, str):
            mixer = registry("mixer").build(
                mixer, num_layers=len(self.pairs), num_heads=heads,
                head_dim=head_dims.pop() if len(head_dims) == 1 else None, **(mixer_params or {}),
            )
        self.mixer = mixer
        self.aligner_name = aligner
        self.aligners = nn.ModuleList(
            registry("aligner").build(
                aligner, in_heads=p.image.heads, in_head_dim=p.image.head_dim, out_heads=p.music.heads,
                out_head_dim=p.music.head_dim, in_grid=p.image.grid, **(aligner_params or {}),
            )
            for p in self.pairs
        )

    @property
    def music_layer_names(self) -> list[str]:
        return [p.music.name for p in self.pairs]

    def align(self, cache: FeatureCache, tokens: int | Sequence[int | None],
              grids: Sequence[tuple[int, int] | None] | None = None) -> FeatureCache:
        """Image features keyed by image layer -> aligned features keyed by music layer.

        ``tokens`` is the music key count per pair (one int for all: the text length).
        """
        if isinstance(tokens, int):
            tokens = [tokens] * len(self.pairs)
        grids = list(grids) if grids is not None else [None] * len(self.pairs)
        index = {p.image.name: i for i, p in enumerate(self.pairs)}
        out = FeatureCache()
        for t in cache.timesteps:
            step = cache.at(t)
            aligned = {}
            for name, (k, v) in step.items():
                if name not in index:
                    continue
                i = index[name]
                align = self.aligners[i]
                aligned[self.pairs[i].music.name] = (align(k, tokens[i], grids[i]), align(v, tokens[i], grids[i]))
            out.add(t, aligned)
        return out

    def wiring(self, music_tokens: str | int = "s (text)") -> list[dict[str, Any]]:
        """One row per pair: layers, heads, head size, token counts, aligner, parameters added."""
        rows = []
        for i, p in enumerate(self.pairs):
            rows.append({
                "pair": i,
                "image_layer": p.image.name,
                "music_layer": p.music.name,
                "heads": p.music.heads if p.music.heads == p.image.heads else f"{p.image.heads}->{p.music.heads}",
                "head_dim": p.music.head_dim if p.music.head_dim == p.image.head_dim
                else f"{p.image.head_dim}->{p.music.head_dim}",
                "image_tokens": p.image.tokens,
                "music_tokens": p.music.tokens if p.music.tokens is not None else music_tokens,
                "aligner": self.aligner_name,
                "params": _layer_params(self.mixer, i) + sum(q.numel() for q in self.aligners[i].parameters()),
            })
        return rows


def _layer_params(mixer: nn.Module, layer: int) -> int:
    """Parameters of ``mixer`` that belong to one layer (rows of per-layer tensors)."""
    total = 0
    num_layers = getattr(mixer, "num_layers", None)
    for p in mixer.parameters():
        if num_layers and p.shape and p.shape[0] == num_layers:
            total += p[layer].numel()
    return total
