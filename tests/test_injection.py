"""Injection points: the paper's K/V mixing (``injection: kv``) and the released code's context mixing.

The released code (github.com/schowdhury671/melfusion, ``diffusers/src/diffusers/models/attention_processor.py``,
``AttnProcessor2_0``) mixes each image-UNet decoder layer's cross-attention output ``e``, adaptively
average-pooled onto the text context's tokens and width, into the music layer's text context before its key/value
projections: ``c <- (1 - f) c + f e`` with ``f = (2 sigmoid(a) - 1) / 5``. Here: the views that tap and mix,
exact no-ops at ``f = 0``, the relation to K/V mixing, the pooling's parity with ``nn.AdaptiveAvgPool2d``, the
``reference`` preset on the meta device, and a tiny context-injection model that generates, trains and saves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import melfusion as mf
from melfusion.config import PRESETS
from melfusion.synapse import (
    BoundedMixer,
    ConvexMixer,
    PoolAligner,
    capture,
    install,
    layer_info,
    probe_layers,
    split_view,
    with_view,
)
from melfusion.synapse.install import install_hook

IMAGE = "examples/images/blue-bright.png"
OTHER_IMAGE = "examples/images/red-dark.png"
TEXT = "a calm flute melody"
LAYERS = ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]  # the decoder layers of conftest's UNet
CONTEXT = [f"{n}.attn2:context" for n in LAYERS]
OUTPUT = [f"{n}.attn2:output" for n in LAYERS]
FAST = settings(max_examples=40, deadline=None)


def _inputs(seed=1, batch=2, tokens=5, dim=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(10), torch.randn(batch, tokens, dim, generator=g))


def _attn2(unet, layer):
    return dict(unet.named_modules())[layer].transformer_blocks[0].attn2


# -- views: what a name taps or mixes -----------------------------------------------------------------------
def test_views_name_the_attention_and_what_is_taken():
    assert split_view("up_blocks.1.attentions.0") == ("up_blocks.1.attentions.0", None)
    assert split_view("up_blocks.1.attentions.0.attn2:output") == ("up_blocks.1.attentions.0.attn2", "output")
    assert with_view("up_blocks.1.attentions.0", "attn2", "context") == "up_blocks.1.attentions.0.attn2:context"
    assert with_view("transformer_blocks.3.attn2", "attn1", "context") == "transformer_blocks.3.attn2:context"
    assert with_view("x.attn1:output", "attn2", "output") == "x.attn1:output"  # a view is kept
    with pytest.raises(ValueError, match="view in output, context"):
        split_view("up_blocks.1.attentions.0:keys")


def test_views_are_one_head_as_wide_as_what_they_see(unet):
    out = layer_info(unet, OUTPUT[0])
    ctx = layer_info(unet, CONTEXT[0])
    attn = _attn2(unet, LAYERS[0])
    assert (out.heads, out.head_dim) == (1, attn.to_out[0].out_features)
    assert (ctx.heads, ctx.head_dim) == (1, 16)  # the cross-attention (text) width
    full = "up_blocks.1.attentions.0.transformer_blocks.0.attn2:context"  # an attention path works too
    assert layer_info(unet, full).head_dim == 16
    with pytest.raises(ValueError, match="layers"):
        layer_info(unet, "up_blocks.1.attentions.0:context")


@torch.no_grad()
def test_output_tap_records_the_attention_output_and_changes_nothing(unet):
    x, t, ctx = _inputs()
    reference = unet(x, t, ctx).sample
    seen = {}
    hooks = [_attn2(unet, n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n in LAYERS]
    with capture(unet, OUTPUT) as handle:
        assert torch.equal(unet(x, t, ctx).sample, reference)
    for h in hooks:
        h.remove()
    for name, tap in zip(LAYERS, OUTPUT, strict=True):
        k, v = handle.records[tap]
        assert k is v and k.shape == (2, 1, 64, 32)  # (batch, 1, 8x8 query tokens, channels)
        assert torch.equal(k[:, 0], seen[name])


@torch.no_grad()
def test_probe_gives_output_taps_their_tokens_and_context_points_none(unet):
    out = probe_layers(unet, OUTPUT, "attn1", (4, 8, 8))
    assert [(i.tokens, i.grid) for i in out] == [(64, (8, 8))] * 2
    ctx = probe_layers(unet, CONTEXT, "attn2", (4, 8, 8))
    assert [(i.heads, i.head_dim, i.tokens, i.grid) for i in ctx] == [(1, 16, None, None)] * 2
    with pytest.raises(ValueError, match="text context"):
        probe_layers(unet, ["up_blocks.1.attentions.0.attn1:context"], "attn1", (4, 8, 8))


# -- context injection on a UNet ----------------------------------------------------------------------------
def _context_features(batch=2, tokens=5, dim=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in CONTEXT:
        e = torch.randn(batch, 1, tokens, dim, generator=g)
        out[name] = (e, e)
    return out


@torch.no_grad()
def test_context_injection_at_f_zero_is_exactly_the_text_only_unet(unet):
    x, t, ctx = _inputs()
    reference = unet(x, t, ctx).sample
    mixer = BoundedMixer(num_layers=2, num_heads=1, head_dim=16)  # a = 0: f = 0, as the released code starts
    with install(unet, mixer, layers=CONTEXT) as handle:
        assert torch.equal(unet(x, t, ctx).sample, reference)  # no features: the original processors run
        with handle.context(_context_features(), timestep=t):
            assert torch.equal(unet(x, t, ctx).sample, reference)  # features at f = 0: the same bits
            mixer.fill_(0.1)
            assert (unet(x, t, ctx).sample - reference).abs().max() > 1e-4
        with handle.context(_context_features(), image_rows=torch.tensor([False, True])):
            rows = unet(x, t, ctx).sample
        assert torch.equal(rows[0], reference[0])  # the row without the image keeps its text context
    assert all(not isinstance(p, mf.synapse.InjectProcessor) for p in unet.attn_processors.values())


@torch.no_grad()
@pytest.mark.parametrize("f", [0.05, -0.17])
def test_context_mixing_is_kv_mixing_of_the_projected_image(unet, f):
    """``to_k``/``to_v`` are linear and ``(1 - f) + f = 1``: ``to_k((1 - f) c + f e) = (1 - f) to_k(c) + f to_k(e)``,
    so the context point equals a K/V mix of the projected image output (without ``norm_cross``)."""
    x, t, ctx = _inputs()
    feats = _context_features()
    kv = {}
    for layer, point in zip(LAYERS, CONTEXT, strict=True):
        attn, e = _attn2(unet, layer), feats[point][0][:, 0]
        split = lambda y, a=attn: y.unflatten(-1, (a.heads, -1)).transpose(1, 2)  # noqa: E731
        kv[layer] = (split(attn.to_k(e)), split(attn.to_v(e)))
    heads = [layer_info(unet, n).heads for n in LAYERS]
    with install(unet, BoundedMixer(2, num_heads=1, head_dim=16).fill_(f), layers=CONTEXT) as h:
        with h.context(feats):
            by_context = unet(x, t, ctx).sample
    with install(unet, BoundedMixer(2, num_heads=heads).fill_(f), layers=LAYERS) as h:
        with h.context(kv):
            by_kv = unet(x, t, ctx).sample
    torch.testing.assert_close(by_context, by_kv, rtol=0, atol=2e-5)


@torch.no_grad()
def test_context_points_are_refused_where_there_is_no_text_and_output_taps_cannot_be_mixed_into(unet):
    x, t, ctx = _inputs()
    name = "up_blocks.1.attentions.0.attn1:context"  # self-attention: no text context to mix into
    e = torch.zeros(2, 1, 64, 32)
    with install(unet, ConvexMixer(1), layers=[name]) as handle, handle.context({name: (e, e)}):
        with pytest.raises(ValueError, match="needs a cross-attention"):
            unet(x, t, ctx)
    with pytest.raises(ValueError, match="image tap"):
        install_hook(unet, lambda n, k, v: (k, v), OUTPUT[:1])


# -- the mixing and pooling math ------------------------------------------------------------------------------
def _tensor(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale


@FAST
@given(a=st.floats(-30, 30), rho=st.floats(1.5, 20), tokens=st.integers(1, 6), dim=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_context_mix_is_bounded_affine_in_f_and_the_identity_at_zero(a, rho, tokens, dim, seed):
    c, e = _tensor((2, 1, tokens, dim), seed), _tensor((2, 1, tokens, dim), seed + 1)
    mixer = BoundedMixer(num_layers=1, num_heads=1, head_dim=dim, rho=rho).double()
    with torch.no_grad():
        mixer.a.fill_(a)
    f = float(mixer.alphas()[0])
    assert abs(f) <= 1 / rho  # (2 sigmoid(a) - 1) / rho = tanh(a / 2) / rho
    assert f == pytest.approx((2 * torch.sigmoid(torch.tensor(a, dtype=torch.float64)).item() - 1) / rho, abs=1e-12)
    out = mixer(0, c, e)
    torch.testing.assert_close(out, (1 - f) * c + f * e, rtol=0, atol=1e-12)  # the released code's formula
    assert bool(((out - c).abs() <= abs(f) * (e - c).abs() + 1e-12).all())  # moves at most |f| of the way
    with torch.no_grad():
        mixer.a.zero_()
    assert torch.equal(mixer(0, c, e), c)  # f = 0: the text context itself, bit for bit
    # affine in f: the change between two weights is their difference times (e - c)
    with mixer.forced(0.125):  # (forced weights are float32: these two are exact)
        one = mixer(0, c, e)
    with mixer.forced(-0.0625):
        two = mixer(0, c, e)
    torch.testing.assert_close(one - two, 0.1875 * (e - c), rtol=0, atol=1e-12)


@FAST
@given(n=st.integers(1, 40), channels=st.integers(1, 48), tokens=st.integers(1, 12), width=st.integers(1, 48),
       seed=st.integers(0, 2**16))
def test_pooling_onto_the_context_matches_the_released_codes_adaptive_avg_pool2d(n, channels, tokens, width, seed):
    x = _tensor((2, 1, n, channels), seed).float()
    aligner = PoolAligner(in_heads=1, in_head_dim=channels, out_heads=1, out_head_dim=width, pool_channels=True)
    out = aligner(x, tokens)
    expected = nn.AdaptiveAvgPool2d((tokens, width))(x[:, 0])  # the released code's op on (batch, n, channels)
    assert out.shape == (2, 1, tokens, width)
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-5)
    if (n, channels) == (tokens, width):
        assert out is x


def test_pool_keeps_refusing_width_changes_unless_asked():
    with pytest.raises(ValueError, match="linear"):
        PoolAligner(in_heads=1, in_head_dim=64, out_heads=1, out_head_dim=32)
    with pytest.raises(ValueError, match="pool_channels"):
        mf.MelFusionConfig.preset("tiny").synapse.aligner.model_validate({"name": "pool", "params":
                                                                          {"pool_channels": "yes"}}).build(
            in_heads=1, in_head_dim=2)


# -- config and presets ---------------------------------------------------------------------------------------
def test_reference_preset_takes_the_released_codes_injection_point():
    syn = mf.MelFusionConfig.preset("reference").synapse
    assert (syn.injection, syn.image_attention, syn.music_attention) == ("context", "attn2", "attn2")
    assert (syn.mixer.name, syn.mixer.params) == ("bounded", {"rho": 5.0})
    assert (syn.aligner.name, syn.aligner.params) == ("pool", {"pool_channels": True})
    again = mf.MelFusionConfig.from_json(mf.MelFusionConfig.preset("reference").to_json())
    assert again.synapse == syn


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"reference"}))
def test_other_presets_keep_the_papers_kv_injection(name):
    assert mf.MelFusionConfig.preset(name).synapse.injection == "kv"


@pytest.mark.parametrize("synapse, field", [
    ({"injection": "keys"}, "injection"),
    ({"image_layers": ["up_blocks.1.attentions.0.attn2:output"]}, "image_layers"),  # kv takes no views
    ({"injection": "context", "image_layers": ["up_blocks.1.attentions.0.attn2:context"]}, "image_layers"),
    ({"injection": "context", "music_layers": ["up_blocks.1.attentions.0.attn2:output"]}, "music_layers"),
    ({"injection": "context", "pairs": [["a.attn2:output", "b.attn2:output"]]}, "pairs: music_layers"),
])
def test_injection_config_errors_name_the_field(synapse, field):
    with pytest.raises(ValueError, match=field):
        mf.config.SynapseConfig.model_validate(synapse)


def test_reference_builds_on_the_meta_device_with_nine_context_points(capsys):
    model = mf.MelFusion.from_config("reference", weights=False, device="meta")
    rows = model.synapse.wiring()
    layers = [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in (0, 1, 2)]
    assert [r["image_layer"] for r in rows] == [f"{n}.attn2:output" for n in layers]
    assert [r["music_layer"] for r in rows] == [f"{n}.attn2:context" for n in layers]
    assert [r["head_dim"] for r in rows] == ["1280->1024"] * 3 + ["640->1024"] * 3 + ["320->1024"] * 3
    assert [r["image_tokens"] for r in rows] == [576] * 3 + [2304] * 3 + [9216] * 3
    assert sum(p.numel() for p in model.synapse.parameters()) == 9  # one a per layer; pooling learns nothing
    from melfusion.cli import main

    assert main(["inspect", "--preset", "reference"]) == 0
    printed = capsys.readouterr().out
    assert "up_blocks.3.attentions.2.attn2:context" in printed and "9 layer pairs" in printed


# -- a tiny context-injection model: generate, train, save ------------------------------------------------------
def tiny_context_config(image_attention: str = "attn2", **synapse) -> mf.MelFusionConfig:
    data = mf.MelFusionConfig.preset("tiny").to_dict()
    data["name"] = "tiny_context"
    data["synapse"].update(injection="context", image_attention=image_attention, image_trajectory="noise",
                           mixer={"name": "bounded", "params": {"rho": 5.0}},
                           aligner={"name": "pool", "params": {"pool_channels": True}}, **synapse)
    return mf.MelFusionConfig.model_validate(data)


def test_explicit_pairs_of_plain_layer_names_find_their_views():
    pairs = [["up_blocks.1.attentions.1", "up_blocks.0.attentions.0"],
             ["up_blocks.1.attentions.0.attn2:output", "up_blocks.0.attentions.1"]]
    model = mf.MelFusion.from_config(tiny_context_config(pairs=pairs), weights=False, device="meta")
    assert [(p.image.name, p.music.name) for p in model.synapse.pairs] == [
        ("up_blocks.1.attentions.1.attn2:output", "up_blocks.0.attentions.0.attn2:context"),
        ("up_blocks.1.attentions.0.attn2:output", "up_blocks.0.attentions.1.attn2:context")]


@pytest.fixture(scope="module")
def tiny_context():
    torch.manual_seed(0)
    return mf.MelFusion.from_config(tiny_context_config())


def _generate(model, image=IMAGE, **kw):
    return model.generate(image=image, text=TEXT, num_inference_steps=2, seed=3, progress=False, **kw).waveforms


def test_tiny_context_model_starts_as_the_text_only_model(tiny_context):
    assert [p.music.name for p in tiny_context.synapse.pairs] == [
        "up_blocks.0.attentions.0.attn2:context", "up_blocks.0.attentions.1.attn2:context"]
    assert tiny_context.synapse.mixer.alphas().tolist() == [0.0, 0.0]
    text_only = _generate(tiny_context, image=None)
    assert np.array_equal(_generate(tiny_context), text_only)  # f = 0 at init: the same bits
    with tiny_context.synapse.mixer.forced(0.15):
        assert np.abs(_generate(tiny_context) - text_only).max() > 1e-3


def test_attn2_taps_carry_the_image_through_the_image_models_text_context(tiny_context):
    """The released code's image UNet cross-attends to the music prompt; this library's feature source gives it
    its empty-prompt embedding, zeros unless set, and over zeros an attention's output is its ``to_out`` bias,
    the same for every image. With a nonzero context the taps tell images apart (docs/extending.md)."""
    model, fs = tiny_context, tiny_context.feature_source

    def taps(image):
        return model.image_features(mf.images.load_images(image, "image"), [500], text_tokens=4).at(500)

    saved = fs.null_text.clone()
    first, second = taps(IMAGE), taps(OTHER_IMAGE)
    if not bool(saved.any()):
        assert all(torch.equal(first[k][0], second[k][0]) for k in first)
    try:
        fs.null_text = torch.randn(saved.shape, generator=torch.Generator().manual_seed(0))
        model.feature_cache.clear()
        first, second = taps(IMAGE), taps(OTHER_IMAGE)
        assert all((first[k][0] - second[k][0]).abs().max() > 1e-4 for k in first)
    finally:
        fs.null_text = saved
        model.feature_cache.clear()


def test_tiny_context_model_trains_and_the_gradient_reaches_the_mixer(tmp_path):
    from melfusion.datasets import write_toy_manifest
    from melfusion.training import TrainConfig, Trainer

    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    cfg = TrainConfig.model_validate({
        "model": tiny_context_config("attn1").to_dict(), "data": {"manifest": str(manifest)},
        "output": str(tmp_path / "run"), "batch_size": 2, "max_steps": 3, "checkpoint_every": 3, "log_every": 1,
        "progress": False, "tensorboard": False, "plot": False, "mode": "alphas", "optim": {"alpha_lr": 1e-1}})
    trainer = Trainer(cfg)
    assert trainer._alphas() == [0.0, 0.0]
    result = trainer.train()
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    assert all(abs(a) > 1e-4 for a in trainer._alphas())  # the loss's gradient reached each layer's a
    loaded = mf.MelFusion.from_pretrained(result.model_path)
    assert loaded.config.synapse.injection == "context"
    assert loaded.synapse.mixer.alphas().tolist() == pytest.approx(trainer._alphas(), abs=1e-7)


def test_tiny_context_model_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(1)
    model = mf.MelFusion.from_config(tiny_context_config("attn1"))
    with torch.no_grad():
        model.synapse.mixer.a.copy_(torch.tensor([3.0, -2.0]))  # f = 0.18, -0.15
    before = _generate(model)
    loaded = mf.MelFusion.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert loaded.config == model.config and loaded.config.synapse.injection == "context"
    assert [p.image.name for p in loaded.synapse.pairs] == [p.image.name for p in model.synapse.pairs]
    assert torch.equal(loaded.synapse.mixer.a, model.synapse.mixer.a)
    assert np.array_equal(_generate(loaded), before)
    assert np.abs(_generate(loaded, image=OTHER_IMAGE) - before).max() > 1e-5  # attn1 taps see the image
