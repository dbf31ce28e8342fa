"""Every real part loads from where its published weights live.

Tiny models of the real architecture classes are saved the way the
published checkpoints are (``save_pretrained`` folders, Tango's
``pytorch_model_main.bin`` state dict) and loaded back through our part
classes; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

import melfusion as mf
from conftest import make_unet
from melfusion.backbones.codecs import AudioLDMVAECodec
from melfusion.backbones.loading import TANGO_WEIGHTS, load_tango_unet
from melfusion.backbones.stable_diffusion import TINY_VAE, StableDiffusionFeatureSource
from melfusion.backbones.tango import TangoDenoiser
from melfusion.backbones.text import MiniLMTextEncoder, T5TextEncoder, packaged_minilm_path
from melfusion.config import TextEncoderConfig
from melfusion.vocoders.hifigan import HiFiGANVocoder

TINY_MUSIC_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 16,
    "norm_num_groups": 8,
    "in_channels": 8,
    "out_channels": 8,
    "sample_size": [8, 4],
    "use_linear_projection": True,
    "upcast_attention": True,
}

TINY_AUDIO_VAE = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 32],
    "latent_channels": 8,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 32,
    "scaling_factor": 0.9227914214134216,
}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- Stable Diffusion feature source ---------------------------------------------------------------


def test_sd_feature_source_loads_unet_and_vae_subfolders(tmp_path):
    unet = make_unet(seed=1)
    torch.manual_seed(2)
    vae = AutoencoderKL(**TINY_VAE).eval()
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")

    loaded = StableDiffusionFeatureSource(
        unet={"pretrained": str(tmp_path), "subfolder": "unet"},
        vae={"pretrained": str(tmp_path), "subfolder": "vae"},
        resolution=32,
    )
    ref = StableDiffusionFeatureSource(unet={"config": dict(unet.config)}, vae={"config": "tiny"}, resolution=32)
    ref.unet, ref.vae = unet, vae

    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    z_loaded, z_ref = loaded.encode(images), ref.encode(images)
    _exact(z_loaded, z_ref)
    assert z_loaded.shape == (2, 4, 8, 8)

    a = loaded.trajectory(z_loaded, [1, 500], mode="inversion")
    b = ref.trajectory(z_ref, [1, 500], mode="inversion")
    assert a.timesteps == b.timesteps == [1, 500]
    for t in a.timesteps:
        assert set(a.at(t)) == set(b.at(t)) == set(loaded.layer_names)
        for name, (k, v) in a.at(t).items():
            _exact(k, b.at(t)[name][0])
            _exact(v, b.at(t)[name][1])


# -- Tango denoiser ----------------------------------------------------------------------------------


def _tiny_music_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_MUSIC_UNET).eval()


def _denoise(model):
    latents, text = _rand(2, 8, 8, 4, seed=3), _rand(2, 5, 16, seed=4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        return model(latents, torch.tensor([10, 700]), text, text_mask=mask)


def _save_tango(unet, folder, extra=None):
    """Tango's layout: the whole AudioDiffusion state dict, the UNet under ``unet.``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"unet.{k}": v.clone() for k, v in unet.state_dict().items()}
    state |= {"text_encoder.shared.weight": torch.zeros(4, 2), "text_encoder.encoder.final_layer_norm.weight":
              torch.ones(2)}
    state |= extra or {}
    torch.save(state, folder / TANGO_WEIGHTS)
    (folder / "main_config.json").write_text(json.dumps({
        "text_encoder_name": "google/flan-t5-large", "scheduler_name": "stabilityai/stable-diffusion-2-1",
        "unet_model_config_path": "configs/diffusion_model_config.json", "snr_gamma": None}))
    return folder / TANGO_WEIGHTS


@pytest.mark.parametrize("subfolder", [None, "unet"])
def test_tango_denoiser_loads_a_diffusers_folder(tmp_path, subfolder):
    unet = _tiny_music_unet()
    unet.save_pretrained(tmp_path / (subfolder or ""))
    spec = {"pretrained": str(tmp_path)} | ({"subfolder": subfolder} if subfolder else {})
    loaded = TangoDenoiser(unet=spec)
    ref = TangoDenoiser(unet={"config": TINY_MUSIC_UNET})
    ref.unet = unet
    _exact(_denoise(loaded), _denoise(ref))


