"""Mixers: how much of the image's keys/values enters each music attention layer.

All mixers take ``(batch, heads, tokens, head_dim)`` music and (already aligned)
image tensors of the same shape and return ``music + a * (image - music)``
computed as ``torch.lerp`` so that ``a = 0`` returns the music input and
``a = 1`` the image input bit for bit. Half-precision inputs are mixed in
float32 and cast back, so the result of a convex mix stays between its inputs.

The convex variants keep ``a`` in [0, 1] with a straight-through clamp: the
forward pass uses the clamped value, the gradient passes as if unclamped (so a
weight pushed past a bound is not stuck there); :meth:`BaseMixer.project_`
clamps the stored parameters in place and is meant to run after each
optimizer step.

Every mixer is constructible as ``Mixer(num_layers=L, num_heads=H, head_dim=D)``;
``num_heads`` may be one int or one int per layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..interfaces import SynapseMixer
from ..registry import register

__all__ = [
    "BaseMixer",
    "ConvexMixer",
    "PerHeadMixer",
    "GatedMixer",
    "BoundedMixer",
    "straight_through_clamp",
    "mix",
]


class _StraightThroughClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def straight_through_clamp(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``x.clamp(low, high)`` in the forward pass, identity in the backward pass."""
    return _StraightThroughClamp.apply(x, low, high)


