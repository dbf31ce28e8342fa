"""Property-based tests for the synapse mixers (``melfusion.synapse.mixers``).

The mixers blend image keys/values into music keys/values as
``music + a * (image - music)``. These tests check, over sizes, seeds, weights
and dtypes drawn by hypothesis, that the convex mixers stay between their
inputs, hit the endpoints bit for bit, agree with each other where they
should, keep shapes and dtypes, pass gradients to their parameters (through
the straight-through clamp too), reject bad arguments with a message naming
the argument, and restore their state after ``forced()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from melfusion.registry import REGISTRIES
from melfusion.synapse.mixers import (
    BoundedMixer,
    ConvexMixer,
    GatedMixer,
    PerHeadMixer,
    mix,
    straight_through_clamp,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONVEX = [ConvexMixer, PerHeadMixer, GatedMixer]
ALL = [*CONVEX, BoundedMixer]
#: the trainable parameters of each mixer, by attribute name
PARAMS = {
    ConvexMixer: ("alpha",),
    PerHeadMixer: ("alpha",),
    GatedMixer: ("gate_bias", "gate_weight"),
    BoundedMixer: ("a",),
}

FAST = settings(max_examples=30, deadline=None)
FEW = settings(max_examples=30, deadline=None)

seeds = st.integers(0, 2**31 - 2)
timesteps = st.none() | st.integers(0, 1000)


def _id(value) -> str:
    return getattr(value, "__name__", None) or str(value).replace("torch.", "")


@dataclass
class Setup:
    """Sizes for one mixer and one call of it."""

    num_layers: int
    num_heads: int | list[int]
    head_dim: int
    batch: int
    tokens: int
    layer: int
    seed: int

    @property
    def heads(self) -> int:
        """Head count of ``self.layer``."""
        return self.num_heads[self.layer] if isinstance(self.num_heads, list) else self.num_heads

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.tokens, self.head_dim)

    def make(self, cls, **kwargs):
        return cls(num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim, **kwargs)

    def tensors(self, dtype=torch.float32, scale: float = 100.0):
        """Independent uniform music and image tensors in [-scale, scale]."""
        return (
            uniform(self.shape, self.seed, scale).to(dtype),
            uniform(self.shape, self.seed + 1, scale).to(dtype),
        )

    def distinct_tensors(self, dtype=torch.float32, scale: float = 10.0):
        """Music and an image that differs from it everywhere (image - music >= 0.5 after rounding)."""
        music = uniform(self.shape, self.seed, scale).to(dtype)
        delta = 0.5 + uniform(self.shape, self.seed + 1, 0.5).abs()
        image = (music.float() + delta).to(dtype)
        assert (image.float() - music.float()).abs().min() > 0
        return music, image


@st.composite
def setups(draw, per_layer_heads: bool = True) -> Setup:
    num_layers = draw(st.integers(1, 5))
    if per_layer_heads and draw(st.booleans()):
        num_heads = draw(st.lists(st.integers(1, 4), min_size=num_layers, max_size=num_layers))
    else:
        num_heads = draw(st.integers(1, 4))
    return Setup(
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=draw(st.integers(1, 16)),
        batch=draw(st.integers(1, 3)),
        tokens=draw(st.integers(1, 40)),
        layer=draw(st.integers(0, num_layers - 1)),
        seed=draw(seeds),
    )


def uniform(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Float32 values uniform in [-scale, scale], reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) * 2 - 1) * scale


@torch.no_grad()
def randomise_(mixer, seed: int, low: float = -0.5, high: float = 1.5, weight_scale: float = 1.0):
    """Write random values into every parameter (the stored alphas may leave [0, 1])."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in mixer.named_parameters():
        values = torch.rand(p.shape, generator=gen) * (high - low) + low
        if name == "gate_weight":
            values = torch.randn(p.shape, generator=gen) * weight_scale
        p.copy_(values)
    return mixer


def assert_between(out: torch.Tensor, music: torch.Tensor, image: torch.Tensor) -> None:
    low, high = torch.minimum(music, image), torch.maximum(music, image)
    below, above = out < low, out > high
    assert not below.any(), f"{int(below.sum())} outputs below min(music, image)"
    assert not above.any(), f"{int(above.sum())} outputs above max(music, image)"


