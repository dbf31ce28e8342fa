"""The gradio app's library side (melfusion.app.Studio), its /generate API through gradio's own client, the image
strength it exposes (MelFusion.image_strength) and `melfusion app`'s errors. The browser test is test_app_browser.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from melfusion import MelFusion
from melfusion.synapse.mixers import mix
from melfusion.synapse.processors import SynapseHook, SynapseState

ROOT = Path(__file__).resolve().parent.parent
BLUE = ROOT / "examples" / "images" / "blue-bright.png"
RED = ROOT / "examples" / "images" / "red-dark.png"
MELFUSION = Path(sys.executable).with_name("melfusion")


@pytest.fixture(scope="module")
def mini():
    return MelFusion.from_pretrained("mini")


# -- the image strength ---------------------------------------------------------------------------------------
class _Scalar(torch.nn.Module):
    """A convex mixer with one fixed weight per layer (as the shipped 'convex' mixer at fixed alphas)."""

    def __init__(self, alphas):
        super().__init__()
        self.alphas = torch.tensor(alphas)

    def forward(self, layer, music, image, timestep=None):
        return mix(music, image, self.alphas[layer])


@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(0, 1), strength=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_strength_scales_every_alpha(alpha, strength, seed):
    """lerp(K, mix(K, I, a), s) == mix(K, I, s * a): the strength is every alpha scaled by it."""
    g = torch.Generator().manual_seed(seed)
    key, value = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    image = (torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g))
    state = SynapseState(features={"a": image}, strength=strength)
    k, v = SynapseHook(_Scalar([alpha]), ["a"], state=state)("a", key, value)
    scaled = SynapseHook(_Scalar([alpha * strength]), ["a"], state=SynapseState(features={"a": image}))
    k2, v2 = scaled("a", key, value)
    torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)


def test_strength_zero_is_exactly_text_only_and_one_is_as_trained(mini):
    base = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=1,
                         progress=False).waveforms
    with mini.image_strength(1.0):
        one = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=1,
                            progress=False).waveforms
    with mini.image_strength(0.0):
        zero = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=1,
                             progress=False).waveforms
    with mini.synapse.mixer.forced(0.0):
        forced = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=1,
                               progress=False).waveforms
    with mini.image_strength(0.5):
        half = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=1,
                             progress=False).waveforms
    alphas = mini.synapse.mixer.alphas()
    with mini.synapse.mixer.forced(alphas.reshape(len(alphas), -1).mean(1) * 0.5):
        half_forced = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=1,
                                    progress=False).waveforms
    np.testing.assert_array_equal(one, base)
    np.testing.assert_allclose(zero, forced, atol=1e-5)
    np.testing.assert_allclose(half, half_forced, atol=1e-4)
    assert np.abs(half - base).max() > 1e-3 and np.abs(half - zero).max() > 1e-3  # it changes the music
    assert mini.synapse_hook.state.strength == 1.0  # restored after the block


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x", True])
def test_strength_refuses_bad_values(mini, bad):
    with pytest.raises(ValueError, match="^strength: "):
        with mini.image_strength(bad):
            pass


# -- the Studio: the app's generate path is the library's ------------------------------------------------------
def test_studio_generate_equals_library_generate(mini, tmp_path):
    from melfusion.app import Studio

    studio = Studio(output_dir=tmp_path / "app")
    studio._models["mini"] = mini  # the same model object: same weights, no second load
    wav, png, out = studio.generate(str(BLUE), "a calm flute melody", steps=4, seed=7, image_strength=1.0)
    ref = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=4, seed=7, progress=False)
    np.testing.assert_array_equal(out.waveforms, ref.waveforms)
    assert wav.parent == png.parent == tmp_path / "app" and wav.suffix == ".wav" and png.suffix == ".png"
    ref_path = ref.save(tmp_path / "ref.wav")[0]
    np.testing.assert_array_equal(sf.read(wav, dtype="int16")[0], sf.read(ref_path, dtype="int16")[0])


def test_studio_compare_text_only_is_strength_zero(mini, tmp_path):
    from melfusion.app import Studio

    studio = Studio(output_dir=tmp_path)
    studio._models["mini"] = mini
    (_, _, with_image), (_, _, text_only) = studio.compare(str(BLUE), None, "a calm flute melody", steps=3, seed=2)
    with mini.image_strength(0.0):
        ref = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=3, seed=2,
                            progress=False)
    np.testing.assert_array_equal(text_only.waveforms, ref.waveforms)
    assert np.abs(with_image.waveforms - text_only.waveforms).max() > 1e-3
    (_, _, a), (_, _, b) = studio.compare(str(BLUE), str(RED), "a calm flute melody", steps=3, seed=2)
    assert np.abs(a.waveforms - b.waveforms).max() > 1e-3


def test_studio_storyboard(mini, tmp_path):
    from melfusion.app import Studio

    studio = Studio(output_dir=tmp_path)
    studio._models["mini"] = mini
    wav, png, out = studio.storyboard([str(BLUE), str(RED)], "a calm flute melody", "2.56, 2.56", steps=3)
    assert len(out.sections) == 2 and abs(out.waveforms.shape[-1] / out.sample_rate - 5.12) < 0.05
    assert wav.exists() and png.exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image": None}, "^image: upload a picture"),
    ({"text": "  "}, "^text: type a prompt"),
    ({"seed": 1.5}, "^seed: expected a whole number"),
    ({"image_strength": 2.0}, "^strength: expected a number in"),
    ({"model": "preset:nope"}, "^model: unknown preset 'nope'"),
])
def test_studio_bad_inputs_are_one_line(mini, tmp_path, kwargs, message):
    from melfusion.app import Studio

    studio = Studio(output_dir=tmp_path)
    studio._models["mini"] = mini
    args = {"image": str(BLUE), "text": "a calm flute melody", "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        studio.generate(**args)


@pytest.mark.parametrize(("durations", "text", "message"), [
    ("-1, 2", "a calm flute melody", "^durations: expected a positive number of seconds"),
    ("nan, 2", "a calm flute melody", "^durations: expected a positive number of seconds"),
    ("1,,2", "a calm flute melody", "^durations: expected numbers separated by commas"),
    ("1, 2, 3", "a calm flute melody", "^durations: 3 numbers for 2 pictures"),
    ("100, 100", "a calm flute melody", "^durations: 200 s in all, over this app's limit of 120 s"),
    ("", "one\ntwo\nthree", "^text: 3 prompt lines for 2 pictures"),
])
def test_studio_storyboard_bad_inputs(mini, tmp_path, durations, text, message):
    from melfusion.app import Studio

    studio = Studio(output_dir=tmp_path)
    studio._models["mini"] = mini
    with pytest.raises(ValueError, match=message):
        studio.storyboard([str(BLUE), str(RED)], text, durations, steps=2)
    with pytest.raises(ValueError, match="^images: upload one or more pictures"):
        studio.storyboard([], "a calm flute melody", steps=2)


def test_studio_runs_one_generation_at_a_time(mini, tmp_path):
    """Every request shares the model's synapse state: two at once (generate and compare, as two tabs) must give
    what each gives alone."""
    import threading

    from melfusion.app import Studio

    studio = Studio(output_dir=tmp_path)
    studio._models["mini"] = mini
    alone_a = studio.generate(str(BLUE), "a calm flute melody", steps=3, seed=1)[2].waveforms
    alone_b = studio.compare(str(RED), None, "a lively trumpet tune", steps=3, seed=2)[1][2].waveforms
    results = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("a", studio.generate(
                   str(BLUE), "a calm flute melody", steps=3, seed=1)[2].waveforms)),
               threading.Thread(target=lambda: results.__setitem__("b", studio.compare(
                   str(RED), None, "a lively trumpet tune", steps=3, seed=2)[1][2].waveforms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results["a"], alone_a)
    np.testing.assert_array_equal(results["b"], alone_b)


def test_studio_refuses_a_file_that_is_not_an_image(mini, tmp_path):
    from melfusion.app import Studio

    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    studio = Studio(output_dir=tmp_path / "out")
    studio._models["mini"] = mini
    with pytest.raises(ValueError, match="^image: cannot read"):
        studio.generate(str(fake), "a calm flute melody", steps=2)


def test_studio_refuses_a_picture_over_the_pixel_limit(mini, tmp_path, monkeypatch):
    from PIL import Image

    from melfusion import images
    from melfusion.app import Studio

    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)  # the real limit, made small for a small file
    Image.new("RGB", (101, 100), "blue").save(tmp_path / "big.png")
    studio = Studio(output_dir=tmp_path / "out")
    studio._models["mini"] = mini
    with pytest.raises(ValueError, match=r"^image: .*big\.png' is 101x100, over the 10000 pixel limit"):
        studio.generate(str(tmp_path / "big.png"), "a calm flute melody", steps=2)


def test_alphas_figure_labels(mini):
    from melfusion.app import alphas_figure

    fig = alphas_figure(mini)
    ax = fig.axes[0]
    assert "alpha" in ax.get_ylabel() and "layer" in ax.get_xlabel()
    assert len(ax.patches) == len(mini.synapse.music_layer_names)
    heights = sorted(p.get_height() for p in ax.patches)
    np.testing.assert_allclose(heights, sorted(mini.synapse.mixer.alphas().reshape(len(heights), -1).mean(1)),
                               atol=1e-6)
    texts = [t.get_text() for t in ax.texts]
    assert all(any(f"{h:.2f}" == t for t in texts) for h in heights)  # every bar carries its value


# -- gradio's own client: /generate with image and text first, the rest optional -----------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_client_generate_endpoint(mini, tmp_path):
    pytest.importorskip("gradio", reason="melfusion[app] (gradio) is not installed")
    from gradio_client import Client, handle_file

    from melfusion.app import Studio, build_app

    studio = Studio(output_dir=tmp_path / "app")
    studio._models["mini"] = mini
    demo = build_app(studio=studio)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=200_000)  # bytes: a small limit, to see a larger upload refused
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
        names = [p["parameter_name"] for p in params]
        assert names[:2] == ["image", "text"]
        assert names[2:] == ["steps", "guidance", "image_guidance", "image_strength", "seconds", "seed", "model"]
        assert all(p["parameter_has_default"] for p in params[2:])
        wav, png, info = client.predict(handle_file(str(BLUE)), "a calm flute melody", steps=4, seed=3,
                                        api_name="/generate")
        assert "2.56 s at 16000 Hz" in info and Path(png).suffix == ".png"
        ref = mini.generate(image=str(BLUE), text="a calm flute melody", num_inference_steps=4, seed=3,
                            progress=False)
        ref_path = ref.save(tmp_path / "ref.wav")[0]
        np.testing.assert_array_equal(sf.read(wav, dtype="int16")[0], sf.read(ref_path, dtype="int16")[0])
        fake = tmp_path / "notes.png"
        fake.write_text("not a picture")
        with pytest.raises(Exception, match="cannot read"):
            client.predict(handle_file(str(fake)), "a calm flute melody", api_name="/generate")
        with pytest.raises(Exception, match="^steps: expected a whole number"):
            client.predict(handle_file(str(BLUE)), "a calm flute melody", steps=2.5, api_name="/generate")
        truncated = tmp_path / "truncated.png"
        truncated.write_bytes(BLUE.read_bytes()[:2000])
        with pytest.raises(Exception, match=r"'truncated\.png'") as info:  # the upload's name, not the cache's
            client.predict(handle_file(str(truncated)), "a calm flute melody", api_name="/generate")
        assert "/gradio/" not in str(info.value)
        big = tmp_path / "big.png"
        big.write_bytes(BLUE.read_bytes() + b"\0" * 300_000)  # a valid PNG, with trailing bytes past the limit
        with pytest.raises(Exception, match="(?i)size|large|exceed"):
            client.predict(handle_file(str(big)), "a calm flute melody", api_name="/generate")
    finally:
        demo.close()


# -- melfusion app: bad flags are one line and exit status 2 ------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--port", "0"], "--port: expected 1-65535"),
    (["--port", "70000"], "--port: expected 1-65535"),
    (["--max-upload-mb", "-1"], "--max-upload-mb: expected a positive number"),
    (["--device", "meta"], "--device: 'meta'"),
])
def test_app_command_bad_flags(args, message):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([str(MELFUSION), "app", *args], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_app_command_without_gradio_says_what_to_install(tmp_path):
    # a gradio that cannot be imported (a stub package raising ImportError) stands in for one not installed
    stub = tmp_path / "gradio"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('No module named gradio')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tmp_path))
    run = subprocess.run([str(MELFUSION), "app"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "pip install 'melfusion[app]'" in run.stderr and "Traceback" not in run.stderr


def test_app_help_lists_flags_with_defaults():
    run = subprocess.run([str(MELFUSION), "app", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for flag in ("--host", "--port", "--model", "--max-upload-mb"):
        assert flag in run.stdout
    assert "127.0.0.1" in run.stdout and "7860" in run.stdout
