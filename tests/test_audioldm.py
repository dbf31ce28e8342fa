"""AudioLDM as the music model: parity with diffusers' AudioLDMPipeline, CLAP, loading, the synapse on it."""

import numpy as np
import pytest
import torch
from diffusers import AudioLDMPipeline, DDIMScheduler, UNet2DConditionModel

import melfusion as mf
from melfusion.backbones import AudioLDMDenoiser, AudioLDMVAECodec, ClapTextEncoder
from melfusion.backbones.audioldm import (
    AUDIOLDM_NOISE_SCHEDULE,
    TINY_AUDIOLDM_HIFIGAN,
    TINY_AUDIOLDM_UNET,
    TINY_AUDIOLDM_VAE,
)
from melfusion.pipeline import MelFusion, make_scheduler, noise_schedule
from melfusion.presets import load_json
from melfusion.schedules import NoiseSchedule
from melfusion.synapse import decoder_layers, probe_layers
from melfusion.vocoders import HiFiGANVocoder

# tiny AudioLDM parts: 32 mel bins, a /2 VAE with 8 latent channels, a HiFi-GAN upsampling 4 * 4 = 16 samples
# per frame at 16 kHz (the mel hop), so 0.064 s = 64 frames = 1024 samples with no rounding anywhere
N_MELS, HOP, SAMPLE_RATE, SECONDS = 32, 16, 16_000, 0.064
TINY_VAE, TINY_HIFIGAN = TINY_AUDIOLDM_VAE, TINY_AUDIOLDM_HIFIGAN


def _tiny_parts():
    torch.manual_seed(0)
    text = ClapTextEncoder(config="tiny")
    torch.manual_seed(1)
    denoiser = AudioLDMDenoiser(unet={"config": "tiny"})
    torch.manual_seed(2)
    codec = AudioLDMVAECodec(config=TINY_VAE)
    torch.manual_seed(3)
    vocoder = HiFiGANVocoder(config=TINY_HIFIGAN)
    # HiFi-GAN's own init (std 0.01) makes ~1e-5 waveforms, too quiet to compare; std 0.1 gives peaks ~0.1
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in vocoder.model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return text, denoiser, codec, vocoder


def _config(**overrides) -> mf.MelFusionConfig:
    data = {
        "name": "tiny-audioldm",
        "denoiser": {"name": "audioldm", "params": {"unet": {"config": "tiny"}}},
        "text_encoder": {"name": "clap", "params": {"config": "tiny"}},
        "codec": {"name": "audioldm_vae", "params": {"config": TINY_VAE}},
        "vocoder": {"name": "hifigan", "params": {"config": TINY_HIFIGAN}},
        "synapse": {"enabled": False},
        "sampling": {"num_inference_steps": 4, "guidance_scale": 2.5, "seconds": SECONDS},
        "sample_rate": SAMPLE_RATE,
        "hop_length": HOP,
        "n_mels": N_MELS,
    }
    data.update(overrides)
    return mf.MelFusionConfig.model_validate(data)


# -- parity with diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("seed, steps, guidance", [(0, 4, 2.5), (7, 3, 4.0)])
def test_generate_matches_diffusers_audioldm_pipeline(seed, steps, guidance):
    text, denoiser, codec, vocoder = _tiny_parts()
    prompt = "a calm piano melody"
    scheduler = DDIMScheduler(**AUDIOLDM_NOISE_SCHEDULE, prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = AudioLDMPipeline(vae=codec.vae, text_encoder=text.model, tokenizer=text.tokenizer, unet=denoiser.unet,
                            scheduler=scheduler, vocoder=vocoder.model)
    pipe.set_progress_bar_config(disable=True)
    mels = []  # the VAE decoder's output (the mel spectrogram) in both runs
    hook = codec.vae.decoder.register_forward_hook(lambda mod, args, out: mels.append(out.detach().clone()))
    emb, _ = text([prompt, ""])
    expected = pipe(prompt_embeds=emb[:1, 0], negative_prompt_embeds=emb[1:, 0], num_inference_steps=steps,
                    guidance_scale=guidance, audio_length_in_s=SECONDS,
                    generator=torch.Generator().manual_seed(seed), output_type="np").audios

    model = MelFusion(_config(), None, denoiser, text, codec, vocoder, None)
    # our scheduler is AudioLDM's: the same betas and DDIM settings
    ours = make_scheduler("ddim", **noise_schedule(denoiser))
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type",
                "clip_sample", "set_alpha_to_one", "steps_offset"):
        assert ours.config[key] == scheduler.config[key], key
    out = model.generate(image=None, text=prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                         seconds=SECONDS, scheduler="ddim", peak_normalize=False, progress=False)
    hook.remove()
    assert len(mels) == 2 and mels[0].shape == (1, 1, 64, N_MELS)
    torch.testing.assert_close(mels[1], mels[0], rtol=0, atol=1e-5)
    assert out.sample_rate == SAMPLE_RATE
    assert out.waveforms.shape == expected.shape == (1, int(SECONDS * SAMPLE_RATE))
    diff = np.abs(out.waveforms - expected).max()
    assert diff <= 1e-4, diff
    assert np.abs(expected).max() > 0.02  # a waveform to compare, not near-silence