# ---------------------------------------------------------------------------------
# 1. convex mixers stay between their inputs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("cls", CONVEX, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds, timestep=timesteps, weight_scale=st.floats(0.0, 50.0))
def test_convex_output_between_inputs_random_params(cls, dtype, setup, alpha_seed, timestep, weight_scale):
    mixer = setup.make(cls)
    assert mixer.convex is True
    randomise_(mixer, alpha_seed, weight_scale=weight_scale)
    music, image = setup.tensors(dtype)
    with torch.no_grad():
        out = mixer(setup.layer, music, image, timestep=timestep)
    assert_between(out, music, image)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("cls", CONVEX, ids=_id)
@FAST
@given(setup=setups(), value=st.floats(0.0, 1.0), timestep=timesteps)
def test_convex_output_between_inputs_fill(cls, dtype, setup, value, timestep):
    mixer = setup.make(cls).fill_(value)
    music, image = setup.tensors(dtype)
    with torch.no_grad():
        out = mixer(setup.layer, music, image, timestep=timestep)
    assert_between(out, music, image)


def test_bounded_is_not_marked_convex():
    assert BoundedMixer.convex is False
    assert all(cls.convex is True for cls in CONVEX)


# ---------------------------------------------------------------------------------
# 2. endpoints are exact
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("cls", CONVEX, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds, timestep=timesteps)
def test_fill_endpoints_are_exact(cls, dtype, setup, alpha_seed, timestep):
    mixer = randomise_(setup.make(cls), alpha_seed)
    music, image = setup.tensors(dtype)
    with torch.no_grad():
        mixer.fill_(0.0)
        assert torch.equal(mixer(setup.layer, music, image, timestep=timestep), music)
        mixer.fill_(1.0)
        assert torch.equal(mixer(setup.layer, music, image, timestep=timestep), image)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds, timestep=timesteps)
def test_forced_endpoints_are_exact(cls, dtype, setup, alpha_seed, timestep):
    mixer = randomise_(setup.make(cls), alpha_seed)
    music, image = setup.tensors(dtype)
    with torch.no_grad():
        with mixer.forced(0.0):
            assert torch.equal(mixer(setup.layer, music, image, timestep=timestep), music)
        with mixer.forced(1.0):
            assert torch.equal(mixer(setup.layer, music, image, timestep=timestep), image)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds, rho=st.floats(1.01, 20.0))
def test_bounded_zero_gives_music_exactly(dtype, setup, alpha_seed, rho):
    music, image = setup.tensors(dtype)
    fresh = setup.make(BoundedMixer, rho=rho)
    with torch.no_grad():
        assert torch.equal(fresh(setup.layer, music, image), music)
        mixer = randomise_(setup.make(BoundedMixer, rho=rho), alpha_seed, low=-5.0, high=5.0)
        mixer.fill_(0.0)
        assert torch.equal(mixer(setup.layer, music, image), music)
    assert torch.equal(mixer.alphas(), torch.zeros(setup.num_layers))


@FAST
@given(
    rho=st.floats(1.01, 20.0),
    sign=st.sampled_from([-1.0, 1.0]),
    excess=st.floats(1.0, 10.0) | st.just(1.0),
)
def test_bounded_fill_outside_bound_raises(rho, sign, excess):
    mixer = BoundedMixer(num_layers=2, rho=rho)
    before = mixer.a.detach().clone()
    with pytest.raises(ValueError, match="value"):
        mixer.fill_(sign * excess / rho)
    assert torch.equal(mixer.a.detach(), before)


@FAST
@given(rho=st.floats(1.01, 20.0), fraction=st.floats(-0.9, 0.9))
def test_bounded_fill_round_trips(rho, fraction):
    mixer = BoundedMixer(num_layers=3, rho=rho).fill_(fraction / rho)
    assert torch.allclose(mixer.alphas(), torch.full((3,), fraction / rho), atol=1e-6)


