"""The tiny preset end to end: determinism, image effect, output range, argument errors."""

import numpy as np
import pytest
import torch
from PIL import Image


def _image(seed):
    return torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(seed))


def test_generate_shapes_range_and_determinism(tiny_model):
    a = tiny_model.generate(image=_image(0), text="calm piano", num_inference_steps=3, progress=False)
    b = tiny_model.generate(image=_image(0), text="calm piano", num_inference_steps=3, progress=False)
    assert a.waveforms.dtype == np.float32 and a.waveforms.ndim == 2
    assert a.sample_rate == 16_000
    assert np.isfinite(a.waveforms).all() and np.abs(a.waveforms).max() <= 1.0
    assert np.array_equal(a.waveforms, b.waveforms) and np.array_equal(a.mel, b.mel)
    c = tiny_model.generate(image=_image(0), text="calm piano", num_inference_steps=3, seed=1, progress=False)
    assert not np.array_equal(a.mel, c.mel)


def test_different_image_changes_music_unless_alpha_is_zero(tiny_model):
    kw = dict(text="calm piano", num_inference_steps=3, progress=False)
    a = tiny_model.generate(image=_image(0), **kw).mel
    b = tiny_model.generate(image=_image(1), **kw).mel
    assert np.abs(a - b).max() > 1e-4
    with tiny_model.synapse.mixer.forced(0.0):
        a0 = tiny_model.generate(image=_image(0), **kw).mel
        b0 = tiny_model.generate(image=_image(1), **kw).mel
        text_only = tiny_model.generate(image=None, **kw).mel
    np.testing.assert_allclose(a0, b0, atol=1e-5)
    np.testing.assert_allclose(a0, text_only, atol=1e-5)


def test_batching_samples_and_image_guidance(tiny_model, tmp_path):
    out = tiny_model.generate(image=_image(0), text=["a", "b"], num_samples=2, image_guidance_scale=2.0,
                              num_inference_steps=2, progress=False)
    assert out.waveforms.shape[0] == 4 and out.texts == ["a", "a", "b", "b"]
    paths = out.save(tmp_path / "x.wav")
    assert [p.name for p in paths] == ["x_0.wav", "x_1.wav", "x_2.wav", "x_3.wav"]
    png = out.save_spectrogram(tmp_path / "x.png")
    assert Image.open(png).size[0] > 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_pil_mode_is_accepted(tiny_model, tmp_path, mode):
    im = Image.new("RGB", (30, 20), (200, 30, 90)).convert(mode)
    path = tmp_path / f"img.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}"
    im.save(path)
    out = tiny_model.generate(image=str(path), text="x", num_inference_steps=1, progress=False)
    assert np.isfinite(out.waveforms).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text": ""}, None),
        ({"text": []}, "text"),
        ({"text": [1]}, r"text\[0\]"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"seconds": 0.0}, "seconds"),
        ({"image": "/does/not/exist.png"}, "image: no such file"),
        ({"image": torch.full((3, 8, 8), 2.0)}, "image: tensor values"),
        ({"image": 3}, "image: expected a path"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_model, kwargs, match):
    args = {"image": _image(0), "text": "x", "num_inference_steps": 1, "progress": False, **kwargs}
    if match is None:  # the empty prompt is a valid (unconditional) prompt
        assert tiny_model.generate(**args).waveforms.shape[0] == 1
        return
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(**args)


def test_corrupt_image_file(tiny_model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read"):
        tiny_model.generate(image=str(bad), text="x", num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        tiny_model.generate(image=str(empty), text="x", num_inference_steps=1, progress=False)


def test_feature_source_trajectory_modes(tiny_model):
    fs = tiny_model.feature_source
    latents = fs.encode(_image(0)[None])
    assert latents.shape == (1, 4, fs.latent_size, fs.latent_size)
    for mode in ("reverse", "inversion", "noise"):
        cache = fs.trajectory(latents, [999, 500, 1], mode=mode)
        assert cache.timesteps == [1, 500, 999]
        k, v = cache.at(480)["up_blocks.1.attentions.0"]
        assert k.shape == (1, 8, fs.latent_size**2, 8) and torch.isfinite(k).all()
        assert cache.at(480) is cache.at(500)
    with pytest.raises(ValueError, match="mode"):
        fs.trajectory(latents, [1], mode="forward")
    with pytest.raises(ValueError, match="timesteps"):
        fs.trajectory(latents, [1000])


def test_encoder_taps_reach_the_music():
    """synapse.image_layers other than the feature source's default (here encoder taps) are captured and
    change the music; they used to be dropped silently, which made the encoder ablation a text-only model."""
    import melfusion as mf

    syn = {"mixer": {"name": "convex", "params": {"init": 0.5}}, "aligner": {"name": "pool"},
           "image_layers": ["down_blocks.0.attentions.0"], "music_layers": ["down_blocks.2.attentions.0"]}
    torch.manual_seed(0)
    model = mf.MelFusion.from_config(mf.MelFusionConfig.preset("tiny", synapse=syn))
    assert model.feature_source.layer_names == ["down_blocks.0.attentions.0"]
    image = Image.new("RGB", (64, 64), (200, 120, 40))

    def run(alpha):
        with torch.no_grad():
            model.synapse.mixer.alpha.fill_(alpha)
        return np.asarray(model.generate(image=image, text="a flute", num_inference_steps=3, seed=0).waveforms)

    assert np.abs(run(5.0) - run(-5.0)).max() > 1e-4


def test_synapse_refuses_features_without_its_layers(tiny_model):
    from melfusion.synapse.features import FeatureCache

    cache = FeatureCache()
    k = torch.zeros(1, 4, 16, 8)
    cache.add(10, {"not.a.synapse.layer": (k, k)})
    with pytest.raises(ValueError, match="lack the synapse's image layers"):
        tiny_model.synapse.align(cache, tokens=8)