def test_clap_embeddings_match_audioldm_encode_prompt():
    text, denoiser, codec, vocoder = _tiny_parts()
    pipe = AudioLDMPipeline(vae=codec.vae, text_encoder=text.model, tokenizer=text.tokenizer, unet=denoiser.unet,
                            scheduler=DDIMScheduler(**AUDIOLDM_NOISE_SCHEDULE), vocoder=vocoder.model)
    prompts = ["a calm piano melody", "drums"]
    theirs = pipe._encode_prompt(prompts, torch.device("cpu"), 1, True)  # [negative (""), prompts]
    emb, mask = text(["", ""] + prompts)
    torch.testing.assert_close(emb[:, 0], theirs, rtol=1e-5, atol=1e-6)
    assert mask.shape == (4, 1) and mask.all()


# -- CLAP text encoder ------------------------------------------------------------------------


def test_clap_round_trip_and_unit_norm(tmp_path):
    torch.manual_seed(0)
    text = ClapTextEncoder(config="tiny")
    text.model.save_pretrained(tmp_path / "text_encoder")
    text.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = ClapTextEncoder(pretrained=str(tmp_path), subfolder="text_encoder")
    prompts = ["a calm piano melody", "", "loud electric guitar riff"]
    a, mask = text(prompts)
    b, _ = loaded(prompts)
    assert a.shape == (3, 1, text.dim) and text.dim == 32 and mask.dtype == torch.bool
    assert torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3, 1))
    assert type(loaded.tokenizer).__name__ == type(text.tokenizer).__name__
    assert loaded.max_length == text.max_length


def test_clap_bad_inputs():
    torch.manual_seed(0)
    text = ClapTextEncoder(config="tiny")
    with pytest.raises(ValueError, match=r"text\[0\]"):
        text([3])
    with pytest.raises(ValueError, match="max_length"):
        ClapTextEncoder(config="tiny", max_length=10_000)


# -- AudioLDM denoiser ------------------------------------------------------------------------