def test_tango_denoiser_loads_tango_checkpoint(tmp_path):
    unet = _tiny_music_unet(seed=5)
    file = _save_tango(unet, tmp_path / "tango")
    ref = TangoDenoiser(unet={"config": TINY_MUSIC_UNET})
    ref.unet = unet
    expected = _denoise(ref)
    for pretrained in (tmp_path / "tango", file):  # the folder, or the file itself
        loaded = TangoDenoiser(unet={"pretrained": str(pretrained), "config": TINY_MUSIC_UNET})
        assert not any(t.is_meta for t in loaded.unet.state_dict().values())
        assert loaded.layer_names == ref.layer_names
        _exact(_denoise(loaded), expected)
    as_double = load_tango_unet({"pretrained": str(file), "config": TINY_MUSIC_UNET}, "x", dtype=torch.float64)
    assert next(as_double.parameters()).dtype == torch.float64


def test_tango_checkpoint_needs_a_config(tmp_path):
    _save_tango(_tiny_music_unet(), tmp_path)
    with pytest.raises(ValueError, match="config"):
        TangoDenoiser(unet={"pretrained": str(tmp_path)})


def test_tango_checkpoint_key_mismatch_is_a_clear_error(tmp_path):
    unet = _tiny_music_unet()
    file = _save_tango(unet, tmp_path / "a")
    state = torch.load(file, weights_only=True)
    dropped = "unet.conv_in.weight"
    del state[dropped]
    state["unet.not_a_layer.weight"] = torch.zeros(1)
    torch.save(state, file)
    with pytest.raises(ValueError, match="missing keys: conv_in.weight") as info:
        TangoDenoiser(unet={"pretrained": str(file), "config": TINY_MUSIC_UNET})
    assert "unexpected keys: not_a_layer.weight" in str(info.value)
    assert "text_encoder" not in str(info.value)  # other prefixes are ignored

    _save_tango(unet, tmp_path / "b")
    wider = TINY_MUSIC_UNET | {"cross_attention_dim": 24}
    with pytest.raises(ValueError, match="shape mismatches"):
        TangoDenoiser(unet={"pretrained": str(tmp_path / "b"), "config": wider})


_CALLS = []


def _record(arg):
    _CALLS.append(arg)
    return arg


