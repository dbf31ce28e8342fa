"""Algorithm 2 pieces: DDIM inversion, the image feature cache, coarse image grids, save/load, CLI flags."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import melfusion as mf
from melfusion.cli import main
from melfusion.pipeline import image_timesteps, make_scheduler


def _image(seed):
    return torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(seed))


def _source(prediction_type="epsilon", out_scale=1.0):
    torch.manual_seed(0)
    fs = mf.MelFusionConfig.preset("tiny").feature_source.build()
    fs.prediction_type = prediction_type
    fs.unet.double()
    with torch.no_grad():
        fs.unet.conv_out.weight.mul_(out_scale)
        fs.unet.conv_out.bias.mul_(out_scale)
    return fs


def _round_trip_error(fs, steps):
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    back = fs.sample(fs.invert(z0, sched.timesteps), sched.timesteps)
    assert back.dtype == torch.float64
    return ((back - z0).abs().max() / z0.abs().max()).item()


def test_ddim_round_trip_is_exact_when_the_noise_prediction_is_constant():
    # an epsilon network with zero output: inversion and sampling are exact inverses, only float64 rounding remains
    fs = _source("epsilon", out_scale=0.0)
    assert _round_trip_error(fs, 25) < 1e-12


@pytest.mark.parametrize("prediction_type, bound", [("epsilon", 1e-2), ("v_prediction", 1e-3)])
def test_ddim_round_trip_float64(prediction_type, bound):
    # DDIM inversion evaluates the network at the previous latent, so invert-then-sample is exact only
    # in the limit of many steps. On a tiny float64 UNet whose output varies slowly with its input (its
    # output layer scaled by 0.1, as a trained model's prediction is smooth near the data), the relative
    # max error of invert -> sample on unit-variance latents is measured to be: epsilon 5.1e-2 / 2.2e-2 /
    # 6.1e-3 and v 2.4e-2 / 2.4e-3 / 5.3e-4 at 10 / 50 / 200 steps. It must shrink with the step count.
    fs = _source(prediction_type, out_scale=0.1)
    errors = [_round_trip_error(fs, n) for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < bound


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 400))
def test_image_timesteps_spread_over_the_grid(n, k):
    sched = make_scheduler("ddim")
    sched.set_timesteps(n)
    ts = [int(t) for t in sched.timesteps]
    picked = image_timesteps(sched.timesteps, k)
    assert set(picked) <= set(ts)
    assert picked[0] == ts[0] and (picked[-1] == ts[-1] or k == 1)
    assert len(picked) == min(k, len(ts))
    assert picked == sorted(set(picked), reverse=True)
    assert image_timesteps(sched.timesteps, None) == ts


class _CountCalls:
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.count += 1

    def close(self):
        self.handle.remove()


def test_feature_cache_reuses_an_image_across_calls(tiny_model):
    model = tiny_model
    model.feature_cache.clear()
    calls = _CountCalls(model.feature_source.unet)
    try:
        kw = dict(text="calm piano", num_inference_steps=3, progress=False)
        a = model.generate(image=_image(10), **kw)
        first = calls.count
        assert first == model.feature_source.unet_evaluations(3, "reverse") == 6
        b = model.generate(image=_image(10), num_samples=2, **kw)  # same image, more samples: no image UNet call
        assert calls.count == first
        # the same features and noise; a batch of 2 rounds differently from a batch of 1 on the CPU
        np.testing.assert_allclose(a.waveforms[0], b.waveforms[0], atol=1e-3)
        model.generate(image=_image(11), **kw)  # another image: computed
        assert calls.count == 2 * first
    finally:
        calls.close()
    assert model.feature_cache.hits >= 1 and len(model.feature_cache) >= 2
    # the cache holds aligned features: per layer, (batch, heads, text tokens, head_dim), not the image grid
    key = next(iter(model.feature_cache._items))
    cache = model.feature_cache._items[key]
    step = cache.at(cache.timesteps[0])
    assert set(step) == set(model.synapse.music_layer_names)
    for k, v in step.values():
        assert k.shape[0] == 1 and k.shape[2] < 64 and k.shape == v.shape


def test_image_steps_reduce_image_unet_calls(tiny_model):
    model = tiny_model
    model.feature_cache.clear()
    calls = _CountCalls(model.feature_source.unet)
    try:
        kw = dict(image=_image(12), text="calm piano", num_inference_steps=8, progress=False)
        full = model.generate(**kw)
        n_full = calls.count
        coarse = model.generate(image_steps=2, **kw)
        n_coarse = calls.count - n_full
    finally:
        calls.close()
    assert (n_full, n_coarse) == (16, 4)
    assert np.isfinite(coarse.waveforms).all()
    assert not np.array_equal(full.mel, coarse.mel)
    with pytest.raises(ValueError, match="image_steps"):
        model.generate(image_steps=0, **kw)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm_solver++"])
def test_schedulers(tiny_model, scheduler):
    out = tiny_model.generate(image=_image(0), text="x", num_inference_steps=2, scheduler=scheduler, progress=False)
    assert np.isfinite(out.waveforms).all() and np.abs(out.waveforms).max() <= 1.0
    with pytest.raises(ValueError, match="scheduler"):
        tiny_model.generate(image=_image(0), text="x", num_inference_steps=1, scheduler="not_a_scheduler",
                            progress=False)


def test_save_pretrained_round_trip(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.synapse.mixer.alpha.fill_(0.3)
    try:
        path = tiny_model.save_pretrained(tmp_path / "model")
        names = sorted(p.name for p in path.iterdir())
        assert names == sorted([
            "melfusion_config.json", "melfusion_weights.json", "synapse.safetensors", "unet",
            "feature_source.unet.safetensors", "feature_source.vae.safetensors", "text_encoder.model.safetensors",
        ])
        assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        loaded = mf.MelFusion.from_pretrained(path)
        torch.testing.assert_close(loaded.synapse.mixer.alphas(), torch.full((2,), 0.3))
        kw = dict(image=_image(3), text="calm piano", num_inference_steps=2, progress=False)
        np.testing.assert_array_equal(tiny_model.generate(**kw).waveforms, loaded.generate(**kw).waveforms)
        # the music UNet folder is a plain diffusers folder
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        for name, p in unet.state_dict().items():
            assert torch.equal(p, tiny_model.denoiser.unet.state_dict()[name])
    finally:
        with torch.no_grad():
            tiny_model.synapse.mixer.alpha.fill_(0.5)


def test_save_pretrained_references_published_weights_instead_of_copying(tmp_path):
    # a model whose frozen parts name published weights: only the trained parts are written
    model = mf.MelFusion.from_config("tiny")
    model.config = model.config.model_copy(deep=True)
    model.config.text_encoder.params["pretrained"] = "google/flan-t5-large"
    path = model.save_pretrained(tmp_path / "m")
    index = json.loads((path / "melfusion_weights.json").read_text())
    assert "text_encoder" not in index["stored_frozen_modules"]
    assert not (path / "text_encoder.model.safetensors").exists()


def test_interrupted_save_keeps_the_previous_one(tiny_model, tmp_path, monkeypatch):
    path = tiny_model.save_pretrained(tmp_path / "model")
    before = (path / "synapse.safetensors").read_bytes()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(path)
    assert (path / "synapse.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
    mf.MelFusion.from_pretrained(path)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(OSError, match=r"no such folder .*nothing.*shipped models: mini"):
        mf.MelFusion.from_pretrained(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    mf.MelFusionConfig.preset("tiny").save(tmp_path / "half" / "melfusion_config.json")
    with pytest.raises(OSError, match="melfusion_weights.json"):
        mf.MelFusion.from_pretrained(tmp_path / "half")
    with pytest.raises(OSError, match="hub"):
        mf.MelFusion.from_pretrained("someone/no-such-model")


def test_cli_generate_from_saved_model(tiny_model, tmp_path, capsys):
    path = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "x.wav"
    code = main(["generate", "--model", str(path), "--image", "examples/images/sunset.png", "--text", "calm",
                 "--out", str(out), "--steps", "3", "--image-steps", "2", "--num-samples", "2",
                 "--scheduler", "dpm_solver++", "--seconds", "0.64", "--spectrogram", str(tmp_path / "s.png")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "x_0.wav").is_file() and (tmp_path / "x_1.wav").is_file()
    assert (tmp_path / "s.png").is_file()
    import soundfile as sf

    wav, sr = sf.read(tmp_path / "x_0.wav")
    assert sr == 16_000 and len(wav) == 64 * 160
    assert main(["generate", "--model", str(tmp_path / "none"), "--image", "examples/images/sunset.png",
                 "--text", "x", "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err


@settings(max_examples=80, deadline=None)
@given(ts=st.lists(st.integers(0, 999), min_size=1, max_size=60, unique=True), cap=st.integers(0, 999))
def test_cap_timesteps_keeps_what_lies_under_the_cap(ts, cap):
    from melfusion.pipeline import cap_timesteps
    from melfusion.synapse.features import FeatureCache

    ts = sorted(ts, reverse=True)
    kept = cap_timesteps(ts, cap)
    assert cap_timesteps(ts, None) == ts
    under = [t for t in ts if t <= cap]
    assert kept == (under or [min(ts)])
    # the cache answers every music timestep above the cap with the largest kept image timestep
    cache = FeatureCache()
    for t in kept:
        cache.add(t, {"layer": (torch.full((1,), float(t)), torch.zeros(1))})
    for t in ts:
        if t > max(kept):
            assert float(cache.at(t)["layer"][0]) == max(kept)


def test_image_timestep_cap_in_generation(tiny_model):
    model = tiny_model
    model.feature_cache.clear()
    calls = _CountCalls(model.feature_source.unet)
    kw = dict(image=_image(13), text="calm piano", num_inference_steps=8, progress=False)
    try:
        model.config.synapse.image_timestep_max = 300
        capped = model.generate(**kw)
        n_capped = calls.count
    finally:
        model.config.synapse.image_timestep_max = None
        calls.close()
    from melfusion.pipeline import noise_schedule

    sched = make_scheduler("ddim", **noise_schedule(model.denoiser))
    sched.set_timesteps(8)
    kept = [int(t) for t in sched.timesteps if int(t) <= 300]
    assert 0 < len(kept) < 8
    assert n_capped == 2 * len(kept)  # the reverse trajectory, only up to the cap
    assert np.isfinite(capped.waveforms).all()
    assert not np.array_equal(capped.mel, model.generate(**kw).mel)
