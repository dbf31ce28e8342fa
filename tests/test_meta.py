"""The paper's full-size pairing, built on the meta device (no weights, no memory)."""

import torch
from diffusers import UNet2DConditionModel

import melfusion as mf
from melfusion.presets import load_json
from melfusion.synapse import decoder_layers, probe_layers


def _meta_unet(name):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(load_json(name))


def test_paper_unets_parameter_counts():
    assert sum(p.numel() for p in _meta_unet("sd21_unet").parameters()) == 865_910_724
    assert sum(p.numel() for p in _meta_unet("tango_unet").parameters()) == 865_933_768


def test_paper_pairing_has_nine_decoder_layers():
    cfg = mf.MelFusionConfig.preset("paper")
    fs = cfg.feature_source.build(weights=False, device="meta")
    den = cfg.denoiser.build(weights=False, device="meta")
    assert next(fs.unet.parameters()).device.type == "meta"

    codec = cfg.codec.build(weights=False, device="meta")
    syn = mf.MelFusion.build_synapse(cfg, fs, den, codec)
    rows = syn.wiring()
    expected_layers = [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in (0, 1, 2)]
    assert [r["image_layer"] for r in rows] == expected_layers
    assert [r["music_layer"] for r in rows] == expected_layers
    assert [r["heads"] for r in rows] == [20] * 3 + [10] * 3 + [5] * 3
    assert {r["head_dim"] for r in rows} == {64}
    assert [r["image_tokens"] for r in rows] == [576] * 3 + [2304] * 3 + [9216] * 3
    assert sum(p.numel() for p in syn.parameters()) == 9  # one alpha per layer


def test_probe_music_self_attention_grid():
    unet = _meta_unet("tango_unet")
    infos = probe_layers(unet, decoder_layers(unet), "attn1", (8, 256, 16))
    assert [i.grid for i in infos[::3]] == [(64, 4), (128, 8), (256, 16)]
    assert [i.tokens for i in infos[::3]] == [256, 1024, 4096]
