"""Aligners: map image keys/values onto a music layer's token count and width.

An aligner is called as ``aligner(x, tokens, grid=None)`` with ``x`` shaped
``(batch, heads_in, tokens_in, head_dim_in)`` and returns
``(batch, heads_out, tokens, head_dim_out)``. An input that already has the
target shape is returned unchanged (the very same tensor).

- ``pool``: adaptive average pooling over the token axis (parameter-free; the
  default). Widths must match, unless ``pool_channels=True``: then the
  channels (heads x head_dim) are adaptively average-pooled onto the target
  width too, as the authors' released code fits an image attention output onto
  the text context (``nn.AdaptiveAvgPool2d``; the bins are separable, so
  pooling tokens and then channels is the same average).
- ``interpolate``: resizes the 2-D token grid (``area`` by default, which
  averages when shrinking); needs the source grid (given, or a square) and the
  target grid.
- ``linear``: token pooling (``resize="pool"``) or a resize of the 2-D token
  grid onto the target grid (``resize="interpolate"``, as ``interpolate``),
  then a learned projection of the channels (heads x head_dim); for pairs
  whose widths differ, e.g. SD image layers into AudioLDM's UNet, whose
  ``attn2`` keys form the music token grid. Initialised to the identity when
  the widths are equal.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from ..registry import register

__all__ = ["Aligner", "PoolAligner", "InterpolateAligner", "LinearAligner", "pool_tokens", "pool_channels",
           "resize_grid", "apply_aligner"]

_MODES = ("area", "bilinear", "bicubic", "nearest", "nearest-exact")


def pool_tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Adaptive average pooling of ``(batch, heads, n, head_dim)`` over ``n`` to ``tokens``."""
    if tokens < 1:
        raise ValueError(f"tokens: expected a positive int, got {tokens}")
    if x.shape[2] == tokens:
        return x
    batch, heads, _, dim = x.shape
    dtype = x.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    seq = rearrange(x.to(compute), "b h n d -> (b h) d n")
    seq = F.adaptive_avg_pool1d(seq, tokens)
    return rearrange(seq, "(b h) d n -> b h n d", b=batch, h=heads).to(dtype)


def pool_channels(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Adaptive average pooling of ``(batch, h, n, d)`` over its channels ``h*d`` onto ``heads*head_dim``
    (a wider target repeats channels: each output bin averages the one or two inputs it overlaps)."""
    if heads < 1 or head_dim < 1:
        raise ValueError(f"heads, head_dim: expected positive ints, got {heads}, {head_dim}")
    if (x.shape[1], x.shape[3]) == (heads, head_dim):
        return x
    dtype = x.dtype
    merged = rearrange(x, "b h n d -> b n (h d)")
    if merged.shape[-1] != heads * head_dim:
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        merged = F.adaptive_avg_pool1d(merged.to(compute), heads * head_dim).to(dtype)
    return rearrange(merged, "b n (h d) -> b h n d", h=heads)


def _source_grid(in_grid: tuple[int, int] | None, tokens_in: int) -> tuple[int, int]:
    """The token grid of the input: ``in_grid`` (checked) or a square."""
    if in_grid is not None:
        if in_grid[0] * in_grid[1] != tokens_in:
            raise ValueError(f"x: in_grid {in_grid} does not hold {tokens_in} tokens")
        return tuple(in_grid)
    side = math.isqrt(tokens_in)
    if side * side != tokens_in:
        raise ValueError(f"x: {tokens_in} tokens are not a square grid; give in_grid to the aligner")
    return (side, side)


def _target_grid(tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The token grid of the output: ``grid`` or a square of ``tokens``."""
    if grid is not None:
        return tuple(grid)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"grid: needed for a non-square target of {tokens} tokens")
    return (side, side)


