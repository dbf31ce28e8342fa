"""Property-based tests for the synapse aligners (``melfusion.synapse.aligners``).

Aligners map image keys/values ``(batch, heads_in, tokens_in, head_dim_in)`` onto
a music layer's ``(batch, heads_out, tokens, head_dim_out)``. These tests check,
over sizes, seeds and dtypes drawn by hypothesis, that pooling and
interpolation keep constants and (for even splits) means, are linear, are the
identity on inputs of the target shape, keep shapes and dtypes, match
independently computed block means, and that bad inputs raise ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from melfusion.registry import REGISTRIES
from melfusion.synapse.aligners import InterpolateAligner, LinearAligner, PoolAligner, pool_tokens

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALIGNERS = [PoolAligner, InterpolateAligner, LinearAligner]
MODES = ["area", "bilinear", "bicubic", "nearest", "nearest-exact"]
#: tolerance relative to the magnitude of the values, per dtype
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

FAST = settings(max_examples=30, deadline=None)

seeds = st.integers(0, 2**31 - 1)
batches = st.integers(1, 3)
heads_st = st.integers(1, 4)
tokens_st = st.integers(1, 40)
head_dims = st.integers(1, 16)
grid_sides = st.integers(1, 6)


def _id(value) -> str:
    return getattr(value, "__name__", None) or str(value).replace("torch.", "")


def uniform(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Float32 values uniform in [-scale, scale], reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) * 2 - 1) * scale


def close(actual: torch.Tensor, expected: torch.Tensor, dtype=torch.float32, scale: float = 1.0) -> None:
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=RTOL[dtype], atol=RTOL[dtype] * max(scale, 1.0)
    )


# ---------------------------------------------------------------------------------
# 1. constants stay constant
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(
    batch=batches,
    heads=heads_st,
    tokens_in=tokens_st,
    tokens=tokens_st,
    head_dim=head_dims,
    value=st.floats(-100.0, 100.0),
)
def test_pool_of_constant_is_constant(dtype, batch, heads, tokens_in, tokens, head_dim, value):
    x = torch.full((batch, heads, tokens_in, head_dim), value).to(dtype)
    expected = torch.full((batch, heads, tokens, head_dim), value).to(dtype)
    close(pool_tokens(x, tokens), expected, dtype, abs(value))
    aligner = PoolAligner(in_heads=heads, in_head_dim=head_dim)
    out = aligner(x, tokens)
    assert out.shape == expected.shape and out.dtype == dtype
    close(out, expected, dtype, abs(value))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("mode", MODES)
@FAST
@given(
    batch=batches,
    heads=heads_st,
    head_dim=head_dims,
    src=st.tuples(grid_sides, grid_sides),
    dst=st.tuples(grid_sides, grid_sides),
    value=st.floats(-100.0, 100.0),
)
def test_interpolate_of_constant_is_constant(dtype, mode, batch, heads, head_dim, src, dst, value):
    aligner = InterpolateAligner(in_heads=heads, in_head_dim=head_dim, in_grid=src, mode=mode)
    x = torch.full((batch, heads, src[0] * src[1], head_dim), value).to(dtype)
    tokens = dst[0] * dst[1]
    out = aligner(x, tokens, grid=dst)
    assert out.shape == (batch, heads, tokens, head_dim) and out.dtype == dtype
    close(out, torch.full(out.shape, value).to(dtype), dtype, abs(value))


# ---------------------------------------------------------------------------------
# 2. inputs of the target shape pass through
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(batch=batches, heads=heads_st, tokens=tokens_st, head_dim=head_dims, seed=seeds)
def test_pool_identity_is_same_object(dtype, batch, heads, tokens, head_dim, seed):
    x = uniform((batch, heads, tokens, head_dim), seed, 100.0).to(dtype)
    assert pool_tokens(x, tokens) is x
    assert PoolAligner(heads, head_dim)(x, tokens) is x
    assert PoolAligner(heads, head_dim, in_grid=(1, tokens))(x, tokens, grid=(1, tokens)) is x


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("mode", MODES)
@FAST
@given(batch=batches, heads=heads_st, head_dim=head_dims, grid=st.tuples(grid_sides, grid_sides), seed=seeds)
def test_interpolate_identity_is_same_object(dtype, mode, batch, heads, head_dim, grid, seed):
    tokens = grid[0] * grid[1]
    x = uniform((batch, heads, tokens, head_dim), seed, 100.0).to(dtype)
    aligner = InterpolateAligner(heads, head_dim, in_grid=grid, mode=mode)
    assert aligner(x, tokens, grid=grid) is x
    # a square source needs neither in_grid nor grid
    side = grid[0]
    square = uniform((batch, heads, side * side, head_dim), seed, 100.0).to(dtype)
    assert InterpolateAligner(heads, head_dim, mode=mode)(square, side * side) is square


def test_interpolate_identity_for_non_square_without_grid():
    x = uniform((1, 2, 6, 4), 0)
    aligner = InterpolateAligner(2, 4, in_grid=(2, 3))
    assert aligner(x, 6) is x


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(batch=batches, heads=heads_st, tokens=tokens_st, head_dim=head_dims, seed=seeds)
def test_linear_identity_at_init(dtype, batch, heads, tokens, head_dim, seed):
    x = uniform((batch, heads, tokens, head_dim), seed, 100.0).to(dtype)
    aligner = LinearAligner(heads, head_dim)
    with torch.no_grad():
        out = aligner(x, tokens)
    assert out.dtype == dtype
    assert torch.equal(out, x)


@FAST
@given(batch=batches, tokens=tokens_st, data=st.data(), seed=seeds)
def test_linear_same_total_width_is_a_reshape_at_init(batch, tokens, data, seed):
    # equal heads*head_dim (e.g. 2x8 -> 4x4): the identity projection only regroups the channels
    in_heads, in_head_dim = data.draw(heads_st), data.draw(head_dims)
    width = in_heads * in_head_dim
    out_heads = data.draw(st.sampled_from([h for h in range(1, width + 1) if width % h == 0]))
    aligner = LinearAligner(in_heads, in_head_dim, out_heads, width // out_heads)
    x = uniform((batch, in_heads, tokens, in_head_dim), seed, 10.0)
    with torch.no_grad():
        out = aligner(x, tokens)
    expected = x.permute(0, 2, 1, 3).reshape(batch, tokens, out_heads, width // out_heads).permute(0, 2, 1, 3)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------
# 3. shapes and dtypes
# ---------------------------------------------------------------------------------


@st.composite
def aligner_cases(draw):
    """(class, kwargs, input shape, tokens, grid) for a valid call of any aligner."""
    cls = draw(st.sampled_from(ALIGNERS))
    batch, in_heads, in_head_dim = draw(batches), draw(heads_st), draw(head_dims)
    kwargs = {"in_heads": in_heads, "in_head_dim": in_head_dim}
    if cls is LinearAligner:
        kwargs.update(out_heads=draw(heads_st), out_head_dim=draw(head_dims))
    if cls is InterpolateAligner:
        src, dst = draw(st.tuples(grid_sides, grid_sides)), draw(st.tuples(grid_sides, grid_sides))
        kwargs.update(in_grid=src, mode=draw(st.sampled_from(MODES)))
        tokens_in, tokens, grid = src[0] * src[1], dst[0] * dst[1], dst
    else:
        tokens_in, tokens, grid = draw(tokens_st), draw(tokens_st), None
    return cls, kwargs, (batch, in_heads, tokens_in, in_head_dim), tokens, grid


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@settings(max_examples=60, deadline=None)
@given(case=aligner_cases(), seed=seeds)
def test_output_shape_and_dtype(dtype, case, seed):
    cls, kwargs, shape, tokens, grid = case
    aligner = cls(**kwargs)
    x = uniform(shape, seed, 100.0).to(dtype)
    with torch.no_grad():
        out = aligner(x, tokens, grid=grid)
    out_heads = kwargs.get("out_heads", kwargs["in_heads"])
    out_head_dim = kwargs.get("out_head_dim", kwargs["in_head_dim"])
    assert out.shape == (shape[0], out_heads, tokens, out_head_dim)
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_aligners_are_registered():
    names = REGISTRIES["aligner"].names()
    for name, cls in (("pool", PoolAligner), ("interpolate", InterpolateAligner), ("linear", LinearAligner)):
        assert name in names
        assert REGISTRIES["aligner"].get(name) is cls
        aligner = REGISTRIES["aligner"].build(name, in_heads=2, in_head_dim=4, unused_kw=1)
        assert aligner(uniform((1, 2, 16, 4), 0), 4).shape == (1, 2, 4, 4)


# ---------------------------------------------------------------------------------
# 4, 5. pooling keeps means of even splits and is linear
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(
    batch=batches,
    heads=heads_st,
    tokens=st.integers(1, 10),
    factor=st.integers(1, 4),
    head_dim=head_dims,
    seed=seeds,
)
def test_pool_keeps_mean_when_tokens_divide(dtype, batch, heads, tokens, factor, head_dim, seed):
    x = uniform((batch, heads, tokens * factor, head_dim), seed, 10.0).to(dtype)
    out = pool_tokens(x, tokens)
    close(out.float().mean(dim=2), x.float().mean(dim=2), dtype, 10.0)
    # and each output token is the mean of its own block of ``factor`` inputs
    blocks = x.float().reshape(batch, heads, tokens, factor, head_dim).mean(dim=3)
    close(out, blocks, dtype, 10.0)


@FAST
@given(
    batch=batches,
    heads=heads_st,
    tokens_in=tokens_st,
    tokens=tokens_st,
    head_dim=head_dims,
    seed=seeds,
    a=st.floats(-10.0, 10.0),
    b=st.floats(-10.0, 10.0),
)
def test_pool_is_linear(batch, heads, tokens_in, tokens, head_dim, seed, a, b):
    shape = (batch, heads, tokens_in, head_dim)
    x, y = uniform(shape, seed, 10.0), uniform(shape, seed + 1, 10.0)
    lhs = pool_tokens(a * x + b * y, tokens)
    rhs = a * pool_tokens(x, tokens) + b * pool_tokens(y, tokens)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-4)
    aligner = PoolAligner(heads, head_dim)
    torch.testing.assert_close(aligner(a * x + b * y, tokens), rhs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@FAST
@given(
    batch=batches,
    heads=heads_st,
    head_dim=head_dims,
    src=st.tuples(grid_sides, grid_sides),
    dst=st.tuples(grid_sides, grid_sides),
    seed=seeds,
    a=st.floats(-10.0, 10.0),
    b=st.floats(-10.0, 10.0),
)
def test_interpolate_is_linear(mode, batch, heads, head_dim, src, dst, seed, a, b):
    shape = (batch, heads, src[0] * src[1], head_dim)
    x, y = uniform(shape, seed, 10.0), uniform(shape, seed + 1, 10.0)
    aligner = InterpolateAligner(heads, head_dim, in_grid=src, mode=mode)
    tokens = dst[0] * dst[1]
    lhs = aligner(a * x + b * y, tokens, grid=dst)
    rhs = a * aligner(x, tokens, grid=dst) + b * aligner(y, tokens, grid=dst)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------
# 6. widths: linear maps them and learns, pool/interpolate refuse
# ---------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(batch=batches, tokens_in=tokens_st, tokens=tokens_st, seed=seeds)
def test_linear_maps_widths_and_gets_gradients(batch, tokens_in, tokens, seed):
    aligner = LinearAligner(in_heads=20, in_head_dim=64, out_heads=8, out_head_dim=32)
    params = dict(aligner.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    x = uniform((batch, 20, tokens_in, 64), seed, 10.0).requires_grad_(True)
    out = aligner(x, tokens)
    assert out.shape == (batch, 8, tokens, 32)
    (out * uniform(out.shape, seed + 1)).sum().backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(batch=batches, tokens_in=tokens_st, tokens=tokens_st, seed=seeds)
def test_linear_projection_matches_matmul(dtype, batch, tokens_in, tokens, seed):
    aligner = LinearAligner(in_heads=3, in_head_dim=4, out_heads=2, out_head_dim=5)
    x = uniform((batch, 3, tokens_in, 4), seed, 10.0).to(dtype)
    with torch.no_grad():
        out = aligner(x, tokens)
        pooled = pool_tokens(x, tokens).float()
        merged = pooled.permute(0, 2, 1, 3).reshape(batch, tokens, 12)
        expected = (merged @ aligner.proj.weight.T + aligner.proj.bias).reshape(batch, tokens, 2, 5)
    assert out.dtype == dtype
    close(out, expected.permute(0, 2, 1, 3), dtype, 10.0)


@pytest.mark.parametrize("cls", [PoolAligner, InterpolateAligner], ids=_id)
@FAST
@given(
    in_heads=heads_st,
    in_head_dim=head_dims,
    out_heads=heads_st,
    out_head_dim=head_dims,
)
def test_parameter_free_aligners_refuse_width_changes(cls, in_heads, in_head_dim, out_heads, out_head_dim):
    assert list(cls(in_heads, in_head_dim).parameters()) == []
    if (in_heads, in_head_dim) == (out_heads, out_head_dim):
        out_heads += 1
    with pytest.raises(ValueError, match="linear"):
        cls(in_heads, in_head_dim, out_heads=out_heads, out_head_dim=out_head_dim)


# ---------------------------------------------------------------------------------
# 7. interpolate: grids
# ---------------------------------------------------------------------------------


@FAST
@given(batch=batches, heads=heads_st, head_dim=head_dims, tokens_in=tokens_st, tokens=st.integers(1, 9))
def test_interpolate_non_square_source_needs_in_grid(batch, heads, head_dim, tokens_in, tokens):
    if int(tokens_in**0.5) ** 2 == tokens_in:
        tokens_in += 1 if tokens_in != 1 else 2  # 1 -> 3, 4 -> 5, ...: never square
    x = uniform((batch, heads, tokens_in, head_dim), 0)
    with pytest.raises(ValueError, match="in_grid"):
        InterpolateAligner(heads, head_dim)(x, tokens * tokens)


@FAST
@given(
    batch=batches,
    heads=heads_st,
    head_dim=head_dims,
    src=st.tuples(grid_sides, grid_sides),
    grid=st.tuples(grid_sides, grid_sides),
    offset=st.integers(1, 5),
)
def test_grid_cell_count_must_match_tokens(batch, heads, head_dim, src, grid, offset):
    x = uniform((batch, heads, src[0] * src[1], head_dim), 0)
    tokens = grid[0] * grid[1] + offset
    for aligner in (
        InterpolateAligner(heads, head_dim, in_grid=src),
        PoolAligner(heads, head_dim),
        LinearAligner(heads, head_dim),
    ):
        with pytest.raises(ValueError, match=r"^grid: "):
            aligner(x, tokens, grid=grid)


@FAST
@given(
    batch=batches,
    heads=heads_st,
    head_dim=head_dims,
    src=st.tuples(grid_sides, grid_sides),
    extra=st.integers(1, 5),
)
def test_interpolate_in_grid_must_hold_the_tokens(batch, heads, head_dim, src, extra):
    x = uniform((batch, heads, src[0] * src[1] + extra, head_dim), 0)
    with pytest.raises(ValueError, match="in_grid"):
        InterpolateAligner(heads, head_dim, in_grid=src)(x, 4, grid=(2, 2))


@FAST
@given(batch=batches, heads=heads_st, head_dim=head_dims, tokens=st.integers(2, 40))
def test_interpolate_non_square_target_needs_grid(batch, heads, head_dim, tokens):
    if int(tokens**0.5) ** 2 == tokens:
        tokens += 1
    x = uniform((batch, heads, 16, head_dim), 0)
    with pytest.raises(ValueError, match="grid"):
        InterpolateAligner(heads, head_dim)(x, tokens)


def test_interpolate_area_4x8_to_2x4_is_block_mean():
    x = uniform((2, 3, 32, 5), 7, 10.0)
    out = InterpolateAligner(3, 5, in_grid=(4, 8))(x, 8, grid=(2, 4))
    blocks = x.reshape(2, 3, 2, 2, 4, 2, 5).mean(dim=(3, 5)).reshape(2, 3, 8, 5)
    torch.testing.assert_close(out, blocks, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(
    batch=batches,
    heads=heads_st,
    head_dim=head_dims,
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    factor=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=seeds,
)
def test_interpolate_area_is_block_mean(dtype, batch, heads, head_dim, grid, factor, seed):
    (gh, gw), (fh, fw) = grid, factor
    src = (gh * fh, gw * fw)
    x = uniform((batch, heads, src[0] * src[1], head_dim), seed, 10.0).to(dtype)
    out = InterpolateAligner(heads, head_dim, in_grid=src, mode="area")(x, gh * gw, grid=grid)
    # token index is row * width + column: split rows into (gh, fh) and columns into (gw, fw)
    blocks = x.float().reshape(batch, heads, gh, fh, gw, fw, head_dim).mean(dim=(3, 5))
    assert out.dtype == dtype
    close(out, blocks.reshape(batch, heads, gh * gw, head_dim), dtype, 10.0)


# ---------------------------------------------------------------------------------
# 8. wrong input shapes
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALIGNERS, ids=_id)
@FAST
@given(
    batch=batches,
    heads=heads_st,
    head_dim=head_dims,
    tokens=st.integers(1, 6),
    axis=st.sampled_from([1, 3]),
    extra=st.integers(1, 3),
)
def test_wrong_input_width_raises(cls, batch, heads, head_dim, tokens, axis, extra):
    aligner = cls(heads, head_dim)
    shape = [batch, heads, tokens * tokens, head_dim]
    shape[axis] += extra
    with pytest.raises(ValueError, match=r"^x: "):
        aligner(uniform(tuple(shape), 0), tokens * tokens)
    with pytest.raises(ValueError, match=r"^x: "):
        aligner(uniform((heads, tokens * tokens, head_dim), 0), tokens * tokens)


@pytest.mark.parametrize("cls", [PoolAligner, LinearAligner], ids=_id)
@pytest.mark.parametrize("tokens", [0, -1])
def test_non_positive_tokens_raise(cls, tokens):
    with pytest.raises(ValueError, match="tokens"):
        cls(2, 4)(uniform((1, 2, 16, 4), 0), tokens)


def test_interpolate_zero_tokens_raises():
    with pytest.raises(ValueError, match="tokens"):
        InterpolateAligner(2, 4)(uniform((1, 2, 16, 4), 0), 0)


@pytest.mark.parametrize("name", ["in_heads", "in_head_dim", "out_heads", "out_head_dim"])
@pytest.mark.parametrize("cls", ALIGNERS, ids=_id)
def test_non_positive_sizes_raise(cls, name):
    kwargs = {"in_heads": 2, "in_head_dim": 4, name: 0}
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_interpolate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        InterpolateAligner(2, 4, mode="trilinear")


# ---------------------------------------------------------------------------------
# 9. linear with resize="interpolate": grid resize, then channel projection
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(
    batch=batches,
    in_heads=heads_st,
    in_head_dim=head_dims,
    out_heads=heads_st,
    out_head_dim=head_dims,
    src=st.tuples(grid_sides, grid_sides),
    dst=st.tuples(grid_sides, grid_sides),
    mode=st.sampled_from(MODES),
    seed=seeds,
)
def test_linear_interpolate_shape_and_matches_resize_then_matmul(
    dtype, batch, in_heads, in_head_dim, out_heads, out_head_dim, src, dst, mode, seed
):
    aligner = LinearAligner(in_heads, in_head_dim, out_heads, out_head_dim, in_grid=src, resize="interpolate",
                            mode=mode)
    x = uniform((batch, in_heads, src[0] * src[1], in_head_dim), seed, 10.0).to(dtype)
    tokens = dst[0] * dst[1]
    with torch.no_grad():
        out = aligner(x, tokens, grid=dst)
        resized = InterpolateAligner(in_heads, in_head_dim, in_grid=src, mode=mode)(x.float(), tokens, grid=dst)
        merged = resized.permute(0, 2, 1, 3).reshape(batch, tokens, in_heads * in_head_dim)
        expected = (merged @ aligner.proj.weight.T + aligner.proj.bias).reshape(batch, tokens, out_heads, out_head_dim)
    assert out.shape == (batch, out_heads, tokens, out_head_dim) and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    close(out, expected.permute(0, 2, 1, 3), dtype, 100.0 if mode == "bicubic" else 10.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(batch=batches, heads=heads_st, head_dim=head_dims, grid=st.tuples(grid_sides, grid_sides),
       mode=st.sampled_from(MODES), seed=seeds)
def test_linear_interpolate_identity_when_widths_and_grids_equal(dtype, batch, heads, head_dim, grid, mode, seed):
    tokens = grid[0] * grid[1]
    x = uniform((batch, heads, tokens, head_dim), seed, 100.0).to(dtype)
    aligner = LinearAligner(heads, head_dim, in_grid=grid, resize="interpolate", mode=mode)
    with torch.no_grad():
        assert torch.equal(aligner(x, tokens, grid=grid), x)
        assert torch.equal(aligner(x, tokens), x)  # no target grid and the same token count: no resize


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("mode", MODES)
@FAST
@given(batch=batches, heads=heads_st, head_dim=head_dims, src=st.tuples(grid_sides, grid_sides),
       dst=st.tuples(grid_sides, grid_sides), seed=seeds)
def test_linear_interpolate_equals_interpolate_at_identity_init(dtype, mode, batch, heads, head_dim, src, dst, seed):
    # equal widths: the projection starts as the identity, so the aligner is the interpolate aligner
    x = uniform((batch, heads, src[0] * src[1], head_dim), seed, 10.0).to(dtype)
    tokens = dst[0] * dst[1]
    with torch.no_grad():
        out = LinearAligner(heads, head_dim, in_grid=src, resize="interpolate", mode=mode)(x, tokens, grid=dst)
    ref = InterpolateAligner(heads, head_dim, in_grid=src, mode=mode)(x, tokens, grid=dst)
    assert out.dtype == dtype
    close(out, ref, dtype, 100.0 if mode == "bicubic" else 10.0)


@FAST
@given(batch=batches, heads=heads_st, head_dim=head_dims, src=st.tuples(grid_sides, grid_sides),
       dst=st.tuples(grid_sides, grid_sides), value=st.floats(-100.0, 100.0))
def test_linear_interpolate_area_keeps_constants(batch, heads, head_dim, src, dst, value):
    x = torch.full((batch, heads, src[0] * src[1], head_dim), value)
    aligner = LinearAligner(heads, head_dim, in_grid=src, resize="interpolate")
    with torch.no_grad():
        out = aligner(x, dst[0] * dst[1], grid=dst)
    close(out, torch.full(out.shape, value), torch.float32, abs(value))


def test_linear_interpolate_area_4x8_to_2x4_is_block_mean_then_projection():
    aligner = LinearAligner(3, 5, out_heads=2, out_head_dim=4, in_grid=(4, 8), resize="interpolate")
    x = uniform((2, 3, 32, 5), 7, 10.0)
    with torch.no_grad():
        out = aligner(x, 8, grid=(2, 4))
        blocks = x.reshape(2, 3, 2, 2, 4, 2, 5).mean(dim=(3, 5)).reshape(2, 3, 8, 5)
        merged = blocks.permute(0, 2, 1, 3).reshape(2, 8, 15)
        expected = aligner.proj(merged).reshape(2, 8, 2, 4).permute(0, 2, 1, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_linear_interpolate_needs_grids_and_rejects_bad_options():
    x = uniform((1, 2, 6, 4), 0)
    with pytest.raises(ValueError, match="in_grid"):  # 6 tokens: not a square, no in_grid
        LinearAligner(2, 4, resize="interpolate")(x, 4, grid=(2, 2))
    with pytest.raises(ValueError, match="grid"):  # a non-square target needs its grid
        LinearAligner(2, 4, in_grid=(2, 3), resize="interpolate")(x, 3)
    with pytest.raises(ValueError, match="resize"):
        LinearAligner(2, 4, resize="bilinear")
    with pytest.raises(ValueError, match="mode"):
        LinearAligner(2, 4, resize="interpolate", mode="trilinear")
    # the pooling default is unchanged: a grid changes nothing for resize="pool"
    pooled = LinearAligner(2, 4)
    torch.testing.assert_close(pooled(x, 3, grid=(1, 3)), pooled(x, 3))