@FAST
@given(rho=st.floats(1.01, 20.0), raw=st.lists(st.floats(-12.0, 12.0), min_size=1, max_size=5))
def test_bounded_alphas_strictly_inside_for_moderate_raw(rho, raw):
    mixer = BoundedMixer(num_layers=len(raw), rho=rho)
    with torch.no_grad():
        mixer.a.copy_(torch.tensor(raw))
    bound = 1.0 / rho
    for value in mixer.alphas().tolist():
        assert -bound < value < bound


@FAST
@given(
    rho=st.floats(1.01, 20.0),
    raw=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=5),
)
def test_bounded_alphas_never_exceed_bound_in_float32(rho, raw):
    # any raw parameter: once sigmoid saturates in float32, |f| lands on the bound (up to one float32
    # rounding, as documented) but never meaningfully past it
    mixer = BoundedMixer(num_layers=len(raw), rho=rho)
    with torch.no_grad():
        mixer.a.copy_(torch.tensor(raw))
    alphas = mixer.alphas()
    assert torch.isfinite(alphas).all()
    assert (alphas.double().abs() <= (1.0 / rho) * (1 + 1e-6)).all()


def test_bounded_fill_just_inside_bound_is_accepted():
    value = math.nextafter(0.2, 0.0)  # 0.19999999999999998 < 1/rho
    mixer = BoundedMixer(num_layers=1, rho=5.0)
    mixer.fill_(value)
    assert -0.2 <= mixer.alphas().item() <= 0.2 + 1e-7


# ---------------------------------------------------------------------------------
# 3. per-head with equal heads == convex
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(setup=setups(), alphas=st.lists(st.floats(-0.5, 1.5), min_size=5, max_size=5))
def test_per_head_with_equal_heads_equals_convex(dtype, setup, alphas):
    layer_alphas = torch.tensor(alphas[: setup.num_layers])
    convex = setup.make(ConvexMixer)
    per_head = setup.make(PerHeadMixer)
    with torch.no_grad():
        convex.alpha.copy_(layer_alphas)
        per_head.alpha.copy_(layer_alphas[:, None].expand_as(per_head.alpha))
        for layer in range(setup.num_layers):
            setup.layer = layer
            music, image = setup.tensors(dtype)
            a = convex(layer, music, image)
            b = per_head(layer, music, image)
            assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        per_head.alphas().nanmean(dim=1), convex.alphas(), rtol=0, atol=1e-7, equal_nan=False
    )


# ---------------------------------------------------------------------------------
# 4. shapes and dtypes
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds, timestep=timesteps)
def test_shape_and_dtype_preserved(cls, dtype, setup, alpha_seed, timestep):
    mixer = randomise_(setup.make(cls), alpha_seed)
    music, image = setup.tensors(dtype)
    out = mixer(setup.layer, music, image, timestep=timestep)
    assert out.shape == music.shape
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------
# 5. gradients, straight-through clamp, projection
# ---------------------------------------------------------------------------------


def _loss(out: torch.Tensor, music: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    # d loss / d a = sum((image - music)^2) > 0 whenever image != music
    return (out.float() * (image.float() - music.float())).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), timestep=st.integers(0, 1000))
