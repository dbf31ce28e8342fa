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
from .aligners import apply_aligner
from .features import FeatureCache
from .injection import split_view
from .install import capture, layer_info, resolve_attention

__all__ = ["probe_layers", "LayerPair", "Synapse", "pair_layers", "PAIRINGS", "nearest_depth"]


def probe_layers(unet: nn.Module, names: Sequence[str], which: str, sample_shape: Sequence[int],
                 context_tokens: int = 77, text_context: bool | None = None) -> list[LayerInfo]:
    """Layer infos with token counts and grids, from one forward pass of a meta-device copy of ``unet``.

    ``sample_shape`` is ``(channels, height, width)`` of the UNet input. No
    memory is used and no weights are read.

    ``text_context``: whether the UNet is run with encoder states
    (``context_tokens`` of them). By default it is, where the config has one
    ``cross_attention_dim``; a list of per-block widths (or none), as in
    AudioLDM, means the UNet runs with ``encoder_hidden_states=None``.
    ``simple_projection`` class embeddings get a class label input.

    A layer whose attention attends over the image/music tokens themselves
    (``attn1``, or an ``attn2`` that got no encoder states, as in AudioLDM)
    gets its key count as ``tokens`` and its spatial ``grid``; a true
    cross-attention layer gets ``None`` for both (its key count is the text's).
    An ``:output`` view (:mod:`melfusion.synapse.injection`) gets its query
    token count and grid; a ``:context`` view gets ``None`` for both, and must
    name an attention that is given a text context.
    """
    with torch.device("meta"):
        ghost = type(unet).from_config(unet.config)
    handle = capture(ghost, names, which=which)
    modules = dict(ghost.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    self_attending: dict[str, bool] = {}
    hooks = []
    for name in names:
        full, attn = resolve_attention(ghost, name, which)
        # the spatial layer holding the attention: the named transformer layer, or the one the attention sits in
        holder = full.split(".transformer_blocks.")[0]
        spatial = modules[holder] if holder in modules else modules[full]

        def grid_hook(mod, args, kwargs, _name=name):
            x = args[0] if args else kwargs["hidden_states"]
            if x.ndim == 4:
                shapes[_name] = (x.shape[2], x.shape[3])

        def attn_hook(mod, args, kwargs, _name=name):
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            self_attending[_name] = context is None

        hooks.append(spatial.register_forward_pre_hook(grid_hook, with_kwargs=True))
        hooks.append(attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        x = torch.empty(1, *sample_shape, device="meta")
        width = ghost.config.cross_attention_dim
        if text_context is None:
            text_context = isinstance(width, int)
        ctx = None
        if text_context:
            if not isinstance(width, int):
                raise ValueError(f"text_context: this UNet's cross_attention_dim is {width!r}, not one text width")
            ctx = torch.empty(1, context_tokens, width, device="meta")
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
        info = layer_info(unet, name, which)
        view = split_view(name)[1]
        if view == "context":
            if self_attending.get(name, False):
                raise ValueError(f"layers: {name!r}: a ':context' injection point needs a cross-attention layer "
                                 "given a text context; this one attends over its own tokens")
            out.append(replace(info, tokens=None, grid=None))
            continue
        keys = handle.records[name][0]
        if view == "output" or which == "attn1" or self_attending.get(name, False):
            out.append(replace(info, tokens=int(keys.shape[2]), grid=shapes.get(name)))
        else:
            out.append(replace(info, tokens=None, grid=None))
    return out


@dataclass(frozen=True)
class LayerPair:
    image: LayerInfo
    music: LayerInfo


PAIRINGS = ("auto", "order", "depth")


def pair_layers(image: Sequence[LayerInfo], music: Sequence[LayerInfo], rule: str = "auto",
                pairs: Sequence[Sequence[str]] | None = None) -> list[LayerPair]:
    """Pair image taps with music layers.

    - ``order``: one to one, in order (the counts must be equal);
    - ``depth``: each music layer gets the image layer of nearest relative depth (``LayerInfo.depth``, the
      layer's position in its network's forward order scaled to [0, 1]; ties go to the shallower image
      layer), so an image layer may feed several music layers (9 SD decoder taps into a 24-block DiT) and
      image layers may go unused (more taps than music layers);
    - ``auto`` (default): ``order`` when the counts are equal, else ``depth``.

    ``pairs`` (``[[image_name, music_name], ...]``) overrides the rule: exactly these pairs, in this order.
    """
    image, music = list(image), list(music)
    if pairs is not None:
        by_image = {i.name: i for i in image}
        by_music = {m.name: m for m in music}
        out = []
        for k, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"synapse.pairs[{k}]: expected [image_layer, music_layer], got {pair!r}")
            a, b = _viewed(pair[0], by_image), _viewed(pair[1], by_music)
            if a not in by_image:
                raise ValueError(f"synapse.pairs[{k}]: {a!r} is not one of the image layers {sorted(by_image)}")
            if b not in by_music:
                raise ValueError(f"synapse.pairs[{k}]: {b!r} is not one of the music layers {sorted(by_music)}")
            out.append(LayerPair(by_image[a], by_music[b]))
        if len({p.music.name for p in out}) != len(out):
            raise ValueError("synapse.pairs: each music layer may appear once")
        if not out:
            raise ValueError("synapse.pairs: the synapse needs at least one layer pair")
        return out
    if rule not in PAIRINGS:
        raise ValueError(f"synapse.pairing: expected one of {', '.join(PAIRINGS)}, got {rule!r}")
    if not image or not music:
        raise ValueError("layers: the synapse needs at least one image layer and one music layer")
    if rule == "order" or (rule == "auto" and len(image) == len(music)):
        if len(image) != len(music):
            raise ValueError(f"layers: {len(image)} image layers cannot pair one to one with {len(music)} music "
                             f"layers; set synapse.pairing: depth")
        return [LayerPair(i, m) for i, m in zip(image, music, strict=True)]
    return [LayerPair(image[nearest_depth(_depth(m, j, len(music)), [_depth(i, k, len(image))
                                                                     for k, i in enumerate(image)])], m)
            for j, m in enumerate(music)]


def _viewed(name: str, known: dict[str, Any]) -> str:
    """``name``, or the one known name that is a view of it (``up_blocks.1.attentions.0`` ->
    ``up_blocks.1.attentions.0.attn2:context``, with ``injection: context``)."""
    if name in known:
        return name
    views = [n for n in known if split_view(n)[1] is not None and name in (split_view(n)[0],
                                                                           split_view(n)[0].rpartition(".")[0])]
    return views[0] if len(views) == 1 else name


def _depth(info: LayerInfo, index: int, count: int) -> float:
    return float(info.depth) if info.depth is not None else index / max(1, count - 1)


def nearest_depth(depth: float, depths: Sequence[float]) -> int:
    """Index of the entry of ``depths`` nearest to ``depth`` (ties: the first, i.e. the shallower)."""
    return min(range(len(depths)), key=lambda k: (abs(depths[k] - depth), k))


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
        text_layers = [p.music.name for p, a in zip(self.pairs, self.aligners, strict=True)
                       if p.music.tokens is None and getattr(a, "needs_grid", False)]
        if text_layers:  # refused here, not at the first caption whose token count is not a square
            raise ValueError(
                f"aligner: {aligner!r} (with {aligner_params or {}}) resizes onto a music layer's token grid, but "
                f"{', '.join(text_layers)} attend(s) over the caption's tokens, which form no grid; use 'pool' or "
                "'linear' (resize 'pool') there"
            )

    @property
    def music_layer_names(self) -> list[str]:
        return [p.music.name for p in self.pairs]

    def align(self, cache: FeatureCache, tokens: int | Sequence[int | None],
              grids: Sequence[tuple[int, int] | None] | None = None) -> FeatureCache:
        """Image features keyed by image layer -> aligned features keyed by music layer.

        ``tokens`` is the music key count: one int for all text cross-attention
        pairs (the text length), or one entry per pair. A pair whose music
        layer has a fixed key count (``LayerInfo.tokens``, e.g. AudioLDM's
        ``attn2`` over the music tokens) uses that count and its ``grid``
        unless a per-pair entry is given.
        """
        if isinstance(tokens, int):  # the text length: for the pairs without a fixed key count
            given = [None if p.music.tokens is not None else tokens for p in self.pairs]
        else:
            given = list(tokens)
            if len(given) != len(self.pairs):
                raise ValueError(f"tokens: expected one per layer pair ({len(self.pairs)}), got {len(given)}")
        grids = list(grids) if grids is not None else [None] * len(self.pairs)
        tokens = list(given)
        for i, p in enumerate(self.pairs):
            if given[i] is None:  # the music layer's own (fixed) token count and grid
                tokens[i], grids[i] = p.music.tokens, grids[i] if grids[i] is not None else p.music.grid
        missing = [self.pairs[i].music.name for i, n in enumerate(tokens) if n is None]
        if missing:
            raise ValueError(f"tokens: no key count for the music layers {missing}; give one per pair")
        wanted = list(dict.fromkeys(p.image.name for p in self.pairs))
        out = FeatureCache()
        for t in cache.timesteps:
            step = cache.at(t)
            absent = [name for name in wanted if name not in step]
            if step and absent:
                raise ValueError(f"cache: the image features at t={t} lack the synapse's image layers {absent} "
                                 f"(captured: {sorted(step)}); the feature source must capture the layers "
                                 "that synapse.image_layers names")
            aligned = {}
            for i, pair in enumerate(self.pairs):  # an image layer may feed several music layers
                if pair.image.name not in step:
                    continue
                k, v = step[pair.image.name]
                align = self.aligners[i]
                aligned_k = apply_aligner(align, k, tokens[i], grids[i])
                # one tensor for both (an ``:output`` tap): aligned once, and still one tensor
                aligned_v = aligned_k if v is k else apply_aligner(align, v, tokens[i], grids[i])
                aligned[pair.music.name] = (aligned_k, aligned_v)
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
