"""Issue 14's refactor: outputs pinned before it, the SNR map, layer pairing, scheduler families, the trajectory
registry and the diffusers-style generate arguments (generator, latents, callback, negative prompts)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import melfusion as mf
from melfusion.interfaces import LayerInfo
from melfusion.registry import registry
from melfusion.sampling import music_to_image_timesteps
from melfusion.schedules import NoiseSchedule, snr_to_timesteps, step_snr
from melfusion.synapse.wiring import pair_layers

PINS = json.loads((Path(__file__).parent / "data" / "refactor_pins.json").read_text())
IMAGE = "examples/images/blue-bright.png"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mf.MelFusion.from_config("tiny")


# -- outputs pinned before the refactor (computed with the code of 1054f13) -------------------------
def test_tiny_preset_output_is_unchanged_by_the_refactor(tiny):
    out = tiny.generate(image=IMAGE, text="a calm flute melody", num_inference_steps=4, seed=3, progress=False)
    assert list(out.waveforms.shape) == PINS["tiny"]["shape"]
    # pinned on another processor: float32 kernels (AVX2 / AVX-512) differ in the last bits, so 1e-5, not exact
    np.testing.assert_allclose(out.waveforms[0, :8], PINS["tiny"]["head"], atol=1e-5)
    assert abs(float(np.abs(out.waveforms).sum()) - PINS["tiny"]["sum"]) < 1e-3 * PINS["tiny"]["sum"]
    assert abs(float(np.abs(out.mel).sum()) - PINS["tiny"]["mel_sum"]) < 1e-4 * PINS["tiny"]["mel_sum"]
    text_only = tiny.generate(image=None, text="a calm flute melody", num_inference_steps=4, seed=3, progress=False)
    np.testing.assert_allclose(text_only.waveforms[0, :8], PINS["tiny_text"]["head"], atol=1e-5)


def test_shipped_mini_output_is_unchanged_by_the_refactor():
    model = mf.MelFusion.from_pretrained("mini")
    out = model.generate(image=IMAGE, text="a calm flute melody", num_inference_steps=6, seed=1, progress=False)
    assert list(out.waveforms.shape) == PINS["mini"]["shape"]
    np.testing.assert_allclose(out.waveforms[0, 1000:1008], PINS["mini"]["head"], atol=1e-6)
    assert abs(float(np.abs(out.waveforms).sum()) - PINS["mini"]["sum"]) < 1e-3 * PINS["mini"]["sum"]


# -- the SNR map ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 7, 50, 200])
def test_snr_map_is_the_identity_for_the_paper_preset(steps):
    cfg = mf.MelFusionConfig.preset("paper")
    fs = cfg.feature_source.build(weights=False, device="meta")
    den = cfg.denoiser.build(weights=False, device="meta")
    sched = den.noise_schedule.make_scheduler("ddim")
    sched.set_timesteps(steps)
    expected = [int(t) for t in sched.timesteps]
    assert music_to_image_timesteps(den.noise_schedule, sched, fs.noise_schedule) == expected
    # and the general formula (no shortcut) gives the same: equal schedules meet at equal timesteps
    general = snr_to_timesteps(step_snr(den.noise_schedule, sched), fs.noise_schedule.alphas_cumprod())
    assert general.tolist() == expected


def test_snr_map_is_the_identity_on_every_training_timestep():
    a = NoiseSchedule.ddpm("v_prediction").alphas_cumprod()
    t = torch.arange(len(a))
    assert torch.equal(snr_to_timesteps(a / (1 - a), a), t)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 120), sigma_min=st.floats(0.01, 1.0), sigma_max=st.floats(5.0, 1000.0))
def test_snr_map_of_stable_audio_sigmas_is_monotone_and_in_range(steps, sigma_min, sigma_max):
    music = NoiseSchedule.edm("v_prediction", sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=1.0)
    sched = music.make_scheduler("edm_dpm_solver")
    sched.set_timesteps(steps)
    image = NoiseSchedule.ddpm("v_prediction").alphas_cumprod()
    t = snr_to_timesteps(step_snr(music, sched), image)
    assert t.dtype == torch.long and len(t) == steps
    assert int(t.min()) >= 0 and int(t.max()) <= len(image) - 1
    # sigmas fall from step to step, so the image timesteps never rise
    assert all(int(a) >= int(b) for a, b in zip(t[:-1], t[1:], strict=True))


@settings(max_examples=60, deadline=None)
@given(snr=st.lists(st.floats(1e-8, 1e8), min_size=1, max_size=30))
def test_snr_map_picks_the_nearest_log_snr(snr):
    a = NoiseSchedule.ddpm().alphas_cumprod()
    log_img = torch.log(a / (1 - a))
    t = snr_to_timesteps(snr, a)
    for value, ti in zip(snr, t.tolist(), strict=True):
        dist = (log_img - np.log(value)).abs()
        assert float(dist[ti]) <= float(dist.min()) + 1e-12
    order = np.argsort(snr)[::-1]  # larger SNR (cleaner) -> smaller or equal timestep
    mapped = t.numpy()[order]
    assert all(mapped[i] <= mapped[i + 1] for i in range(len(mapped) - 1))


# -- scheduler families --------------------------------------------------------------------------------
def test_scheduler_by_name_or_class_within_the_family(tiny):
    from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler

    out = {}
    for choice in ("ddim", "euler", UniPCMultistepScheduler, "PNDMScheduler"):
        res = tiny.generate(text="x", num_inference_steps=3, seed=0, scheduler=choice, progress=False)
        assert np.isfinite(res.waveforms).all()
        out[str(choice)] = res.waveforms
    assert isinstance(tiny.make_scheduler("euler"), EulerDiscreteScheduler)
    with pytest.raises(ValueError, match="scheduler: .*edm family"):
        tiny.generate(text="x", num_inference_steps=3, scheduler="cosine_dpm_solver", progress=False)
    with pytest.raises(ValueError, match="scheduler: "):
        tiny.generate(text="x", num_inference_steps=3, scheduler="FlowMatchEulerDiscreteScheduler", progress=False)


# -- layer pairing -------------------------------------------------------------------------------------
def _infos(n, prefix):
    return [LayerInfo(f"{prefix}{i}", 2, 4, depth=i / max(1, n - 1)) for i in range(n)]


def test_pairing_rules():
    image, music = _infos(9, "img"), _infos(24, "mus")
    pairs = pair_layers(image, music)  # auto: unequal counts -> by relative depth
    assert [p.music.name for p in pairs] == [m.name for m in music]
    assert pairs[0].image.name == "img0" and pairs[-1].image.name == "img8"
    assert [p.image.name for p in pair_layers(_infos(3, "i"), _infos(3, "m"))] == ["i0", "i1", "i2"]
    explicit = pair_layers(image, music, pairs=[["img3", "mus0"], ["img3", "mus5"]])
    assert [(p.image.name, p.music.name) for p in explicit] == [("img3", "mus0"), ("img3", "mus5")]
    with pytest.raises(ValueError, match="pair one to one"):
        pair_layers(image, music, "order")
    with pytest.raises(ValueError, match=r"synapse.pairs\[0\]: 'nope'"):
        pair_layers(image, music, pairs=[["nope", "mus0"]])


@settings(max_examples=60, deadline=None)
@given(n_img=st.integers(1, 12), n_mus=st.integers(1, 30))
def test_depth_pairing_is_monotone_and_covers_the_ends(n_img, n_mus):
    pairs = pair_layers(_infos(n_img, "i"), _infos(n_mus, "m"), "depth")
    idx = [int(p.image.name[1:]) for p in pairs]
    assert len(pairs) == n_mus
    assert idx == sorted(idx) and idx[0] == 0
    if n_mus > 1:
        assert idx[-1] == n_img - 1
    for j, i in enumerate(idx):  # nearest relative depth
        d = j / max(1, n_mus - 1)
        assert all(abs(i / max(1, n_img - 1) - d) <= abs(k / max(1, n_img - 1) - d) + 1e-12 for k in range(n_img))


def test_unequal_layer_counts_build_and_generate():
    cfg = mf.MelFusionConfig.preset("tiny").model_dump()
    torch.manual_seed(0)
    base = mf.MelFusion.from_config(cfg)
    music = base.synapse.music_layer_names
    image = [info.name for info in base.feature_source.layers]
    cfg["synapse"]["pairs"] = [[image[0], music[0]]]
    model = mf.MelFusion.from_config(cfg)
    assert [p.music.name for p in model.synapse.pairs] == [music[0]]
    out = model.generate(image=IMAGE, text="x", num_inference_steps=2, progress=False)
    assert np.isfinite(out.waveforms).all()


# -- trajectories are a registry kind ------------------------------------------------------------------
def test_trajectory_registry_and_a_new_mode(tiny):
    from melfusion.backbones.trajectories import Trajectory

    assert {"reverse", "inversion", "noise"} <= set(registry("trajectory").names())
    calls = []

    @mf.registry.register("trajectory", "clean_only")
    class CleanOnly(Trajectory):
        """Features of the clean latent at every timestep (one evaluation each)."""

        def run(self, source, latents, timesteps, on_step):
            for t in timesteps:
                calls.append(t)
                source.evaluate(latents, int(t))
                on_step(int(t))

    try:
        cfg = tiny.config.model_copy(deep=True)
        cfg.synapse.image_trajectory = "clean_only"
        feats = tiny.image_features(torch.rand(1, 3, 64, 64), [10, 500], text_tokens=4, mode="clean_only")
        assert feats.timesteps == [10, 500] and calls == [10, 500]
        with pytest.raises(ValueError, match="unknown trajectory 'nope'"):
            mf.MelFusionConfig.model_validate({**tiny.config.model_dump(),
                                               "synapse": {"image_trajectory": "nope"}})
    finally:
        registry("trajectory").unregister("clean_only")


# -- generate: generator, latents, callback, negative prompts, .to() -------------------------------------------
def test_generator_latents_and_seed_agree(tiny):
    a = tiny.generate(text="x", num_inference_steps=3, seed=5, progress=False).waveforms
    b = tiny.generate(text="x", num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                      progress=False).waveforms
    np.testing.assert_array_equal(a, b)
    shape = (1, *tiny.latent_shape(tiny.config.sampling.seconds))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    c = tiny.generate(text="x", num_inference_steps=3, latents=noise, seed=None, progress=False).waveforms
    np.testing.assert_array_equal(a, c)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    two = tiny.generate(text="x", num_inference_steps=3, num_samples=2, generator=gens, progress=False).waveforms
    # the same noise in a batch of two: equal up to the processor's batch-size-dependent float32 kernels (exact on
    # AVX2; AVX-512 blocks a two-row batch differently), far below what other noise would change (~0.1)
    np.testing.assert_allclose(two[0], a[0], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="latents: expected a tensor of shape"):
        tiny.generate(text="x", num_inference_steps=3, latents=torch.zeros(1, 1, 3, 3), progress=False)
    with pytest.raises(ValueError, match="generator: got 1 generators for a batch of 2"):
        tiny.generate(text="x", num_inference_steps=3, num_samples=2, generator=gens[:1], progress=False)


def test_callback_sees_every_step_can_edit_and_stop(tiny):
    seen = []

    def watch(model, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))

    tiny.generate(text="x", num_inference_steps=4, progress=False, callback_on_step_end=watch)
    assert [s for s, _ in seen] == [0, 1, 2, 3]

    def stop_after_two(model, step, timestep, tensors):
        return {"stop": step == 1}

    stopped = []
    tiny.generate(text="x", num_inference_steps=4, progress=False,
                  callback_on_step_end=lambda *a: stopped.append(a[1]) or stop_after_two(*a))
    assert stopped == [0, 1]
    zero = tiny.generate(text="x", num_inference_steps=2, progress=False, peak_normalize=False,
                         callback_on_step_end=lambda m, s, t, x: {"latents": torch.zeros_like(x["latents"])})
    ref = tiny.decode(torch.zeros((1, *tiny.latent_shape(1.28))), 1.28, peak_normalize=False)[0]
    np.testing.assert_allclose(zero.waveforms, ref, atol=1e-6)


def test_negative_prompts_one_per_text(tiny):
    both = tiny.generate(text=["a", "b"], negative_text=["noise", ""], num_inference_steps=2, seed=0,
                         progress=False).waveforms
    first = tiny.generate(text=["a", "b"], negative_text="noise", num_inference_steps=2, seed=0,
                          progress=False).waveforms
    assert both.shape == first.shape
    np.testing.assert_allclose(both[0], first[0], atol=1e-6)  # the first text's negative is the same
    assert not np.allclose(both[1], first[1])
    with pytest.raises(ValueError, match="negative_text: expected a string or one per text"):
        tiny.generate(text=["a", "b"], negative_text=["only one"], progress=False)


def test_to_moves_every_part_and_keeps_generating():
    torch.manual_seed(0)
    model = mf.MelFusion.from_config("tiny")
    model.to(dtype=torch.float64)
    assert model.dtype == torch.float64 and model.feature_source.dtype == torch.float64
    out = model.generate(image=IMAGE, text="x", num_inference_steps=2, progress=False)
    assert np.isfinite(out.waveforms).all()
    with pytest.raises(ValueError, match="device: "):
        model.to("cuda:7")