def test_gradients_reach_parameters(cls, dtype, setup, timestep):
    mixer = setup.make(cls)
    music, image = setup.distinct_tensors(dtype)
    _loss(mixer(setup.layer, music, image, timestep=timestep), music, image).backward()
    for name in PARAMS[cls]:
        grad = getattr(mixer, name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    expected = ((image.float() - music.float()) ** 2).sum()
    rtol = 1e-4 if dtype is torch.float32 else 1e-2  # d loss / d out is rounded to the input dtype
    if cls is ConvexMixer:
        torch.testing.assert_close(mixer.alpha.grad[setup.layer], expected, rtol=rtol, atol=0)
        others = [i for i in range(setup.num_layers) if i != setup.layer]
        assert (mixer.alpha.grad[others] == 0).all()
    if cls is PerHeadMixer:
        used = mixer.alpha.grad[setup.layer, : setup.heads]
        assert (used > 0).all()
        torch.testing.assert_close(used.sum(), expected, rtol=rtol, atol=0)
        assert mixer.alpha.grad[setup.layer, setup.heads :].eq(0).all()
    if cls is GatedMixer:
        torch.testing.assert_close(mixer.gate_bias.grad[setup.layer], expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("cls", CONVEX, ids=_id)
@FAST
@given(setup=setups(), stored=st.floats(1.0, 5.0) | st.floats(-5.0, 0.0), dtype=st.sampled_from(DTYPES))
def test_straight_through_clamp_outside_unit_interval(cls, setup, stored, dtype):
    mixer = setup.make(cls).fill_(stored)
    if cls is GatedMixer:
        assert mixer.gate_bias[0].item() == pytest.approx(stored)
    else:
        assert (mixer.alpha.detach() == torch.tensor(stored)).all()
    music, image = setup.distinct_tensors(dtype)
    out = mixer(setup.layer, music, image, timestep=None)
    # forward uses the clamped value: at or past a bound the output is that endpoint exactly
    assert torch.equal(out, image if stored >= 1.0 else music)
    _loss(out, music, image).backward()
    param = mixer.gate_bias if cls is GatedMixer else mixer.alpha
    grad = param.grad[setup.layer]
    if cls is PerHeadMixer:
        grad = grad[: setup.heads]  # heads past this layer's count are unused
    assert torch.isfinite(grad).all() and (grad != 0).all()


@FAST
@given(
    values=st.lists(st.floats(-100.0, 100.0), min_size=1, max_size=20),
    bounds=st.tuples(st.floats(-10.0, 0.0), st.floats(0.0, 10.0)),
)
def test_straight_through_clamp_function(values, bounds):
    low, high = bounds
    x = torch.tensor(values, requires_grad=True)
    y = straight_through_clamp(x, low, high)
    assert torch.equal(y.detach(), x.detach().clamp(low, high))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds)
def test_project_clamps_stored_parameters(cls, setup, alpha_seed):
    mixer = randomise_(setup.make(cls), alpha_seed, low=-3.0, high=3.0)
    before = {name: p.detach().clone() for name, p in mixer.named_parameters()}
    alphas_before = mixer.alphas()
    mixer.project_()
    after = dict(mixer.named_parameters())
    projected = {ConvexMixer: {"alpha"}, PerHeadMixer: {"alpha"}, GatedMixer: {"gate_bias"}}.get(cls, set())
    for name, value in before.items():
        if name in projected:
            assert torch.equal(after[name].detach(), value.clamp(0.0, 1.0)), name
            assert ((after[name] >= 0) & (after[name] <= 1)).all(), name
        else:
            assert torch.equal(after[name].detach(), value), name
    # projection does not change the effective weights (they are clamped anyway)
    torch.testing.assert_close(mixer.alphas(), alphas_before, equal_nan=True, rtol=0, atol=0)


# ---------------------------------------------------------------------------------
# 6. gated mixer
# ---------------------------------------------------------------------------------


@FAST
@given(
    setup=setups(),
    t1=st.floats(0.0, 1.5),
    t2=st.floats(0.0, 1.5),
    feature_seed=seeds,
)
def test_gated_depends_on_timestep(setup, t1, t2, feature_seed):
    if abs(t1 - t2) < 0.05:
        t2 = t1 + 0.05 if t1 < 1.45 else t1 - 0.05
    mixer = setup.make(GatedMixer)
    time_dim = mixer.time_embedding_dim
    with torch.no_grad():
        gen = torch.Generator().manual_seed(feature_seed)
        mixer.gate_weight.copy_(torch.randn(mixer.gate_weight.shape, generator=gen) * 0.002)
        mixer.gate_weight[:, :time_dim] = 0.0
        # the first embedding entry is sin(t * 1): monotone on [0, pi/2]
        mixer.gate_weight[:, 0] = 0.2
    music, image = setup.distinct_tensors()
    with torch.no_grad():
        w1 = mixer.weight(setup.layer, music, image, torch.tensor(t1))
        w2 = mixer.weight(setup.layer, music, image, torch.tensor(t2))
        assert w1.shape == (setup.batch, 1, 1, 1)
        assert ((w1 > 0) & (w1 < 1)).all() and ((w2 > 0) & (w2 < 1)).all()
        expected = torch.full_like(w1, 0.2 * (math.sin(t1) - math.sin(t2)))
        torch.testing.assert_close(w1 - w2, expected, rtol=0, atol=1e-5)
        out1 = mixer(setup.layer, music, image, timestep=t1)
        out2 = mixer(setup.layer, music, image, timestep=t2)
    assert not torch.equal(out1, out2)
    assert (out1 != out2).all()


@FAST
@given(setup=setups(), weight_seed=seeds, data=st.data())
def test_gated_weight_is_per_sample(setup, weight_seed, data):
    mixer = setup.make(GatedMixer)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(weight_seed)
        mixer.gate_weight.copy_(torch.randn(mixer.gate_weight.shape, generator=gen) * 0.1)
    ts = torch.tensor(data.draw(st.lists(st.integers(0, 1000), min_size=setup.batch, max_size=setup.batch)))
    music, image = setup.tensors()
    with torch.no_grad():
        weight = mixer.weight(setup.layer, music, image, ts)
        assert weight.shape == (setup.batch, 1, 1, 1)
        out = mixer(setup.layer, music, image, timestep=ts)
        for i in range(setup.batch):
            one = slice(i, i + 1)
            alone_w = mixer.weight(setup.layer, music[one], image[one], ts[one])
            torch.testing.assert_close(alone_w, weight[one], rtol=0, atol=1e-6)
            alone = mixer(setup.layer, music[one], image[one], timestep=ts[one])
            torch.testing.assert_close(alone, out[one], rtol=1e-5, atol=1e-4)
            # the mix uses sample i's own weight
            torch.testing.assert_close(out[one], mix(music[one], image[one], weight[i]), rtol=0, atol=0)


@FAST
@given(setup=setups(), weight_seed=seeds, scale=st.floats(0.0, 1e3), timestep=timesteps)
def test_gated_weight_in_unit_interval_for_any_gates(setup, weight_seed, scale, timestep):
    mixer = setup.make(GatedMixer)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(weight_seed)
        mixer.gate_weight.copy_(torch.randn(mixer.gate_weight.shape, generator=gen) * scale)
        mixer.gate_bias.copy_(torch.randn(mixer.gate_bias.shape, generator=gen) * scale)
        music, image = setup.tensors()
        weight = mixer.weight(setup.layer, music, image, timestep)
    assert weight.shape == (setup.batch, 1, 1, 1)
    assert ((weight >= 0) & (weight <= 1)).all()
    assert ((mixer.alphas() >= 0) & (mixer.alphas() <= 1)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@FAST
@given(setup=setups(), init=st.floats(0.0, 1.0), timestep=timesteps, scale=st.floats(0.01, 100.0))
def test_gated_starts_at_init_for_all_inputs(dtype, setup, init, timestep, scale):
    mixer = setup.make(GatedMixer, init=init)
    music, image = setup.tensors(dtype, scale=scale)
    with torch.no_grad():
        weight = mixer.weight(setup.layer, music, image, timestep)
    expected = torch.tensor(init, dtype=torch.float32)
    assert (weight == expected).all()
    assert (mixer.alphas() == expected).all()


# ---------------------------------------------------------------------------------
# 7. bad arguments
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=_id)
@pytest.mark.parametrize("num_layers", [0, -1, 2.5, None])
def test_bad_num_layers(cls, num_layers):
    with pytest.raises(ValueError, match="num_layers"):
        cls(num_layers=num_layers, num_heads=2, head_dim=4)


@pytest.mark.parametrize("cls", CONVEX, ids=_id)
@FEW
@given(
    init=st.floats(1.0, 1e6, exclude_min=True) | st.floats(-1e6, 0.0, exclude_max=True) | st.just(math.nan)
)
def test_bad_init(cls, init):
    with pytest.raises(ValueError, match="init"):
        cls(num_layers=2, num_heads=2, head_dim=4, init=init)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (PerHeadMixer, {"num_heads": None}, "num_heads"),
        (GatedMixer, {"head_dim": None}, "head_dim"),
        (ConvexMixer, {"num_heads": [2, 2]}, "num_heads"),
        (ConvexMixer, {"num_heads": 0}, "num_heads"),
        (PerHeadMixer, {"num_heads": [2, 0, 1]}, "num_heads"),
        (ConvexMixer, {"head_dim": 0}, "head_dim"),
        (BoundedMixer, {"rho": 1.0}, "rho"),
        (BoundedMixer, {"rho": 0.5}, "rho"),
        (GatedMixer, {"time_embedding_dim": 7}, "time_embedding_dim"),
        (GatedMixer, {"time_embedding_dim": 0}, "time_embedding_dim"),
    ],
    ids=lambda v: _id(v) if isinstance(v, type) else None,
)
def test_bad_constructor_arguments(cls, kwargs, match):
    params = {"num_layers": 3, "num_heads": 2, "head_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**params)


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), axis=st.integers(0, 3), extra=st.integers(1, 3), forced=st.booleans())
def test_shape_mismatch_raises(cls, setup, axis, extra, forced):
    mixer = setup.make(cls)
    music, _ = setup.tensors()
    bad_shape = list(music.shape)
    bad_shape[axis] += extra  # music stays valid for the layer; only the image is off
    image = torch.zeros(bad_shape)
    with pytest.raises(ValueError, match="image") as info:
        if forced:
            with mixer.forced(0.5):
                mixer(setup.layer, music, image)
        else:
            mixer(setup.layer, music, image)
    assert "music" in str(info.value)