def test_denoiser_loads_from_a_saved_folder(tmp_path):
    torch.manual_seed(1)
    den = AudioLDMDenoiser(unet={"config": "tiny"})
    den.unet.save_pretrained(tmp_path / "unet")
    loaded = AudioLDMDenoiser(unet={"pretrained": str(tmp_path), "subfolder": "unet"})
    x = torch.randn(2, 8, 16, 8, generator=torch.Generator().manual_seed(0))
    text = torch.nn.functional.normalize(torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        a = den(x, torch.tensor(500), text)
        b = loaded(x, torch.tensor(500), text)
        c = den.unet(x, 500, encoder_hidden_states=None, class_labels=text[:, 0]).sample
    assert torch.equal(a, b) and torch.equal(a, c)
    assert den.layer_names == ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    assert den.in_channels == 8 and den.attention == "attn2" and den.prediction_type == "epsilon"
    assert den.noise_schedule == NoiseSchedule.ddpm("epsilon", **AUDIOLDM_NOISE_SCHEDULE)
    assert [(i.heads, i.head_dim) for i in den.layers] == [(4, 12), (4, 12)]
    with pytest.raises(ValueError, match="text"):
        den(x, torch.tensor(500), torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="text"):
        den(x, torch.tensor(500), torch.zeros(2, 1, 16))


def test_denoiser_rejects_a_unet_without_simple_projection():
    cfg = {**TINY_AUDIOLDM_UNET, "class_embed_type": None, "cross_attention_dim": 32}
    with pytest.raises(ValueError, match="simple_projection"):
        AudioLDMDenoiser(unet={"config": cfg})


def test_full_size_unet_on_meta():
    cfg = load_json("audioldm_s_unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    count = sum(p.numel() for p in unet.parameters())
    assert count == 185_036_552
    # the model card lists AudioLDM-S at 181M parameters
    assert abs(count - 181e6) / 181e6 < 0.03
    assert unet.config.class_embed_type == "simple_projection" and unet.config.class_embeddings_concat
    assert unet.config.projection_class_embeddings_input_dim == 512
    assert list(unet.config.block_out_channels) == [128, 256, 384, 640]
    names = decoder_layers(unet)
    assert names == [f"up_blocks.{b}.attentions.{a}" for b in (0, 1, 2) for a in (0, 1, 2)]
    infos = probe_layers(unet, names, "attn2", (8, 256, 16))  # 10.24 s: 1024 frames x 64 mels, VAE /4
    assert [(i.heads, i.head_dim) for i in infos[::3]] == [(8, 80), (8, 48), (8, 32)]
    # attn2 gets no text in AudioLDM: its keys are the music tokens
    assert [i.grid for i in infos[::3]] == [(32, 2), (64, 4), (128, 8)]
    assert [i.tokens for i in infos[::3]] == [64, 256, 1024]


def test_probe_keeps_text_cross_attention_open_ended():
    # a Tango/SD-style attn2 over text has no fixed key count; AudioLDM's per-block widths cannot take a text
    from conftest import make_unet

    unet = make_unet()
    names = decoder_layers(unet)
    assert all(i.tokens is None and i.grid is None for i in probe_layers(unet, names, "attn2", (4, 8, 8)))
    assert [(i.tokens, i.grid) for i in probe_layers(unet, names, "attn1", (4, 8, 8))] == [(64, (8, 8))] * 2
    torch.manual_seed(0)
    aldm = AudioLDMDenoiser(unet={"config": "tiny"}).unet
    with pytest.raises(ValueError, match="text_context"):
        probe_layers(aldm, decoder_layers(aldm), "attn2", (8, 16, 16), text_context=True)


def test_synapse_align_uses_fixed_music_grids():
    from melfusion.interfaces import LayerInfo
    from melfusion.synapse import Synapse
    from melfusion.synapse.features import FeatureCache

    image = [LayerInfo("img.a", 2, 4, tokens=16, grid=(4, 4)), LayerInfo("img.b", 2, 4, tokens=16, grid=(4, 4))]
    gridded = [LayerInfo("mus.a", 3, 2, tokens=6, grid=(2, 3)),  # attends over a 2 x 3 music grid
               LayerInfo("mus.b", 3, 2, tokens=4, grid=(1, 4))]
    mixed = [gridded[0], LayerInfo("mus.b", 3, 2)]  # the second: a cross-attention over text
    cache = FeatureCache()
    x = torch.randn(1, 2, 16, 4, generator=torch.Generator().manual_seed(0))
    cache.add(10, {"img.a": (x, x), "img.b": (x, x)})
    syn = Synapse(image, gridded, aligner="linear", aligner_params={"resize": "interpolate"})
    out = syn.align(cache, 9).at(10)  # 9 text tokens: no layer here takes them
    assert out["mus.a"][0].shape == (1, 3, 6, 2) and out["mus.b"][0].shape == (1, 3, 4, 2)
    out = syn.align(cache, [4, 9], grids=[(2, 2), (3, 3)]).at(10)  # explicit per-pair counts win
    assert out["mus.a"][0].shape == (1, 3, 4, 2) and out["mus.b"][0].shape == (1, 3, 9, 2)
    # pooling works onto either kind of layer: the text layer takes the caption's count
    syn = Synapse(image, mixed, aligner="linear")
    out = syn.align(cache, 9).at(10)
    assert out["mus.a"][0].shape == (1, 3, 6, 2) and out["mus.b"][0].shape == (1, 3, 9, 2)
    with pytest.raises(ValueError, match="tokens"):
        syn.align(cache, [None, None])  # the text layer has no count of its own
    assert [r["music_tokens"] for r in syn.wiring()] == [6, "s (text)"]
    # a grid resize onto the caption's tokens is refused when built, naming the layer (it used to fail at the
    # first caption whose token count was not a square, and to treat a square one as a picture)
    for name, params in (("linear", {"resize": "interpolate"}), ("interpolate", None)):
        wide = [LayerInfo("mus.a", 2, 4, tokens=6, grid=(2, 3)), LayerInfo("mus.b", 2, 4)]
        with pytest.raises(ValueError, match=r"aligner: .*mus\.b attend\(s\) over the caption's tokens"):
            Synapse(image, wide if name == "interpolate" else mixed, aligner=name, aligner_params=params)


def test_audioldm_preset_builds_on_meta():
    cfg = mf.MelFusionConfig.preset("audioldm")
    assert cfg.sampling.guidance_scale == 2.5 and cfg.sampling.num_inference_steps == 200
    model = mf.MelFusion.from_config(cfg, weights=False, device="meta")
    assert isinstance(model.denoiser, AudioLDMDenoiser) and isinstance(model.text_encoder, ClapTextEncoder)
    assert model.text_encoder.dim == 512 and model.denoiser.text_dim == 512
    assert next(model.denoiser.unet.parameters()).device.type == "meta"
    rows = model.synapse.wiring()
    assert len(rows) == 9
    assert [r["music_tokens"] for r in rows[::3]] == [64, 256, 1024]
    assert [p.music.grid for p in model.synapse.pairs[::3]] == [(32, 2), (64, 4), (128, 8)]


def test_cli_inspect_audioldm(capsys):
    from melfusion.cli import main

    assert main(["inspect", "--preset", "audioldm"]) == 0
    out = capsys.readouterr().out
    assert "music denoiser (audioldm): 185,036,552 parameters" in out
    assert "20->8  64->80" in out and "9 layer pairs" in out


# -- the synapse on AudioLDM ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synapse_model():
    tiny = mf.MelFusionConfig.preset("tiny").to_dict()
    unet = {**TINY_AUDIOLDM_UNET, "in_channels": 1, "out_channels": 1}  # the identity codec: mel is the latent
    data = {
        **tiny,
        "name": "tiny-audioldm-synapse",
        "denoiser": {"name": "audioldm", "params": {"unet": {"config": unet}}},
        "text_encoder": {"name": "clap", "params": {"config": "tiny"}},
        "synapse": {"mixer": {"name": "convex", "params": {"init": 0.5}},
                    "aligner": {"name": "linear", "params": {"resize": "interpolate"}}},
    }
    torch.manual_seed(0)
    return mf.MelFusion.from_config(mf.MelFusionConfig.model_validate(data))


def _image(seed):
    return torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(seed))


def test_synapse_wiring_on_audioldm(synapse_model):
    pairs = synapse_model.synapse.pairs
    assert [p.music.name for p in pairs] == ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    # 1.28 s = 128 frames x 64 mels; attention at a quarter: a 32 x 16 grid of music keys
    assert [(p.music.tokens, p.music.grid) for p in pairs] == [(512, (32, 16))] * 2
    assert [(p.image.tokens, p.image.grid) for p in pairs] == [(256, (16, 16))] * 2


def test_synapse_on_audioldm_changes_music_unless_alpha_is_zero(synapse_model):
    kw = dict(text="calm piano", num_inference_steps=2, progress=False)
    a = synapse_model.generate(image=_image(0), **kw)
    b = synapse_model.generate(image=_image(1), **kw)
    assert np.isfinite(a.waveforms).all() and np.isfinite(a.mel).all()
    assert np.abs(a.mel - b.mel).max() > 1e-4
    with synapse_model.synapse.mixer.forced(0.0):
        a0 = synapse_model.generate(image=_image(0), **kw).mel
        b0 = synapse_model.generate(image=_image(1), **kw).mel
        text_only = synapse_model.generate(image=None, **kw).mel
    np.testing.assert_allclose(a0, b0, atol=1e-5)
    np.testing.assert_allclose(a0, text_only, atol=1e-5)


def test_synapse_on_audioldm_follows_the_clip_length(synapse_model):
    # AudioLDM's music grid scales with the clip: features are aligned to the grid of each call's latent
    cfg_seconds = synapse_model.config.sampling.seconds
    for seconds in (cfg_seconds / 2, cfg_seconds * 2):
        out = synapse_model.generate(image=_image(0), text="calm piano", num_inference_steps=1, seconds=seconds,
                                     progress=False)
        assert np.isfinite(out.mel).all()
    tokens, grids = synapse_model.music_tokens(7, None)  # the probed clip: (128 frames, 64 mels)
    assert tokens == [p.music.tokens for p in synapse_model.synapse.pairs]
    assert grids == [p.music.grid for p in synapse_model.synapse.pairs]
    double_tokens, double_grids = synapse_model.music_tokens(7, (256, 64))
    assert double_tokens == [2 * t for t in tokens]
    assert double_grids == [(2 * h, w) for h, w in grids]
