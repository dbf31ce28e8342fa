"""Long pieces, storyboards, continuation and inpainting (melfusion.longform) on the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import melfusion as mf
from melfusion.longform import (
    WindowBlend,
    blend_windows,
    plan_windows,
    seam_crossfade,
    seam_report,
    section_weights,
    window_taper,
)

IMG = "examples/images/blue-bright.png"
IMG2 = "examples/images/red-dark.png"
FAST = dict(num_inference_steps=3, progress=False, seed=0)


# -- the math ------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 64), extra=st.integers(0, 400), data=st.data())
def test_windows_cover_the_piece_with_the_overlap_asked_for(size, extra, data):
    overlap = data.draw(st.integers(0, size - 1))
    plan = plan_windows(size + extra, size, overlap)
    starts = plan.starts
    assert starts[0] == 0 and starts[-1] + size == plan.total >= size + extra
    assert plan.total - (size + extra) < size - overlap  # padded by less than one hop
    assert all(b - a == size - overlap for a, b in zip(starts, starts[1:], strict=False))  # exactly the overlap
    covered = np.zeros(plan.total, dtype=int)
    for a in starts:
        covered[a: a + size] += 1
    assert covered.min() >= 1
    # no more windows than the hop needs
    assert len(starts) == (1 if extra == 0 else int(np.ceil(extra / (size - overlap))) + 1)


def test_plan_windows_refuses_bad_overlaps():
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(100, 10, 10)
    with pytest.raises(ValueError, match="total"):
        plan_windows(5, 10, 2)


@given(size=st.integers(1, 512))
def test_taper_is_positive_symmetric_and_at_most_one(size):
    w = window_taper(size)
    assert (w > 0).all() and (w <= 1).all()
    np.testing.assert_allclose(w, w[::-1], atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.floats(1.0, 80.0), min_size=1, max_size=6), crossfade=st.floats(0.0, 60.0))
def test_section_weights_are_a_partition_of_unity_with_ramps_only_near_boundaries(lengths, crossfade):
    edges = np.concatenate([[0.0], np.cumsum(lengths)])
    total = int(np.ceil(edges[-1]))
    bounds = [b for b in edges[1:-1] if 0 < b < total]
    if len(bounds) != len(lengths) - 1 or any(b - a <= 0 for a, b in zip([0, *bounds], [*bounds, total],
                                                                         strict=False)):
        return
    w = section_weights(total, bounds, crossfade)
    assert w.shape == (len(lengths), total)
    assert (w >= -1e-12).all() and (w <= 1 + 1e-12).all()
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-9)
    centres = np.arange(total) + 0.5
    for s in range(len(lengths)):
        a, b = ([0.0, *bounds])[s], ([*bounds, float(total)])[s]
        far = (centres > a + crossfade / 2) & (centres < b - crossfade / 2)
        np.testing.assert_allclose(w[s][far], 1.0, atol=1e-9)  # untouched away from its boundaries
        outside = (centres < a - crossfade / 2) | (centres > b + crossfade / 2)
        np.testing.assert_allclose(w[s][outside], 0.0, atol=1e-9)
    edges_ = [0.0, *bounds, float(total)]
    for s, b in enumerate(bounds):  # between the neighbours' middles the outgoing section fades out monotonically
        near = (centres > (edges_[s] + b) / 2) & (centres < (b + edges_[s + 2]) / 2)
        assert (np.diff(w[s][near]) <= 1e-12).all() and (np.diff(w[s + 1][near]) >= -1e-12).all()


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 24), extra=st.integers(0, 60), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_blending_windows_of_one_latent_gives_that_latent_back(size, extra, seed, data):
    """The blend is a weighted average: windows cut from one tensor come back as that tensor, whatever the
    (positive) weights; the running blend equals the one-shot blend."""
    overlap = data.draw(st.integers(0, size - 1))
    plan = plan_windows(size + extra, size, overlap)
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(2, 3, plan.total, 4, generator=g)
    preds = [full.narrow(2, a, size) for a in plan.starts]
    weights = [torch.rand(size, generator=g) + 0.01 for _ in plan.starts]
    out = blend_windows(plan.total, plan.starts, preds, weights)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    running = WindowBlend(full)
    for a, p, w in zip(plan.starts, preds, weights, strict=True):
        running.add(slice(0, 2), a, p, w)
    torch.testing.assert_close(running.result(), out)


def test_seam_report_hears_a_click_and_not_a_smooth_tone():
    sr = 16000
    t = np.arange(4 * sr) / sr
    # notes four a second, each with an attack and a decay (the boundary falls inside a note)
    tone = 0.5 * np.sin(2 * np.pi * 330 * t) * np.exp(-6 * ((t + 0.125) % 0.25)) * np.minimum(1, ((t + 0.125) % 0.25)
                                                                                             * 200)
    assert seam_report(tone, sr, [2.0]).clean
    clicked = tone.copy()
    clicked[2 * sr: 2 * sr + 3] += 0.9
    report = seam_report(clicked, sr, [2.0])
    assert not report.clean and report.boundary_jump[0] > max(report.inside_jump)
    cut = np.concatenate([tone[: 2 * sr], -tone[2 * sr:][::-1]])  # a phase jump at the boundary
    assert max(seam_report(cut, sr, [2.0]).boundary_jump) >= max(seam_report(tone, sr, [2.0]).boundary_jump)


def test_seam_crossfade_keeps_the_given_audio_outside_the_new_span():
    sr = 1000
    given = np.linspace(-1, 1, 3000).astype(np.float32)
    generated = np.zeros(3000, dtype=np.float32)
    out = seam_crossfade(given, generated, [(0.0, 1.0), (2.0, 3.0)], sr, 0.05)
    np.testing.assert_array_equal(out[:1000], given[:1000])
    np.testing.assert_array_equal(out[2000:], given[2000:])
    assert np.all(out[1060:1940] == 0)  # the generated audio past the seams
    ramp = out[1000:1050] / given[1000:1050]
    assert (np.diff(ramp) < 0).all()  # fades from the given audio into the generated one


# -- generation on the tiny preset --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return mf.MelFusion.from_config("tiny")


def test_long_piece_has_the_length_asked_and_does_not_depend_on_the_window_batch(tiny):
    clip = tiny.config.sampling.seconds
    one = tiny.generate(image=IMG, text="calm", seconds=3 * clip + 0.3, window_batch=1, **FAST)
    many = tiny.generate(image=IMG, text="calm", seconds=3 * clip + 0.3, window_batch=16, **FAST)
    assert one.waveforms.shape == (1, int(round((3 * clip + 0.3) * tiny.sample_rate)))
    # the same up to float summation order (batched convolutions); Griffin-Lim amplifies that a little
    np.testing.assert_allclose(one.mel, many.mel, atol=1e-4)
    np.testing.assert_allclose(one.waveforms, many.waveforms, atol=2e-3)
    assert one.sections == [(0.0, 3 * clip + 0.3)]


def test_one_clip_is_not_windowed(tiny):
    a = tiny.generate(image=IMG, text="calm", **FAST)
    b = tiny.generate(image=IMG, text="calm", seconds=tiny.config.sampling.seconds, **FAST)
    np.testing.assert_array_equal(a.waveforms, b.waveforms)
    assert a.sections == []


def test_the_denoiser_batch_is_bounded_by_window_batch(tiny, monkeypatch):
    rows = []
    forward = type(tiny.denoiser).forward

    def spy(self, latents, *args, **kwargs):
        rows.append(latents.shape[0])
        return forward(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(tiny.denoiser), "forward", spy)
    clip = tiny.config.sampling.seconds
    tiny.generate(image=IMG, text="calm", seconds=6 * clip, window_batch=2, **FAST)
    assert max(rows) == 2 * 2  # two windows x two guidance branches, however long the piece
    assert sum(rows) // FAST["num_inference_steps"] == 2 * len(plan_windows(
        tiny.latent_shape(6 * clip)[1], tiny.latent_shape(clip)[1], tiny.latent_shape(clip)[1] // 2))


def test_the_configured_overlap_is_the_default_and_an_argument_wins(tiny, monkeypatch):
    from melfusion import longform

    seen = []
    plan = longform.plan_windows
    monkeypatch.setattr(longform, "plan_windows", lambda t, s, o: seen.append(o) or plan(t, s, o))
    clip = tiny.config.sampling.seconds
    frames = tiny.latent_shape(clip)[1]
    tiny.generate(image=IMG, text="x", seconds=3 * clip, **FAST)
    tiny.config.sampling.window_overlap = clip / 4
    try:
        tiny.generate(image=IMG, text="x", seconds=3 * clip, **FAST)
        tiny.generate(image=IMG, text="x", seconds=3 * clip, window_overlap=0.0, **FAST)
    finally:
        tiny.config.sampling.window_overlap = None
    assert seen == [frames // 2, frames // 4, 0]


def test_a_storyboard_of_one_picture_twice_is_the_long_piece_of_that_picture(tiny):
    """Section weights sum to 1: two sections with the same picture and caption blend back to one piece."""
    clip = tiny.config.sampling.seconds
    story = tiny.generate(images=[IMG, IMG], text="calm", durations=[clip, 1.5 * clip], **FAST)
    single = tiny.generate(image=IMG, text="calm", seconds=2.5 * clip, **FAST)
    np.testing.assert_allclose(story.mel, single.mel, atol=1e-4)
    np.testing.assert_allclose(story.waveforms, single.waveforms, atol=2e-3)
    assert story.sections == [(0.0, clip), (clip, 2.5 * clip)]


def test_storyboard_sections_follow_their_pictures(tiny):
    clip = tiny.config.sampling.seconds
    ab = tiny.generate(images=[IMG, IMG2], texts=["calm", "lively"], **FAST)
    aa = tiny.generate(images=[IMG, IMG], texts=["calm", "calm"], **FAST)
    sr = tiny.sample_rate
    assert ab.waveforms.shape[-1] == int(round(2 * clip * sr))
    half = int(clip * sr)
    # the first section is (nearly) the same, the second differs with the other picture and caption
    first = np.abs(ab.waveforms[0, : half // 2] - aa.waveforms[0, : half // 2]).mean()
    second = np.abs(ab.waveforms[0, half + half // 2:] - aa.waveforms[0, half + half // 2:]).mean()
    assert second > 3 * first


@pytest.mark.parametrize("kwargs, name", [
    (dict(images=[IMG, IMG2], texts=["a", "b", "c"]), "texts"),
    (dict(images=[IMG, IMG2], durations=[1.0]), "durations"),
    (dict(images=[IMG, IMG2], durations=[1.0, -1.0]), r"durations\[1\]"),
    (dict(images=[IMG, IMG2], durations=[1.0, 1.0], seconds=3.0), "durations"),
    (dict(images=[IMG, "missing.png"]), r"images\[1\]"),
    (dict(images=[]), "images"),
    (dict(images=IMG), "images"),
    (dict(images=[IMG], image=IMG), "images"),
    (dict(images=[IMG], crossfade=float("nan")), "crossfade"),
    (dict(seconds=5.0, window_seconds=0.0), "window_seconds"),
    (dict(seconds=5.0, window_overlap=5.0), "window_overlap"),
    (dict(seconds=5.0, window_batch=0), "window_batch"),
    (dict(continue_seconds=1.0), "continue_seconds"),
    (dict(regenerate=(0.0, 1.0)), "regenerate"),
    (dict(audio=np.zeros(16000, np.float32)), "audio"),
    (dict(audio=np.full(16000, np.nan, np.float32), continue_seconds=1.0), "audio"),
    (dict(audio=np.zeros(16000, np.float32), regenerate=(0.5, 2.0)), "regenerate"),
    (dict(audio=np.zeros(16000, np.float32), regenerate=(0.5,)), "regenerate"),
    (dict(audio=np.zeros(16000, np.float32), continue_seconds=1.0, regenerate=(0.1, 0.2)), "continue_seconds"),
    (dict(audio="missing.wav", continue_seconds=1.0), "audio"),
    (dict(seconds=5.0, negative_text=["a"]), "negative_text"),
])
def test_bad_long_form_arguments_name_themselves(tiny, kwargs, name):
    kwargs = {"image": IMG, "text": "x", **kwargs} if "images" not in kwargs else {"text": "x", **kwargs}
    if "images" in kwargs and "image" in kwargs and kwargs["image"] is None:
        del kwargs["image"]
    with pytest.raises(ValueError, match=f"^{name}"):
        tiny.generate(**kwargs, **FAST)


def test_a_batch_of_texts_makes_a_batch_of_long_pieces(tiny):
    clip = tiny.config.sampling.seconds
    out = tiny.generate(image=IMG, text=["calm", "lively"], seconds=2.2 * clip, num_samples=2, **FAST)
    assert out.waveforms.shape == (4, int(round(2.2 * clip * tiny.sample_rate)))
    assert out.texts == ["calm", "calm", "lively", "lively"]


def test_continuation_keeps_the_prompt_and_adds_the_seconds_asked(tiny):
    sr = tiny.sample_rate
    prompt = tiny.generate(image=IMG, text="calm", **FAST).waveforms[0]
    out = tiny.generate(image=IMG2, text="lively", audio=(prompt, sr), continue_seconds=1.0, **FAST)
    assert out.waveforms.shape == (1, prompt.size + sr)
    seam = int(0.05 * sr)
    np.testing.assert_array_equal(out.waveforms[0, : prompt.size - seam], prompt[: prompt.size - seam])
    assert np.abs(out.waveforms[0, prompt.size:]).max() > 0.01  # new music after it
    # a prompt at another rate is resampled to the model's
    resampled = tiny.generate(image=IMG, text="calm", audio=(prompt[::2].copy(), sr // 2), continue_seconds=0.5,
                              **FAST)
    assert resampled.waveforms.shape[-1] == int(round((prompt[::2].size / (sr // 2) + 0.5) * sr))


def test_inpainting_keeps_everything_outside_the_span_sample_for_sample(tiny, tmp_path):
    import soundfile as sf

    sr = tiny.sample_rate
    clip = tiny.generate(image=IMG, text="calm", seconds=2 * tiny.config.sampling.seconds, **FAST).waveforms[0]
    path = tmp_path / "clip.wav"
    sf.write(path, clip, sr, subtype="FLOAT")
    before = path.read_bytes()
    out = tiny.generate(image=IMG2, text="lively", audio=str(path), regenerate=(0.5, 1.5), **FAST)
    a, b = int(0.5 * sr), int(1.5 * sr)
    assert out.waveforms.shape == (1, clip.size)
    np.testing.assert_array_equal(out.waveforms[0, :a], clip[:a])
    np.testing.assert_array_equal(out.waveforms[0, b:], clip[b:])
    inside = out.waveforms[0, a + 800: b - 800]
    assert np.abs(inside - clip[a + 800: b - 800]).mean() > 1e-3  # repainted
    assert path.read_bytes() == before  # the input file is untouched


def test_known_latent_frames_follow_the_noised_known_latent(tiny):
    """RePaint: after every step the kept frames are the given audio's latent noised to the next level."""
    from melfusion.longform import encode_audio

    sr = tiny.sample_rate
    clip = tiny.generate(image=IMG, text="calm", **FAST).waveforms[0]
    seen = []

    def spy(model, i, t, tensors):
        seen.append(tensors["latents"].clone())

    out = tiny.generate(image=IMG, text="calm", audio=(clip, sr), continue_seconds=1.0, callback_on_step_end=spy,
                        **FAST)
    assert out.waveforms.shape[-1] == clip.size + sr
    frames = seen[-1].shape[2]
    known = encode_audio(tiny, clip, frames)
    kept = int(np.floor(clip.size / sr / 0.02 + 1e-6))  # tiny: 20 ms latent frames
    torch.testing.assert_close(seen[-1][:, :, :kept], known[:, :, :kept].expand_as(seen[-1][:, :, :kept]))
    assert not torch.allclose(seen[0][:, :, :kept], known[:, :, :kept])  # still noisy before the end


def test_noising_matches_the_ddim_formula():
    from diffusers import DDIMScheduler

    from melfusion.longform import _noised

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(10)
    clean = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[3:4]
    got = _noised(sched, clean, t, torch.Generator().manual_seed(5), clean)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    ab = sched.alphas_cumprod[int(t)]
    torch.testing.assert_close(got, ab.sqrt() * clean + (1 - ab).sqrt() * noise)


def test_a_day_long_piece_is_refused_before_any_work(tiny):
    with pytest.raises(ValueError, match="^seconds: .*GiB"):
        tiny.generate(image=IMG, text="x", seconds=50_000.0, **FAST)


def test_stable_audio_layout_long_piece():
    model = mf.MelFusion.from_config("tiny_stable_audio")
    clip = model.config.sampling.seconds
    out = model.generate(image=IMG, text="x", seconds=2.5 * clip, **FAST)
    assert out.waveforms.shape[0] == 1 and out.waveforms.shape[-1] == int(round(2.5 * clip * model.sample_rate))
    story = model.generate(images=[IMG, IMG2], text="x", **FAST)
    assert len(story.sections) == 2