class _Payload:
    """Unpickling this would call ``_record``: weights_only must refuse before that."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_tango_checkpoint_with_pickled_objects_is_refused(tmp_path):
    unet = _tiny_music_unet()
    _save_tango(unet, tmp_path, extra={"unet.conv_in.weight": _Payload()})
    with pytest.raises(OSError, match="weights_only"):
        TangoDenoiser(unet={"pretrained": str(tmp_path), "config": TINY_MUSIC_UNET})
    assert _CALLS == []


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers' call
def test_tango_hub_id_offline_names_repo_and_file():
    with pytest.raises(OSError) as info:
        TangoDenoiser(unet={"pretrained": "melfusion-tests/no-such-tango", "config": TINY_MUSIC_UNET})
    assert "melfusion-tests/no-such-tango" in str(info.value) and TANGO_WEIGHTS in str(info.value)


# -- audio codec and vocoder -------------------------------------------------------------------------


def test_audioldm_vae_codec_loads_vae_subfolder(tmp_path):
    torch.manual_seed(6)
    vae = AutoencoderKL(**TINY_AUDIO_VAE).eval()
    vae.save_pretrained(tmp_path / "vae")
    loaded = AudioLDMVAECodec(pretrained=str(tmp_path))
    ref = AudioLDMVAECodec(config=TINY_AUDIO_VAE)
    ref.vae = vae
    assert loaded.latent_channels == 8 and loaded.downsample == 4
    assert loaded.vae.config.scaling_factor == pytest.approx(0.9227914214134216)
    mel = _rand(2, 1, 32, 16, seed=7)
    z = loaded.encode(mel)
    assert z.shape == (2, 8, 8, 4)
    _exact(z, ref.encode(mel))
    _exact(loaded.decode(z), ref.decode(z))


def test_hifigan_vocoder_loads_vocoder_subfolder(tmp_path):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    config = SpeechT5HifiGanConfig(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=16,
                                   upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
                                   resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                                   normalize_before=False)
    torch.manual_seed(8)
    model = SpeechT5HifiGan(config).eval()
    model.save_pretrained(tmp_path / "vocoder")
    voc = HiFiGANVocoder(pretrained=str(tmp_path))
    assert voc.sample_rate == 16000
    mel = _rand(2, 1, 10, 64, seed=9)
    wave = voc(mel)
    assert wave.shape == (2, 10 * 16)
    with torch.no_grad():
        _exact(wave, model(mel[:, 0]))


# -- text encoders -----------------------------------------------------------------------------------


def test_t5_encoder_and_tokenizer_load_from_one_folder(tmp_path):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from melfusion.backbones.text import TINY_T5

    torch.manual_seed(10)
    model = T5EncoderModel(T5Config(**TINY_T5)).eval()
    tokenizer = ByT5Tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    enc = T5TextEncoder(pretrained=str(tmp_path))
    assert enc.dim == 32 and len(enc.tokenizer) == len(tokenizer)
    texts = ["calm piano", "a much longer prompt about drums"]
    emb, mask = enc(texts)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    _exact(emb, ref)
    assert torch.equal(mask, batch.attention_mask.bool())

    torch.manual_seed(11)
    random = T5TextEncoder(pretrained=str(tmp_path), weights=False)  # the folder's config, random weights
    assert random(texts)[0].shape == emb.shape and not torch.allclose(random(texts)[0], emb)


def test_minilm_packaged_weights_are_real():
    enc = MiniLMTextEncoder()
    assert enc.dim == 384
    emb, mask = enc("a calm piano melody")
    assert emb.shape[0] == 1 and emb.shape[2] == 384 and emb.shape[1] == mask.shape[1] >= 3
    assert mask.dtype == torch.bool and mask.all()
    _exact(enc("a calm piano melody")[0], emb)

    def sentence(texts):  # sentence-transformers' mean pooling, normalised
        e, m = enc(texts)
        pooled = (e * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    calm, soft, market = sentence(["a calm piano melody", "soft piano music", "the stock market fell sharply"])
    assert not torch.allclose(calm, soft)
    assert (calm @ soft) > (calm @ market) + 0.2  # trained weights know that pianos are music

    normed, _ = MiniLMTextEncoder(normalize=True)("a calm piano melody")
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(normed.shape[:2]))

    torch.manual_seed(0)
    random = MiniLMTextEncoder(weights=False)
    r, _ = random("a calm piano melody")
    assert r.shape == emb.shape and not torch.allclose(r, emb, atol=1e-2)


def test_minilm_loads_a_saved_folder(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(12)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = MiniLMTextEncoder(pretrained=str(tmp_path), max_length=16)
    assert enc.dim == 32
    texts = ["calm piano", "drums"]
    emb, mask = enc(texts)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        _exact(emb, model(**batch).last_hidden_state)
    assert torch.equal(mask, batch.attention_mask.bool())
    with pytest.raises(ValueError, match="max_length"):
        MiniLMTextEncoder(pretrained=str(tmp_path), max_length=65)


# -- errors and the paper preset ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda p: StableDiffusionFeatureSource(unet={"pretrained": p, "subfolder": "unet"}, resolution=32),
        lambda p: TangoDenoiser(unet={"pretrained": p}),
        lambda p: TangoDenoiser(unet={"pretrained": p, "config": TINY_MUSIC_UNET}),
        lambda p: AudioLDMVAECodec(pretrained=p),
        lambda p: HiFiGANVocoder(pretrained=p),
        lambda p: T5TextEncoder(pretrained=p),
        lambda p: MiniLMTextEncoder(pretrained=p),
    ],
    ids=["feature_source", "tango", "tango_with_config", "codec", "vocoder", "t5", "minilm"],
)
def test_missing_folder_is_an_oserror_naming_it(tmp_path, build):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(OSError, match="no_such_model"):
        build(missing)


def test_paper_preset_parts_build_on_meta():
    cfg = mf.MelFusionConfig.preset("paper")
    assert cfg.denoiser.params["prediction_type"] == "v_prediction"
    counts = {
        "text_encoder": 341_231_104,  # FLAN-T5-large encoder
        "codec": 55_376_873,  # AudioLDM VAE
        "vocoder": 55_264_897,  # AudioLDM HiFi-GAN
    }
    for part, count in counts.items():
        built = getattr(cfg, part).build(weights=False, device="meta")
        module = built.model if hasattr(built, "model") else built.vae
        params = list(module.parameters())
        assert all(p.is_meta for p in params), part
        assert sum(p.numel() for p in params) == count, part
    den = cfg.denoiser.build(weights=False, device="meta")
    assert den.prediction_type == "v_prediction" and den.in_channels == 8
    assert next(den.unet.parameters()).is_meta


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_paper_presets_build_whole_model_on_meta(preset):
    model = mf.MelFusion.from_config(preset, weights=False, device="meta")
    assert model.denoiser.prediction_type == "v_prediction"
    assert next(model.denoiser.unet.parameters()).is_meta and next(model.text_encoder.model.parameters()).is_meta


def test_minilm_builds_on_meta():
    assert "minilm" in mf.registry.REGISTRIES["text_encoder"].names()
    cfg = TextEncoderConfig(name="minilm", params={"normalize": True, "max_length": 64})
    assert isinstance(cfg.build(weights=False, device="meta"), MiniLMTextEncoder)
    enc = MiniLMTextEncoder(weights=False, device="meta")
    assert all(p.is_meta for p in enc.model.parameters())
    assert sum(p.numel() for p in enc.model.parameters()) == 22_713_216
