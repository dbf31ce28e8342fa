"""Stable Audio Open's parts: the DiT denoiser and its synapse processor, the Oobleck codec, no vocoder."""

import pytest
import torch
from diffusers import StableAudioDiTModel, StableAudioPipeline
from diffusers.models.attention_processor import StableAudioAttnProcessor2_0
from diffusers.models.embeddings import get_1d_rotary_pos_embed

import melfusion.backbones.stable_audio as sa
import melfusion.vocoders.none  # noqa: F401  (registers "none")
from melfusion.backbones.loading import build_model
from melfusion.registry import build

TINY_SECONDS = 16 * 8 / 44100  # the tiny DiT's sample_size x the tiny Oobleck's hop


def make_denoiser(seed: int = 0, **kwargs) -> sa.StableAudioDenoiser:
    torch.manual_seed(seed)
    return sa.StableAudioDenoiser({"config": "tiny"}, **kwargs)


def inputs(seed: int = 1, batch: int = 3, frames: int = 10, tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 8, frames, generator=g)
    text = torch.randn(batch, tokens, 32, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 3:] = False
    mask[-1] = False  # the unconditional row
    timing = torch.tensor([[0.0, 1.5]] * batch)
    timing[1] = torch.tensor([2.0, 7.0])
    t = torch.rand(batch, generator=g) * 1.5
    return latents, t, text, mask, timing


