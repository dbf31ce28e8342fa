"""The published checkpoints' layouts and settings, pinned (docs/checkpoints.md says where each fact comes from).

Full-size architectures are built on the meta device (no memory); the conversions from the upstream key names
run on meta tensors at full size and on real tiny tensors end to end, through the same loaders the presets use.
"""

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

import melfusion as mf
from melfusion.backbones.codecs import AudioLDMVAECodec
from melfusion.backbones.loading import (
    TANGO_VAE_WEIGHTS,
    TANGO_WEIGHTS,
    load_audioldm_vae,
    load_audioldm_vocoder,
    load_weights,
    resolve_config,
)
from melfusion.backbones.tango import TangoDenoiser
from melfusion.config import SD21_REPO, TANGO_REPO
from melfusion.presets import load_json
from melfusion.vocoders.hifigan import HiFiGANVocoder

# byte sizes of the published files (Tango's hub repositories): fp32 tensors plus pickle overhead
TANGO_MAIN_BYTES = 4_829_066_707
TANGO_VAE_BYTES = 442_713_669


def _meta(cls, config):
    with torch.device("meta"):
        if cls is SpeechT5HifiGan:
            return cls(SpeechT5HifiGanConfig(**config))
        return cls.from_config(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- upstream key names, written from the original code's module layout --------------------------------------
def ldm_vae_names(state: dict, levels: int) -> dict:
    """A diffusers AutoencoderKL state dict renamed to the original (LDM / AudioLDM) first-stage names, with the
    mid-block attention's projections as the 1x1 convolutions they are there."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attention = "mid_block.attentions.0." in k
        if attention:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            k = (k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                 .replace("to_out.0", "proj_out"))
        if attention and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[k] = value
    return out


def tango_vocoder_names(state: dict) -> dict:
    """A SpeechT5HifiGan state dict as AudioLDM's HiFi-GAN inside Tango's VAE file: ``vocoder.``, ``ups.i``, and
    no ``mean``/``scale`` (AudioLDM's vocoder does not normalise its input)."""
    return {f"vocoder.{k.replace('upsampler.', 'ups.')}": v for k, v in state.items() if k not in ("mean", "scale")}


# -- full size, on the meta device -----------------------------------------------------------------------------
def test_tango_unet_preset_matches_the_published_checkpoint():
    config = resolve_config("tango_unet")
    unet = _meta(UNet2DConditionModel, config)
    assert len(unet.state_dict()) == 686
    assert _count(unet) == 865_933_768
    assert config["in_channels"] == config["out_channels"] == 8 and config["sample_size"] == [32, 2]
    assert config["attention_head_dim"] == [5, 10, 20, 20] and config["cross_attention_dim"] == 1024
    t5 = resolve_config("flan_t5_large")
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**t5))
    # pytorch_model_main.bin is the UNet and the FLAN-T5-large encoder in float32 (4 bytes each), and a little
    # pickle overhead; the text encoder's tied embedding is stored once
    total = 4 * (_count(unet) + _count(encoder))
    assert 0 < TANGO_MAIN_BYTES - total < 1e-3 * TANGO_MAIN_BYTES