def test_gated_batch_mismatch_raises_value_error():
    mixer = GatedMixer(num_layers=2, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="image"):
        mixer(0, torch.zeros(2, 2, 5, 8), torch.zeros(1, 2, 5, 8))


def test_gated_head_dim_mismatch_raises_value_error():
    mixer = GatedMixer(num_layers=2, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="image"):
        mixer(0, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 4))


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), offset=st.integers(0, 10), negative=st.booleans())
def test_layer_out_of_range_raises(cls, setup, offset, negative):
    mixer = setup.make(cls)
    music, image = setup.tensors()
    layer = -1 - offset if negative else setup.num_layers + offset
    with pytest.raises(IndexError, match="layer"):
        mixer(layer, music, image)


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), extra=st.integers(1, 3), fewer=st.booleans())
def test_wrong_head_count_raises(cls, setup, extra, fewer):
    mixer = setup.make(cls)
    heads = setup.heads - extra if fewer and setup.heads > extra else setup.heads + extra
    shape = (setup.batch, heads, setup.tokens, setup.head_dim)
    music, image = uniform(shape, setup.seed), uniform(shape, setup.seed + 1)
    with pytest.raises(ValueError, match="music") as info:
        mixer(setup.layer, music, image)
    assert "heads" in str(info.value)


