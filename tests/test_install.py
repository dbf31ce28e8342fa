"""Installing the synapse on a stock diffusers UNet: exact no-op cases, removal, capture correctness."""

import pytest
import torch

import melfusion as mf
from melfusion.synapse import capture, decoder_layers, install, layer_info


def _inputs(seed=1, batch=2, tokens=5, dim=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(10), torch.randn(batch, tokens, dim, generator=g))


def _features(unet, layers, batch=2, tokens=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        info = layer_info(unet, name)
        shape = (batch, info.heads, tokens, info.head_dim)
        out[name] = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return out


@torch.no_grad()
@pytest.mark.parametrize("mixer_name", ["convex", "per_head", "gated", "bounded"])
def test_alpha_zero_and_no_features_are_noops(unet, mixer_name):
    x, t, ctx = _inputs()
    reference = unet(x, t, ctx).sample
    layers = decoder_layers(unet)
    infos = [layer_info(unet, n) for n in layers]
    mixer = mf.registry.build("mixer", mixer_name, num_layers=len(layers), num_heads=[i.heads for i in infos],
                              head_dim=infos[0].head_dim)
    handle = install(unet, mixer, layers=layers)
    assert (unet(x, t, ctx).sample - reference).abs().max() <= 1e-6  # no image features given
    feats = _features(unet, layers)
    mixer.fill_(0.0)
    with handle.context(feats, timestep=t):
        assert (unet(x, t, ctx).sample - reference).abs().max() <= 1e-6
    with mixer.forced(0.0), handle.context(feats, timestep=t):
        assert (unet(x, t, ctx).sample - reference).abs().max() <= 1e-6
    handle.remove()


@torch.no_grad()
def test_nonzero_alpha_changes_output_and_rows_mask(unet):
    x, t, ctx = _inputs()
    reference = unet(x, t, ctx).sample
    layers = decoder_layers(unet)
    mixer = mf.synapse.ConvexMixer(num_layers=len(layers), init=0.7)
    handle = install(unet, mixer, layers=layers)
    feats = _features(unet, layers)
    with handle.context(feats):
        mixed = unet(x, t, ctx).sample
    assert (mixed - reference).abs().max() > 1e-3
    # only row 1 receives the image: row 0 is unchanged
    with handle.context(feats, image_rows=torch.tensor([False, True])):
        partial = unet(x, t, ctx).sample
    assert (partial[0] - reference[0]).abs().max() <= 1e-6
    assert torch.allclose(partial[1], mixed[1], atol=1e-6)
    handle.remove()


def test_remove_restores_original_processors_and_state_dict(unet):
    before = dict(unet.attn_processors)
    keys = list(unet.state_dict())
    handle = install(unet, mf.synapse.ConvexMixer(num_layers=2))
    assert any(p is not before[k] for k, p in unet.attn_processors.items())
    assert list(unet.state_dict()) == keys  # the synapse's parameters live outside the UNet
    handle.remove()
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    handle.remove()  # idempotent


def test_install_errors_name_the_argument(unet):
    with pytest.raises(ValueError, match="layers"):
        install(unet, mf.synapse.ConvexMixer(num_layers=1), layers=["up_blocks.9.attentions.0"])
    with pytest.raises(ValueError, match="mixer: built for 3 layers"):
        install(unet, mf.synapse.ConvexMixer(num_layers=3))
    handle = install(unet, mf.synapse.ConvexMixer(num_layers=2))
    with pytest.raises(ValueError, match="features"):
        handle.set_features({"down_blocks.0.attentions.0": (torch.zeros(1), torch.zeros(1))})
    handle.remove()


@torch.no_grad()
def test_mismatched_features_give_clear_error(unet):
    x, t, ctx = _inputs()
    layers = decoder_layers(unet)
    handle = install(unet, mf.synapse.ConvexMixer(num_layers=2), layers=layers)
    feats = _features(unet, layers, tokens=7)  # text has 5 tokens and no aligner is installed
    with handle.context(feats), pytest.raises(ValueError, match="configure an aligner"):
        unet(x, t, ctx)
    handle.remove()
    handle = install(unet, mf.synapse.ConvexMixer(num_layers=2), layers=layers, aligners="pool")
    with handle.context(feats):
        assert torch.isfinite(unet(x, t, ctx).sample).all()
    handle.remove()


@torch.no_grad()
def test_captured_keys_equal_to_k_of_normalised_input(unet):
    x, t, ctx = _inputs()
    layers = decoder_layers(unet)
    normed = {}
    hooks = []
    for name in layers:
        block = dict(unet.named_modules())[name].transformer_blocks[0]
        hooks.append(block.norm1.register_forward_hook(lambda m, a, out, n=name: normed.__setitem__(n, out)))
    handle = capture(unet, layers)
    unet(x, t, ctx)
    handle.remove()
    for h in hooks:
        h.remove()
    for name in layers:
        attn = dict(unet.named_modules())[name].transformer_blocks[0].attn1
        keys, values = handle.records[name]
        heads = attn.heads
        batch, tokens, _ = normed[name].shape
        expected_k = attn.to_k(normed[name]).view(batch, tokens, heads, -1).permute(0, 2, 1, 3)
        expected_v = attn.to_v(normed[name]).view(batch, tokens, heads, -1).permute(0, 2, 1, 3)
        assert keys.shape == (batch, heads, tokens, attn.to_k.out_features // heads)
        torch.testing.assert_close(keys, expected_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(values, expected_v, rtol=0, atol=1e-6)


@torch.no_grad()
def test_capture_does_not_change_output(unet):
    x, t, ctx = _inputs()
    reference = unet(x, t, ctx).sample
    with capture(unet):
        assert (unet(x, t, ctx).sample - reference).abs().max() <= 1e-6


def test_transformer_layers_list_encoder_middle_and_decoder_in_forward_order():
    from melfusion.synapse.install import transformer_layers

    fs = mf.MelFusionConfig.preset("mini").feature_source.build()
    names = transformer_layers(fs.unet)
    assert names == ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0",
                     "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0",
                     "up_blocks.1.attentions.1"]
    assert [n for n in names if n.startswith("up_blocks")] == decoder_layers(fs.unet)
    # the feature source offers exactly these, and accepts every one of them
    assert fs.available_layers() == names
    fs.select_layers(fs.available_layers())
    assert [layer.name for layer in fs.layers] == names