def test_registered_and_shapes():
    d = build("denoiser", "stable_audio_dit", transformer={"config": "tiny"})
    assert isinstance(d, sa.StableAudioDenoiser) and d.in_channels == 8
    assert [i.name for i in d.layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert [(i.heads, i.head_dim, i.depth) for i in d.layers] == [(2, 8, 0.0), (2, 8, 1.0)]
    probed = d.probe_layers(["transformer_blocks.1.attn1", "transformer_blocks.0.attn2"], (8, 10))
    assert [(i.heads, i.tokens, i.grid) for i in probed] == [(4, 11, None), (2, None, None)]  # attn1: no GQA
    assert d.latent_shape((8, 37)) == (8, 37)
    with pytest.raises(ValueError, match="codec"):
        d.latent_shape((4, 37))
    with pytest.raises(ValueError, match="seconds"):
        d.latent_shape((8, 0))
    with pytest.raises(ValueError, match="layers"):
        sa.StableAudioDenoiser({"config": "tiny"}, layers=["transformer_blocks.2.attn2"])
    s = d.noise_schedule
    assert (s.family, s.prediction_type, s.default_scheduler) == ("edm", "v_prediction", "cosine_dpm_solver")
    assert dict(s.params) == dict(
        sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", noise_conditioning="atan"
    )
    assert set(d.trainable_modules()) == {"transformer"}
    assert set(d.stored_modules()) == {"transformer", "projection"} and d.published_modules() == set()
    assert not any(p.requires_grad for p in d.projection.parameters())
    inner = 4 * 8
    assert d.activation_bytes((8, 10), 3) == 3 * 11 * inner * 4 * 8
    with pytest.raises(ValueError, match="timing"):
        d(*inputs()[:4])


def test_forward_equals_the_diffusers_pipeline():
    """What the denoiser feeds the transformer is what StableAudioPipeline feeds it, with guidance and no
    negative prompt (the unconditional row: all-false mask)."""
    d = make_denoiser()
    codec = sa.OobleckCodec(config="tiny")
    pipe = StableAudioPipeline(
        vae=codec.vae,
        text_encoder=None,
        projection_model=d.projection,
        tokenizer=None,
        transformer=d.transformer,
        scheduler=d.noise_schedule.make_scheduler("edm_dpm_solver"),
    )
    calls = []
    pre = d.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append([a, kw]), with_kwargs=True)
    post = d.transformer.register_forward_hook(
        lambda m, a, kw, out: calls[-1].append(out[0]), with_kwargs=True
    )
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pipe(
        prompt_embeds=emb,
        attention_mask=mask,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    pre.remove()
    post.remove()
    assert len(calls) == 2
    for (latents, t), _, expected in calls:
        got = d(
            latents,
            t.squeeze(0),
            torch.cat([torch.randn_like(emb), emb]),
            torch.cat([torch.zeros_like(mask), mask]).bool(),
            torch.tensor([[0.0, TINY_SECONDS]] * 4),
        )
        # exact on AVX2 processors; AVX-512 kernels differ in the last float32 bits between the two batches
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unconditional_row_zeroes_its_cross_condition():
    d = make_denoiser()
    latents, t, text, mask, timing = inputs()
    out = d(latents, t, text, mask, timing)
    proj = d.projection
    text_states = proj(text_hidden_states=text).text_hidden_states * mask.unsqueeze(-1).float()
    numbers = proj(start_seconds=timing[:, 0], end_seconds=timing[:, 1])
    start, end = numbers.seconds_start_hidden_states, numbers.seconds_end_hidden_states
    encoder = torch.cat([text_states, start, end], dim=1)
    encoder[-1] = 0.0  # the all-false row: no text, no timing
    rotary = get_1d_rotary_pos_embed(4, 11, use_real=True, repeat_interleave_real=False)
    direct = d.transformer(
        latents,
        t,
        encoder_hidden_states=encoder,
        global_hidden_states=torch.cat([start, end], dim=2),
        rotary_embedding=rotary,
    ).sample
    assert torch.equal(out, direct)
    enc, glob = d.condition(text, mask, timing)
    assert torch.count_nonzero(enc[-1]) == 0 and torch.count_nonzero(enc[0]) > 0
    assert torch.count_nonzero(glob[-1]) > 0  # the global token keeps the timing
    # a 0-d timestep (the sampler's) is the pipeline's t.unsqueeze(0)
    single = d(latents, t[0], text, mask, timing)
    assert torch.allclose(single, d(latents, t[0].expand(3), text, mask, timing), atol=1e-6)


def test_processor_identity_hook_is_exact_and_sees_kv_heads():
    d = make_denoiser()
    latents, t, text, mask, timing = inputs()
    originals = {n: m.processor for n, m in d.transformer.named_modules() if hasattr(m, "set_processor")}
    assert all(isinstance(p, StableAudioAttnProcessor2_0) for p in originals.values()) and len(originals) == 4
    with torch.no_grad():
        before = d(latents, t, text, mask, timing)
    seen = {}

    def hook(name, key, value):
        seen[name] = (tuple(key.shape), tuple(value.shape))
        return key, value

    names = [f"transformer_blocks.{i}.{w}" for i in range(2) for w in ("attn1", "attn2")]
    handle = d.install_synapse(hook, names)
    params = sum(p.numel() for p in d.parameters())
    assert all(isinstance(d.transformer.get_submodule(n).processor, sa.StableAudioKVProcessor) for n in names)
    with torch.no_grad():
        after = d(latents, t, text, mask, timing)
    assert torch.equal(before, after)
    assert sum(p.numel() for p in d.parameters()) == params  # a plain object: no module, no parameters
    assert not isinstance(d.transformer.transformer_blocks[0].attn1.processor, torch.nn.Module)
    # (batch, kv_heads, tokens, head_dim): self-attention has 4 kv heads over frames + 1 tokens,
    # cross-attention 2 (grouped-query) over the 5 text tokens + 2 timing tokens
    assert seen == {
        "transformer_blocks.0.attn1": ((3, 4, 11, 8),) * 2,
        "transformer_blocks.1.attn1": ((3, 4, 11, 8),) * 2,
        "transformer_blocks.0.attn2": ((3, 2, 7, 8),) * 2,
        "transformer_blocks.1.attn2": ((3, 2, 7, 8),) * 2,
    }
    handle.remove()
    restored = {n: m.processor for n, m in d.transformer.named_modules() if hasattr(m, "set_processor")}
    assert all(restored[n] is originals[n] for n in originals)
    handle.remove()  # twice: a no-op


def test_processor_hook_changes_the_output_and_remove_refuses_a_foreign_processor():
    d = make_denoiser()
    latents, t, text, mask, timing = inputs()
    with torch.no_grad():
        before = d(latents, t, text, mask, timing)
    handle = d.install_synapse(lambda name, k, v: (k, torch.zeros_like(v)), ["transformer_blocks.1"])
    assert [p.name for p in [d.transformer.transformer_blocks[1].attn2.processor]] == [
        "transformer_blocks.1.attn2"
    ]
    with torch.no_grad():
        changed = d(latents, t, text, mask, timing)
    assert not torch.allclose(before, changed)
    d.transformer.transformer_blocks[1].attn2.set_processor(StableAudioAttnProcessor2_0())
    with pytest.raises(RuntimeError, match="another processor"):
        handle.remove()


def test_processor_matches_diffusers_with_a_mask_and_half_precision():
    """The processor alone, against diffusers' on the same Attention, with an attention mask and in
    bfloat16."""
    d = make_denoiser()
    attn1 = d.transformer.transformer_blocks[0].attn1
    attn2 = d.transformer.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, 32, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    rotary = get_1d_rotary_pos_embed(4, 11, use_real=True, repeat_interleave_real=False)
    ours = sa.StableAudioKVProcessor("x", lambda n, k, v: (k, v))
    ref = StableAudioAttnProcessor2_0()
    for dtype in (torch.float32, torch.bfloat16):
        a1, a2 = attn1.to(dtype), attn2.to(dtype)
        assert torch.equal(ours(a1, x.to(dtype), rotary_emb=rotary), ref(a1, x.to(dtype), rotary_emb=rotary))
        assert torch.equal(
            ours(a2, x.to(dtype), ctx.to(dtype), mask), ref(a2, x.to(dtype), ctx.to(dtype), mask)
        )


def test_save_load_round_trip(tmp_path):
    d = make_denoiser(seed=0)
    with torch.no_grad():  # the number conditioners too: make them differ from a fresh build's
        for p in d.projection.parameters():
            p.add_(1.0)
    assert d.save_weights(tmp_path) == "transformer"
    assert set(sa.StableAudioDenoiser.weight_folders) == {"transformer", "projection_model"}
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "projection_model" / "diffusion_pytorch_model.safetensors").is_file()
    e = make_denoiser(seed=1)
    e.load_weights(tmp_path)
    for name, module in d.stored_modules().items():
        theirs = e.stored_modules()[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items())
    # diffusers alone reads the transformer folder
    again = StableAudioDiTModel.from_pretrained(tmp_path / "transformer")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in d.transformer.state_dict().items())
    # a pretrained spec: the projection comes from the sibling projection_model folder, and is published
    f = sa.StableAudioDenoiser({"pretrained": str(tmp_path), "subfolder": "transformer"})
    assert f.published_modules() == {"transformer", "projection"}
    assert all(torch.equal(v, f.projection.state_dict()[k]) for k, v in d.projection.state_dict().items())
    # failures: one OSError naming the file
    (tmp_path / "projection_model" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(OSError, match="projection_model"):
        e.load_weights(tmp_path)
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        e.load_weights(tmp_path / "missing")
    big = sa.StableAudioDenoiser({"config": dict(sa.TINY_STABLE_AUDIO_DIT, num_layers=3)})
    with pytest.raises(OSError, match="transformer"):
        big.load_weights(tmp_path)


def test_full_size_on_meta():
    d = sa.StableAudioDenoiser({"config": "stable_audio_dit"}, device="meta")
    n = sum(p.numel() for p in d.transformer.parameters())
    assert n == 1_056_939_136 and abs(n - 1.06e9) / 1.06e9 < 0.01
    assert sum(p.numel() for p in d.projection.parameters()) == 396_544
    assert [(i.heads, i.head_dim) for i in d.layers] == [(12, 64)] * 24
    assert isinstance(d.projection.text_projection, torch.nn.Identity)
    codec = sa.OobleckCodec(config="oobleck_vae", device="meta")
    assert sum(p.numel() for p in codec.vae.parameters()) == 156_112_514
    assert (codec.latent_channels, codec.downsample, codec.sample_rate, codec.audio_channels) == (
        64,
        2048,
        44100,
        2,
    )
    assert codec.latent_shape(10.0, 16000, 160, 64) == (64, 216)
    from transformers import T5EncoderModel

    t5 = build_model(T5EncoderModel, {"config": "t5_base"}, "text_encoder", device="meta")
    assert sum(p.numel() for p in t5.parameters()) == 109_628_544


def test_oobleck_codec():
    torch.manual_seed(0)
    codec = build("codec", "oobleck", config="tiny")
    assert isinstance(codec, sa.OobleckCodec) and codec.output == "waveform"
    assert (codec.latent_channels, codec.downsample, codec.audio_channels) == (8, 8, 2)
    assert not any(p.requires_grad for p in codec.parameters())
    assert codec.latent_shape(64 / 44100, 16000, 160, 64) == (8, 8)
    assert codec.latent_shape(65 / 44100, 16000, 160, 64) == (8, 9)
    with pytest.raises(ValueError, match="seconds"):
        codec.latent_shape(0.0, 16000, 160, 64)
    wav = torch.randn(2, 2, 64)
    z = codec.encode(wav)
    assert z.shape == (2, 8, 8)
    assert torch.equal(z, codec.vae.encode(wav).latent_dist.mode())  # the posterior's mode, unscaled
    assert codec.decode(z).shape == (2, 2, 64)
    mono = torch.randn(2, 1, 67)
    assert torch.equal(
        codec.encode(mono)[..., :8],
        codec.encode(torch.nn.functional.pad(mono.repeat(1, 2, 1), (0, 5)))[..., :8],
    )
    assert codec.encode(mono).shape == (2, 8, 9)  # ceil(67 / 8)
    with pytest.raises(ValueError, match="audio"):
        codec.encode(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="codec"):
        sa.OobleckCodec(vae={"config": "tiny"}, config="tiny")


def test_no_vocoder():
    voc = build("vocoder", "none")
    assert voc.sample_rate == 44100 and not list(voc.parameters())
    wav = torch.randn(2, 2, 100)
    assert voc(wav) is wav
    half = wav.half()
    assert voc(half).dtype == torch.float32 and torch.equal(voc(half), half.float())
    assert build("vocoder", "none", sample_rate=48000).sample_rate == 48000
    with pytest.raises(ValueError, match="sample_rate"):
        build("vocoder", "none", sample_rate=0)