def test_gated_wrong_head_dim_raises():
    mixer = GatedMixer(num_layers=2, num_heads=2, head_dim=8)
    x = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="head_dim"):
        mixer(0, x, x)


@pytest.mark.parametrize("batch", [1, 3])
def test_gated_wrong_timestep_count_raises(batch):
    mixer = GatedMixer(num_layers=1, num_heads=1, head_dim=4)
    x = torch.zeros(batch, 1, 3, 4)
    with pytest.raises(ValueError, match="timestep"):
        mixer(0, x, x, timestep=torch.arange(batch + 1))


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FEW
@given(num_layers=st.integers(1, 5), wrong=st.integers(0, 6))
def test_forced_wrong_length_raises(cls, num_layers, wrong):
    if wrong == num_layers:
        wrong += 1
    mixer = cls(num_layers=num_layers, num_heads=2, head_dim=4)
    before = mixer.alphas()
    with pytest.raises(ValueError, match="value"):
        with mixer.forced(torch.zeros(wrong)):
            pass
    torch.testing.assert_close(mixer.alphas(), before, equal_nan=True, rtol=0, atol=0)


# ---------------------------------------------------------------------------------
# 8. alphas() and forced()
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(setup=setups(), alpha_seed=seeds)
def test_alphas_shape_values_and_detached(cls, setup, alpha_seed):
    mixer = randomise_(setup.make(cls), alpha_seed, low=-2.0, high=2.0)
    alphas = mixer.alphas()
    assert not alphas.requires_grad and alphas.grad_fn is None
    if cls is PerHeadMixer:
        heads = setup.num_heads if isinstance(setup.num_heads, list) else [setup.num_heads] * setup.num_layers
        assert alphas.shape == (setup.num_layers, max(heads))
        for layer, h in enumerate(heads):
            torch.testing.assert_close(alphas[layer, :h], mixer.alpha[layer, :h].detach().clamp(0, 1))
            assert torch.isnan(alphas[layer, h:]).all()
    else:
        assert alphas.shape == (setup.num_layers,)
        if cls is BoundedMixer:
            expected = (2 * torch.sigmoid(mixer.a.detach()) - 1) / mixer.rho
        else:
            stored = mixer.alpha if cls is ConvexMixer else mixer.gate_bias
            expected = stored.detach().clamp(0, 1)
        torch.testing.assert_close(alphas, expected)
    # a detached copy: writing into it leaves the mixer alone
    snapshot = alphas.clone()
    alphas.fill_(0.123)
    torch.testing.assert_close(mixer.alphas(), snapshot, equal_nan=True)