def test_tango_vae_file_layout_converts_and_loads_strictly_at_full_size():
    vae_config = resolve_config("tango_vae")
    voc_config = resolve_config("audioldm_hifigan")
    vae, voc = _meta(AutoencoderKL, vae_config), _meta(SpeechT5HifiGan, voc_config)
    upstream = ldm_vae_names(vae.state_dict(), levels=3) | tango_vocoder_names(voc.state_dict())
    assert "encoder.down.0.block.0.norm1.weight" in upstream and "decoder.up.2.upsample.conv.weight" in upstream
    assert upstream["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "vocoder.ups.4.weight" in upstream and "vocoder.resblocks.14.convs2.2.bias" in upstream
    # the file is those tensors in float32 and a little pickle overhead (mean/scale are ours, not stored)
    stored = sum(v.numel() for v in upstream.values())
    assert 0 < TANGO_VAE_BYTES - 4 * stored < 1e-3 * TANGO_VAE_BYTES

    from melfusion.backbones import loading

    converted_vae = loading.convert_tango_vae(upstream, vae_config)
    converted_voc = loading.convert_tango_vocoder(upstream, voc_config)
    load_weights(_meta(AutoencoderKL, vae_config), converted_vae, "codec")  # strict: names and shapes
    load_weights(_meta(SpeechT5HifiGan, voc_config), converted_voc, "vocoder")


def test_scaling_factors_are_pinned():
    assert load_json("tango_vae")["scaling_factor"] == 0.9227914214134216
    assert load_json("audioldm_vae")["scaling_factor"] == 0.9392935633659363
    paper = mf.MelFusionConfig.preset("paper")
    assert paper.codec.params == {"pretrained": TANGO_REPO, "subfolder": None, "config": "tango_vae"}
    assert paper.vocoder.params["pretrained"] == TANGO_REPO and paper.vocoder.params["subfolder"] is None
    assert paper.denoiser.params["unet"]["pretrained"] == TANGO_REPO
    assert mf.MelFusionConfig.preset("reference").codec.params["config"] == "tango_vae"
    audioldm = mf.MelFusionConfig.preset("audioldm")  # AudioLDM-S-full-v2 decodes with its own VAE
    assert audioldm.codec.params == {"pretrained": "cvssp/audioldm-s-full-v2", "config": "audioldm_vae"}
    codec = AudioLDMVAECodec(config="tango_vae", weights=False, device="meta")
    assert codec.vae.config.scaling_factor == 0.9227914214134216


def test_stable_diffusion_21_points_at_a_live_mirror_with_the_published_config():
    assert SD21_REPO != "stabilityai/stable-diffusion-2-1"  # taken off the hub in November 2025
    for name in ("paper", "reference", "audioldm", "stable_audio"):
        params = mf.MelFusionConfig.preset(name).feature_source.params
        assert params["unet"]["pretrained"] == params["vae"]["pretrained"] == SD21_REPO, name
        assert params["prediction_type"] == "v_prediction"
    unet = resolve_config("sd21_unet")
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["cross_attention_dim"] == 1024
    assert unet["use_linear_projection"] and unet["upcast_attention"] and unet["sample_size"] == 96
    assert _count(_meta(UNet2DConditionModel, unet)) == 865_910_724


def test_audioldm_s_unet_parameter_counts():
    config = resolve_config("audioldm_s_unet")
    assert _count(_meta(UNet2DConditionModel, config)) == 185_036_552
    # the model card's 181M: the same UNet without the concatenated class embedding
    assert _count(_meta(UNet2DConditionModel, config | {"class_embeddings_concat": False})) == 180_776_712


# -- tiny, real tensors, through the presets' loaders -------------------------------------------------------------
TINY_VAE = {"in_channels": 1, "out_channels": 1, "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [8, 16, 32], "latent_channels": 8,
            "norm_num_groups": 8, "layers_per_block": 2, "sample_size": 32, "scaling_factor": 0.9227914214134216}
TINY_HIFIGAN = {"model_in_dim": 16, "sampling_rate": 16000, "upsample_initial_channel": 16,
                "upsample_rates": [4, 2], "upsample_kernel_sizes": [8, 4], "resblock_kernel_sizes": [3, 5],
                "resblock_dilation_sizes": [[1, 3], [1, 3]], "normalize_before": False}
DUMMY_CONFIG = {"text_encoder_name": "google/flan-t5-large", "scheduler_name": "stabilityai/stable-diffusion-2-1",
                "unet_model_name": None, "unet_model_config_path": "configs/diffusion_model_config.json",
                "snr_gamma": 5.0}


@pytest.fixture(scope="module")
def tango_folder(tmp_path_factory):
    """A Tango hub repository in miniature: pytorch_model_vae.bin in the original names, the VAE's and the
    vocoder's configs, and the dummy config.json some of Tango's repositories carry."""
    folder = tmp_path_factory.mktemp("tango")
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(**TINY_HIFIGAN)).eval()
    with torch.no_grad():
        voc.mean.zero_()
        voc.scale.fill_(1.0)
    state = ldm_vae_names(vae.state_dict(), levels=3) | tango_vocoder_names(voc.state_dict())
    torch.save({k: v.clone() for k, v in state.items()}, folder / TANGO_VAE_WEIGHTS)
    (folder / "config.json").write_text(json.dumps(DUMMY_CONFIG))
    (folder / "main_config.json").write_text(json.dumps(DUMMY_CONFIG))
    return folder, vae, voc