def mix(music: torch.Tensor, image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``music + weight * (image - music)``, exact at weight 0 and 1.

    ``weight`` broadcasts against ``(batch, heads, tokens, head_dim)``.
    Half-precision tensors are mixed in float32 and cast back.
    """
    if music.shape != image.shape:
        raise ValueError(
            f"mix: music and image must have the same shape (batch, heads, tokens, head_dim), "
            f"got music {tuple(music.shape)} and image {tuple(image.shape)}; align the image first"
        )
    dtype = music.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = torch.lerp(music.to(compute), image.to(compute), weight.to(compute))
    return out.to(dtype)


def _heads_per_layer(num_layers: int, num_heads: int | Sequence[int] | None) -> list[int] | None:
    if num_heads is None:
        return None
    if isinstance(num_heads, int):
        heads = [num_heads] * num_layers
    else:
        heads = [int(h) for h in num_heads]
        if len(heads) != num_layers:
            raise ValueError(f"num_heads: expected one head count per layer ({num_layers}), got {len(heads)}")
    if any(h < 1 for h in heads):
        raise ValueError(f"num_heads: head counts must be positive, got {heads}")
    return heads


class BaseMixer(SynapseMixer):
    """Shared plumbing: argument checks, layer indexing, forcing, projection."""

    #: whether the mix weight is kept in [0, 1] (the output lies between the inputs)
    convex: bool = True

    def __init__(
        self,
        num_layers: int,
        num_heads: int | Sequence[int] | None = None,
        head_dim: int | None = None,
        **unused,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
        self.num_layers = num_layers
        self.heads = _heads_per_layer(num_layers, num_heads)
        self.head_dim = head_dim
        self._forced: torch.Tensor | None = None

    # -- to implement -------------------------------------------------------------
    def weight(
        self, layer: int, music: torch.Tensor, image: torch.Tensor, timestep: torch.Tensor | None
    ) -> torch.Tensor:
        """The mix weight for ``layer``, broadcastable to ``(batch, heads, 1, 1)``."""
        raise NotImplementedError

    def raw_alphas(self) -> torch.Tensor:
        """The per-layer weights as stored (with gradient), before any forcing."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------
    def forward(
        self,
        layer: int,
        music: torch.Tensor,
        image: torch.Tensor,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if music.ndim != 4:
            raise ValueError(f"music: expected (batch, heads, tokens, head_dim), got shape {tuple(music.shape)}")
        if image.shape != music.shape:
            raise ValueError(
                f"image: expected the music shape {tuple(music.shape)} (batch, heads, tokens, head_dim), "
                f"got {tuple(image.shape)}; align the image first"
            )
        if self.heads is not None and music.shape[1] != self.heads[layer]:
            raise ValueError(
                f"music: layer {layer} was configured with {self.heads[layer]} heads, "
                f"got a tensor with {music.shape[1]}"
            )
        if self._forced is not None:
            weight = self._forced[layer].to(music.device)
        else:
            weight = self.weight(layer, music, image, timestep)
        return mix(music, image, weight)

    def alphas(self) -> torch.Tensor:
        """Current effective weights, detached: one row per layer."""
        if self._forced is not None:
            return self._expand_forced(self._forced.detach().clone())
        return self._effective(self.raw_alphas()).detach()

    def _expand_forced(self, forced: torch.Tensor) -> torch.Tensor:
        return forced

    def _effective(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.clamp(0.0, 1.0)

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp stored weights to their valid range; call after each optimizer step."""
        for p in self._projected_parameters():
            p.clamp_(0.0, 1.0)

    def _projected_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def fill_(self, value: float) -> BaseMixer:
        """Set every layer's weight to ``value`` (in the stored parameterisation)."""
        raise NotImplementedError(f"{type(self).__name__} does not support fill_")

    @contextlib.contextmanager
    def forced(self, value: float | torch.Tensor) -> Iterator[BaseMixer]:
        """Within the block, every layer mixes with weight ``value`` (e.g. 0.0 for text only).

        ``value`` is a number, or a tensor with one entry per layer.
        """
        value = torch.as_tensor(value, dtype=torch.float32)
        if value.ndim == 0:
            value = value.expand(self.num_layers)
        if value.shape != (self.num_layers,):
            raise ValueError(f"value: expected a number or {self.num_layers} values, got shape {tuple(value.shape)}")
        if self.convex and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"value: {type(self).__name__} weights lie in [0, 1], got {value.tolist()}")
        previous = self._forced
        self._forced = value.clone()
        try:
            yield self
        finally:
            self._forced = previous

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, heads={self.heads}, head_dim={self.head_dim}"


@register("mixer", "convex")
class ConvexMixer(BaseMixer):
    """One weight per layer, ``K <- a_l K_img + (1 - a_l) K_music``, ``a_l`` in [0, 1] (the paper).

    ``shared=True`` keeps one weight for all layers (the "same alpha for every block" row of the
    paper's Table 2); ``alphas()`` still has one entry per layer.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int | Sequence[int] | None = None,
        head_dim: int | None = None,
        init: float = 0.5,
        shared: bool = False,
        **unused,
    ):
        super().__init__(num_layers, num_heads, head_dim)
        _check_unit("init", init)
        self.shared = bool(shared)
        self.alpha = nn.Parameter(torch.full((1 if self.shared else num_layers,), float(init)))

    def weight(self, layer, music, image, timestep):
        return straight_through_clamp(self.alpha[0 if self.shared else layer])

    def raw_alphas(self):
        return self.alpha.expand(self.num_layers) if self.shared else self.alpha

    def _projected_parameters(self):
        return [self.alpha]

    @torch.no_grad()
    def fill_(self, value: float) -> ConvexMixer:
        self.alpha.fill_(float(value))
        return self


@register("mixer", "per_head")
class PerHeadMixer(BaseMixer):
    """One weight per layer and head, each in [0, 1].

    ``alphas()`` is ``(num_layers, max_heads)``; entries past a layer's head
    count are NaN.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int | Sequence[int] | None = None,
        head_dim: int | None = None,
        init: float = 0.5,
        **unused,
    ):
        super().__init__(num_layers, num_heads, head_dim)
        if self.heads is None:
            raise ValueError("num_heads: PerHeadMixer needs the head count (one int, or one per layer)")
        _check_unit("init", init)
        self.alpha = nn.Parameter(torch.full((num_layers, max(self.heads)), float(init)))

    def weight(self, layer, music, image, timestep):
        heads = self.heads[layer]
        return straight_through_clamp(self.alpha[layer, :heads]).view(1, heads, 1, 1)

    def raw_alphas(self):
        return self.alpha

    def _effective(self, raw):
        out = raw.clamp(0.0, 1.0).clone()
        for layer, heads in enumerate(self.heads):
            out[layer, heads:] = float("nan")
        return out

    def _expand_forced(self, forced):
        return self._effective(forced[:, None].expand(-1, max(self.heads)))

    def _projected_parameters(self):
        return [self.alpha]

    @torch.no_grad()
    def fill_(self, value: float) -> PerHeadMixer:
        self.alpha.fill_(float(value))
        return self


@register("mixer", "gated")
class GatedMixer(BaseMixer):
    """A weight per layer and sample, computed from the timestep and the pooled features.

    ``a_l = clamp(b_l + w_l . [emb(t), norm(mean(K_music)), norm(mean(K_img))], 0, 1)``
    with a straight-through clamp; ``w_l`` starts at zero so ``a_l`` starts at
    ``init`` for every input. The feature means run over heads and tokens.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int | Sequence[int] | None = None,
        head_dim: int | None = None,
        init: float = 0.5,
        time_embedding_dim: int = 32,
        max_period: float = 10_000.0,
        **unused,
    ):
        super().__init__(num_layers, num_heads, head_dim)
        if head_dim is None:
            raise ValueError("head_dim: GatedMixer needs the head size to size its gates")
        if time_embedding_dim < 2 or time_embedding_dim % 2:
            raise ValueError(f"time_embedding_dim: expected a positive even int, got {time_embedding_dim}")
        _check_unit("init", init)
        self.time_embedding_dim = time_embedding_dim
        self.max_period = max_period
        features = time_embedding_dim + 2 * head_dim
        self.gate_weight = nn.Parameter(torch.zeros(num_layers, features))
        self.gate_bias = nn.Parameter(torch.full((num_layers,), float(init)))

    def time_embedding(self, timestep: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """Sinusoidal ``(batch, time_embedding_dim)`` embedding; zeros when ``timestep`` is None."""
        if timestep is None:
            return torch.zeros(batch, self.time_embedding_dim, device=device)
        t = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep: expected a scalar or {batch} values, got {t.numel()}")
        half = self.time_embedding_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=device) / half)
        angles = t[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def weight(self, layer, music, image, timestep):
        batch = music.shape[0]
        pooled = [
            nn.functional.layer_norm(x.float().mean(dim=(1, 2)), (x.shape[-1],)) for x in (music, image)
        ]
        if pooled[0].shape[-1] != self.head_dim:
            raise ValueError(f"music: expected head_dim {self.head_dim}, got {pooled[0].shape[-1]}")
        features = torch.cat([self.time_embedding(timestep, batch, music.device), *pooled], dim=-1)
        logits = features @ self.gate_weight[layer] + self.gate_bias[layer]
        return straight_through_clamp(logits).view(batch, 1, 1, 1)

    def raw_alphas(self):
        # the input-independent part: the weight a zero feature vector would get
        return self.gate_bias

    def _projected_parameters(self):
        return [self.gate_bias]

    @torch.no_grad()
    def fill_(self, value: float) -> GatedMixer:
        self.gate_weight.zero_()
        self.gate_bias.fill_(float(value))
        return self


@register("mixer", "bounded")
class BoundedMixer(BaseMixer):
    """The released code's weight ``f = (2 sigmoid(a) - 1) / rho``: zero at init, bounded by 1/rho.

    Computed as the equal ``tanh(a / 2) / rho``; the bound is open in exact
    arithmetic, but float32 ``tanh`` saturates (``|a|`` above about 18), so
    ``|f|`` can equal ``1/rho``. Not convex: ``f`` may be negative, so the output need not lie between the inputs.
    """

    convex = False

    def __init__(
        self,
        num_layers: int,
        num_heads: int | Sequence[int] | None = None,
        head_dim: int | None = None,
        rho: float = 5.0,
        **unused,
    ):
        super().__init__(num_layers, num_heads, head_dim)
        if not rho > 1.0:
            raise ValueError(f"rho: expected a number > 1 (the weight is bounded by 1/rho), got {rho}")
        self.rho = float(rho)
        self.a = nn.Parameter(torch.zeros(num_layers))

    def _f(self, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a / 2.0) / self.rho

    def weight(self, layer, music, image, timestep):
        return self._f(self.a[layer])

    def raw_alphas(self):
        return self.a

    def _effective(self, raw):
        return self._f(raw)

    @torch.no_grad()
    def fill_(self, value: float) -> BoundedMixer:
        """Set ``f`` (not ``a``) to ``value``, which must lie in (-1/rho, 1/rho)."""
        bound = 1.0 / self.rho
        if not -bound < value < bound:
            raise ValueError(f"value: BoundedMixer weights lie in ({-bound}, {bound}), got {value}")
        a = 2.0 * math.atanh(value * self.rho) if abs(value * self.rho) < 1.0 else math.inf
        if not math.isfinite(a):
            raise ValueError(f"value: {value} is too close to the bound 1/rho = {bound} to represent")
        self.a.fill_(a)
        return self


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a weight in [0, 1], got {value}")