@pytest.mark.parametrize("cls", [ConvexMixer, GatedMixer, BoundedMixer], ids=_id)
@FEW
@given(setup=setups(), values=st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5))
def test_alphas_inside_forced_block(cls, setup, values):
    mixer = setup.make(cls)
    forced = torch.tensor(values[: setup.num_layers])
    with mixer.forced(forced):
        assert torch.equal(mixer.alphas(), forced)
        assert not mixer.alphas().requires_grad


def test_per_head_alphas_shape_inside_forced():
    mixer = PerHeadMixer(num_layers=2, num_heads=[2, 3])
    assert mixer.alphas().shape == (2, 3)
    with mixer.forced(0.3):
        assert mixer.alphas().shape == (2, 3)


@pytest.mark.parametrize("cls", ALL, ids=_id)
@FAST
@given(
    setup=setups(),
    alpha_seed=seeds,
    values=st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5),
    outer=st.floats(0.0, 1.0),
)
def test_forced_uses_values_and_restores(cls, setup, alpha_seed, values, outer):
    mixer = randomise_(setup.make(cls), alpha_seed)
    music, image = setup.tensors()
    forced = torch.tensor(values[: setup.num_layers])
    with torch.no_grad():
        before_out = mixer(setup.layer, music, image)
        before_alphas = mixer.alphas()
        with mixer.forced(outer):
            outer_out = mixer(setup.layer, music, image)
            with mixer.forced(forced):
                inner = mixer(setup.layer, music, image)
                assert torch.equal(inner, mix(music, image, forced[setup.layer]))
            # leaving the inner block restores the outer forcing
            assert torch.equal(mixer(setup.layer, music, image), outer_out)
        assert torch.equal(outer_out, mix(music, image, torch.tensor(outer)))
        assert torch.equal(mixer(setup.layer, music, image), before_out)
        torch.testing.assert_close(mixer.alphas(), before_alphas, equal_nan=True, rtol=0, atol=0)

        with pytest.raises(RuntimeError, match="boom"):
            with mixer.forced(forced):
                raise RuntimeError("boom")
        assert torch.equal(mixer(setup.layer, music, image), before_out)
        torch.testing.assert_close(mixer.alphas(), before_alphas, equal_nan=True, rtol=0, atol=0)


# ---------------------------------------------------------------------------------
# 9. registry
# ---------------------------------------------------------------------------------


def test_registry_names_include_all_mixers():
    names = REGISTRIES["mixer"].names()
    for name in ("convex", "per_head", "gated", "bounded"):
        assert name in names
    assert REGISTRIES["mixer"].get("convex") is ConvexMixer
    assert REGISTRIES["mixer"].get("per_head") is PerHeadMixer
    assert REGISTRIES["mixer"].get("gated") is GatedMixer
    assert REGISTRIES["mixer"].get("bounded") is BoundedMixer


@pytest.mark.parametrize("name", ["convex", "per_head", "gated", "bounded"])
def test_registry_build_ignores_extra_kwargs(name):
    mixer = REGISTRIES["mixer"].build(name, num_layers=3, num_heads=4, head_dim=8, some_unused_kw=1)
    assert mixer.num_layers == 3 and mixer.heads == [4, 4, 4] and mixer.head_dim == 8
    x = uniform((2, 4, 5, 8), 0)
    assert mixer(2, x, x).shape == x.shape