def resize_grid(x: torch.Tensor, source: tuple[int, int], target: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resizes ``(batch, heads, h*w, head_dim)`` tokens on the ``source`` grid ``(h, w)`` to the ``target`` grid."""
    if tuple(source) == tuple(target):
        return x
    batch, heads = x.shape[:2]
    dtype = x.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    img = rearrange(x.to(compute), "b h (y x) d -> b (h d) y x", y=source[0], x=source[1])
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    img = F.interpolate(img, size=tuple(target), mode=mode, **kwargs)
    return rearrange(img, "b (h d) y x -> b h (y x) d", b=batch, h=heads).to(dtype)


def apply_aligner(aligner: nn.Module, x: torch.Tensor, tokens: int, grid: tuple[int, int] | None = None
                  ) -> torch.Tensor:
    """The one alignment path: image ``x`` ``(batch, heads_in, n, d_in)`` onto a music layer's ``tokens`` keys
    (on ``grid`` where the layer attends over a token grid). ``Synapse.align`` (features aligned once per
    timestep, then cached) and an installed hook with its own aligners both call it."""
    return aligner(x, tokens, grid)


class Aligner(nn.Module):
    """Base class: checks shapes; subclasses implement :meth:`align`."""

    def __init__(
        self,
        in_heads: int,
        in_head_dim: int,
        out_heads: int | None = None,
        out_head_dim: int | None = None,
        in_grid: tuple[int, int] | None = None,
        **unused,
    ):
        super().__init__()
        self.in_heads = int(in_heads)
        self.in_head_dim = int(in_head_dim)
        self.out_heads = int(out_heads if out_heads is not None else in_heads)
        self.out_head_dim = int(out_head_dim if out_head_dim is not None else in_head_dim)
        self.in_grid = tuple(in_grid) if in_grid is not None else None
        for name in ("in_heads", "in_head_dim", "out_heads", "out_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")

    @property
    def same_width(self) -> bool:
        return (self.in_heads, self.in_head_dim) == (self.out_heads, self.out_head_dim)

    @property
    def needs_grid(self) -> bool:
        """Whether this aligner resizes onto the music layer's spatial token grid, so that it cannot feed a
        cross-attention over the caption's tokens (which has none). ``False`` unless a subclass says so."""
        return False

    def forward(self, x: torch.Tensor, tokens: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_heads or x.shape[3] != self.in_head_dim:
            raise ValueError(
                f"x: expected (batch, {self.in_heads}, tokens, {self.in_head_dim}), got {tuple(x.shape)}"
            )
        if isinstance(tokens, bool) or int(tokens) < 1:
            raise ValueError(f"tokens: expected a positive int, got {tokens!r}")
        if grid is not None and grid[0] * grid[1] != tokens:
            raise ValueError(f"grid: {grid} has {grid[0] * grid[1]} cells but tokens is {tokens}")
        return self.align(x, int(tokens), grid)

    def align(self, x: torch.Tensor, tokens: int, grid: tuple[int, int] | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in=({self.in_heads}x{self.in_head_dim}), out=({self.out_heads}x{self.out_head_dim}), "
            f"in_grid={self.in_grid}"
        )


def _require_same_width(aligner: Aligner) -> None:
    if not aligner.same_width:
        raise ValueError(
            f"{type(aligner).__name__} cannot change the width "
            f"({aligner.in_heads}x{aligner.in_head_dim} -> {aligner.out_heads}x{aligner.out_head_dim}); "
            "use the 'linear' aligner where image and music widths differ"
        )


@register("aligner", "pool")
class PoolAligner(Aligner):
    """Adaptive average pooling over tokens (parameter-free); ``pool_channels=True`` pools the channels onto the
    target width as well (the released code's fit of image attention outputs onto the text context)."""

    def __init__(self, in_heads, in_head_dim, out_heads=None, out_head_dim=None, in_grid=None,
                 pool_channels: bool = False, **unused):
        super().__init__(in_heads, in_head_dim, out_heads, out_head_dim, in_grid)
        if not isinstance(pool_channels, bool):
            raise ValueError(f"pool_channels: expected true or false, got {pool_channels!r}")
        self.pool_channels = pool_channels
        if not pool_channels:
            _require_same_width(self)

    def align(self, x, tokens, grid):
        x = pool_tokens(x, tokens)
        if self.pool_channels and not self.same_width:
            x = pool_channels(x, self.out_heads, self.out_head_dim)
        return x


@register("aligner", "interpolate")
class InterpolateAligner(Aligner):
    """Resizes the source token grid to the target grid with ``F.interpolate``."""

    def __init__(
        self,
        in_heads,
        in_head_dim,
        out_heads=None,
        out_head_dim=None,
        in_grid=None,
        mode: str = "area",
        **unused,
    ):
        super().__init__(in_heads, in_head_dim, out_heads, out_head_dim, in_grid)
        _require_same_width(self)
        if mode not in _MODES:
            raise ValueError(f"mode: expected area, bilinear, bicubic, nearest or nearest-exact, got {mode!r}")
        self.mode = mode

    @property
    def needs_grid(self) -> bool:
        return True

    def align(self, x, tokens, grid):
        if grid is None and x.shape[2] == tokens:
            return x  # already the target shape
        source = _source_grid(self.in_grid, x.shape[2])
        return resize_grid(x, source, _target_grid(tokens, grid), self.mode)


@register("aligner", "linear")
class LinearAligner(Aligner):
    """Token pooling or a grid resize, then a learned channel projection (``heads_in*head_dim_in -> heads_out*head_dim_out``).

    ``resize="pool"`` (default) pools the token axis as ``pool``;
    ``resize="interpolate"`` maps the source token grid (``in_grid`` or a
    square) onto the target ``grid`` given at call time (or a square) with
    ``F.interpolate`` in ``mode``, as ``interpolate`` does.
    """

    def __init__(self, in_heads, in_head_dim, out_heads=None, out_head_dim=None, in_grid=None,
                 resize: str = "pool", mode: str = "area", **unused):
        super().__init__(in_heads, in_head_dim, out_heads, out_head_dim, in_grid)
        if resize not in ("pool", "interpolate"):
            raise ValueError(f"resize: expected 'pool' or 'interpolate', got {resize!r}")
        if mode not in _MODES:
            raise ValueError(f"mode: expected area, bilinear, bicubic, nearest or nearest-exact, got {mode!r}")
        self.resize, self.mode = resize, mode
        in_dim, out_dim = self.in_heads * self.in_head_dim, self.out_heads * self.out_head_dim
        self.proj = nn.Linear(in_dim, out_dim)
        if in_dim == out_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(out_dim))
                self.proj.bias.zero_()

    @property
    def needs_grid(self) -> bool:
        return self.resize == "interpolate"

    def align(self, x, tokens, grid):
        if self.resize == "pool":
            x = pool_tokens(x, tokens)
        elif grid is not None or x.shape[2] != tokens:
            x = resize_grid(x, _source_grid(self.in_grid, x.shape[2]), _target_grid(tokens, grid), self.mode)
        merged = rearrange(x, "b h n d -> b n (h d)")
        projected = self.proj(merged.to(self.proj.weight.dtype)).to(x.dtype)
        return rearrange(projected, "b n (h d) -> b h n d", h=self.out_heads)