def test_tango_vae_and_vocoder_load_from_tangos_file(tango_folder):
    folder, vae, voc = tango_folder
    codec = AudioLDMVAECodec(pretrained=str(folder), subfolder=None, config=TINY_VAE)
    mel = torch.randn(2, 1, 32, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.encode(mel).latent_dist.mode() * TINY_VAE["scaling_factor"]
        torch.testing.assert_close(codec.encode(mel), expected, rtol=0, atol=0)
        torch.testing.assert_close(codec.decode(expected), vae.decode(expected / 0.9227914214134216).sample,
                                   rtol=0, atol=0)
    vocoder = HiFiGANVocoder(pretrained=str(folder), subfolder=None, config=TINY_HIFIGAN)
    spec = torch.randn(2, 1, 10, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(vocoder(spec), voc(spec[:, 0]), rtol=0, atol=0)
    # the file itself works as well as its folder
    direct = load_audioldm_vae({"pretrained": str(folder / TANGO_VAE_WEIGHTS), "config": TINY_VAE}, "codec")
    torch.testing.assert_close(direct.state_dict()["decoder.conv_out.weight"], vae.state_dict()["decoder.conv_out.weight"])


def test_tango_vae_file_needs_a_config_and_names_it(tango_folder):
    folder, _, _ = tango_folder
    with pytest.raises(ValueError, match="tango_vae"):
        load_audioldm_vae({"pretrained": str(folder)}, "codec")
    with pytest.raises(ValueError, match="vocoder: the weights in .* do not fit"):
        load_audioldm_vocoder({"pretrained": str(folder), "config": TINY_HIFIGAN | {"upsample_initial_channel": 32}},
                              "vocoder")


def test_tango_unet_folder_with_a_dummy_config_json_loads(tmp_path):
    from test_loading import TINY_MUSIC_UNET, _denoise, _save_tango, _tiny_music_unet

    unet = _tiny_music_unet(seed=3)
    _save_tango(unet, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(DUMMY_CONFIG))  # not a diffusers config
    loaded = TangoDenoiser(unet={"pretrained": str(tmp_path), "config": TINY_MUSIC_UNET})
    ref = TangoDenoiser(unet={"config": TINY_MUSIC_UNET})
    ref.unet = unet
    torch.testing.assert_close(_denoise(loaded), _denoise(ref), rtol=0, atol=0)
    assert (tmp_path / TANGO_WEIGHTS).is_file()


def test_a_diffusers_pipeline_folder_still_loads_vae_and_vocoder(tmp_path):
    torch.manual_seed(4)
    vae = AutoencoderKL(**(TINY_VAE | {"scaling_factor": 0.9392935633659363})).eval()
    vae.save_pretrained(tmp_path / "vae")
    codec = AudioLDMVAECodec(pretrained=str(tmp_path))
    assert codec.vae.config.scaling_factor == 0.9392935633659363
    torch.testing.assert_close(codec.vae.state_dict()["encoder.conv_in.weight"], vae.state_dict()["encoder.conv_in.weight"],
                               rtol=0, atol=0)


def test_a_tango_folder_without_the_vae_file_names_it(tmp_path):
    from test_loading import _save_tango, _tiny_music_unet

    _save_tango(_tiny_music_unet(), tmp_path)  # pytorch_model_main.bin only
    with pytest.raises(ValueError, match="a Tango folder without 'pytorch_model_vae.bin'"):
        AudioLDMVAECodec(pretrained=str(tmp_path), subfolder=None, config=TINY_VAE)
