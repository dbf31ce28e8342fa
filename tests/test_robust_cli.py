"""Every bad input to ``melfusion generate`` gets one line naming the argument or file, exit status 2, and
nothing the user owns is touched; the Python API refuses the same values with a ValueError naming them."""

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import melfusion as mf
from melfusion.cli import describe_error, main

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "examples/images/sunset.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("m") / "model")


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["generate", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.lstrip().startswith(("melfusion:", "note:"))]  # drop progress and notes
    return code, "\n".join(lines)


def _gen(model_dir: Path, out: Path, *extra: str, image: Path = PICTURE) -> list[str]:
    return ["--model", str(model_dir), "--image", str(image), "--text", "calm", "--out", str(out),
            "--steps", "2", *extra]


def _one_line_exit_2(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# -- outputs -----------------------------------------------------------------------------------------------
def test_the_input_photo_is_never_the_spectrogram(tmp_path, capsys, model_dir):
    photo = tmp_path / "holiday.png"
    shutil.copy(PICTURE, photo)
    before = photo.read_bytes()
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "holiday.wav", image=photo))
    _one_line_exit_2(code, err, "--spectrogram", "holiday.png", "input")
    assert photo.read_bytes() == before and not (tmp_path / "holiday.wav").exists()
    # even with --overwrite: an input is never an output
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "holiday.wav", "--overwrite", image=photo))
    _one_line_exit_2(code, err, "input")
    code, err = _run(capsys, *_gen(model_dir, photo, "--overwrite", image=photo))
    _one_line_exit_2(code, err, "--out")
    assert photo.read_bytes() == before


def test_existing_outputs_need_overwrite(tmp_path, capsys, model_dir):
    out = tmp_path / "song.wav"
    out.write_bytes(b"my recording")
    code, err = _run(capsys, *_gen(model_dir, out))
    _one_line_exit_2(code, err, "--out", "already exists", "--overwrite")
    assert out.read_bytes() == b"my recording" and not out.with_suffix(".png").exists()
    spectrogram = tmp_path / "song.png"
    out.unlink()
    spectrogram.write_bytes(b"my picture")
    code, err = _run(capsys, *_gen(model_dir, out))
    _one_line_exit_2(code, err, "--spectrogram", "already exists")
    assert not out.exists() and spectrogram.read_bytes() == b"my picture"
    code, err = _run(capsys, *_gen(model_dir, out, "--overwrite"))
    assert code == 0, err
    assert out.stat().st_size > 100 and spectrogram.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name, needle", [("song", "no suffix"), ("x.mp3", "'.mp3'"), ("x.WAV.txt", "'.txt'"),
                                          ("folder", "is a folder"), ("file/x.wav", "is a file")])
def test_bad_out_paths_are_refused_before_generating(tmp_path, capsys, model_dir, name, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    start = time.perf_counter()
    code, err = _run(capsys, *_gen(model_dir, tmp_path / name))
    _one_line_exit_2(code, err, "--out", needle)
    assert time.perf_counter() - start < 5  # refused before any model is built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_several_samples_check_every_file(tmp_path, capsys, model_dir):
    (tmp_path / "s_1.wav").write_bytes(b"mine")
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "s.wav", "--num-samples", "2"))
    _one_line_exit_2(code, err, "s_1.wav", "already exists")
    assert (tmp_path / "s_1.wav").read_bytes() == b"mine" and not (tmp_path / "s_0.wav").exists()


# -- numbers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, needle", [
    ("--seconds", "inf", "--seconds"), ("--seconds", "nan", "--seconds"), ("--seconds", "-1", "--seconds"),
    ("--seconds", "0", "--seconds"), ("--seconds", "5e4", "GiB"), ("--seconds", "1e6", "<= 86400"),
    ("--seconds", "1e308", "<= 86400"), ("--num-samples", "100000", "--num-samples"),
    ("--num-samples", "0", "--num-samples"), ("--guidance", "inf", "--guidance"),
    ("--guidance", "nan", "--guidance"), ("--guidance", "-2", "--guidance"), ("--guidance", "1e30", "<= 1000"),
    ("--image-guidance", "inf", "--image-guidance"), ("--seed", str(2**70), "--seed"),
    ("--steps", "0", "--steps"), ("--steps", "1000", "at most 999"), ("--steps", "1.5", "--steps"),
    ("--image-steps", "0", "--image-steps"), ("--guidance", "-inf", "--guidance"),
])
def test_bad_numbers_exit_2_in_one_line_and_write_nothing(tmp_path, capsys, model_dir, flag, value, needle):
    start = time.perf_counter()
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", flag, value))
    _one_line_exit_2(code, err, needle)
    assert time.perf_counter() - start < 60  # sizes are checked before allocating
    assert list(tmp_path.iterdir()) == []


def test_device_without_cuda(tmp_path, capsys, model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", "--device", "cuda"))
    _one_line_exit_2(code, err, "--device", "CUDA")
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", "--device", "banana"))
    _one_line_exit_2(code, err, "--device", "banana")
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", "--device", "cpu:7"))
    _one_line_exit_2(code, err, "--device", "cpu:7")


# -- files -------------------------------------------------------------------------------------------------
def test_truncated_safetensors_names_the_file(tmp_path, capsys, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    for victim in ("synapse.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        data = (model_dir / victim).read_bytes()
        (folder / victim).write_bytes(data[: len(data) // 2])
        code, err = _run(capsys, *_gen(folder, tmp_path / "o.wav"))
        _one_line_exit_2(code, err, Path(victim).name)
        (folder / victim).write_bytes(data)


def test_a_config_naming_another_mixer_is_one_line(tmp_path, capsys, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "melfusion_config.json").read_text())
    cfg["synapse"]["mixer"] = {"name": "per_head", "params": {}}
    (folder / "melfusion_config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, *_gen(folder, tmp_path / "o.wav"))
    _one_line_exit_2(code, err, "synapse.safetensors", "does not fit")


@pytest.mark.parametrize("text, needle", [
    ("name: [unclosed", "not valid YAML"), ("- a list\n- not a mapping", "mapping"),
    ("denoiser: {name: no_such_denoiser}", "no_such_denoiser"),
    ("sampling: {guidance_scale: .inf}", "guidance_scale"), ("sampling: {seconds: .nan}", "seconds"),
    ("synapse: {mixer: {name: convex, params: {init: .inf}}}", "init"),
    ("feature_source: {name: stable_diffusion}", "feature_source"), ("", "mapping"),
    ("sample_rate: 16000\nsample_rate: 8000", "given twice"),
    ("vocoder: {name: griffin_lim, params: {n_iter: 4}, params: {n_iter: abc}}", "given twice"),
    ("n_mels: 100000000", "n_mels"), ("hop_length: 1000000", "hop_length"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     "feature_source: {name: stable_diffusion, params: {bomb: [*e, *e, *e, *e, *e, *e, *e, *e, *e]}}", "bomb"),
])
def test_bad_config_files(tmp_path, capsys, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    code, err = _run(capsys, "--config", str(config), "--image", str(PICTURE), "--text", "x",
                     "--out", str(tmp_path / "o.wav"), "--steps", "1")
    _one_line_exit_2(code, err, needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["denoiser"]["params"]["unet"]["config"].update(block_out_channels="abc"), "denoiser.params"),
    (lambda c: c["vocoder"]["params"].update(n_iter=float("nan")), "n_iter"),
    (lambda c: c["denoiser"]["params"]["unet"]["config"].update(bogus=1), "['bogus'] are not parameters"),
])
def test_a_config_whose_part_cannot_be_built_is_one_line(tmp_path, capsys, edit, needle):
    cfg = mf.MelFusionConfig.preset("tiny").to_dict()
    edit(cfg)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "--config", str(tmp_path / "c.json"), "--image", str(PICTURE), "--text", "x",
                     "--out", str(tmp_path / "o.wav"), "--steps", "1")
    _one_line_exit_2(code, err, needle)


def test_decompression_bomb_png(tmp_path, capsys, model_dir):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(bomb)  # 196 M pixels in about 30 kB: PIL itself raises on it
    assert bomb.stat().st_size < 1_000_000
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", image=bomb))
    _one_line_exit_2(code, err, "--image", "bomb.png", "pixel limit")


def test_image_that_is_a_folder_and_missing_model_folders(tmp_path, capsys, model_dir):
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", image=tmp_path))
    _one_line_exit_2(code, err, "--image", "is a folder")
    code, err = _run(capsys, *_gen(tmp_path / "no-such-model", tmp_path / "o.wav"))
    _one_line_exit_2(code, err, "no such folder", "no-such-model", "mini")
    code, err = _run(capsys, *_gen(Path("./typo-model"), tmp_path / "o.wav"))
    _one_line_exit_2(code, err, "no such folder", "mini")


def test_unexpected_errors_are_one_line_with_exit_1():
    code, line = describe_error(RuntimeError("boom\nsecond line"))
    assert code == 1 and "\n" not in line and "bug" in line and "boom second line" in line
    code, line = describe_error(MemoryError())
    assert code == 2 and "out of memory" in line


# -- the Python API ----------------------------------------------------------------------------------------
def test_seconds_are_exact(tiny_model):
    for seconds in (0.3, 0.05, 1.0):
        out = tiny_model.generate(image=PICTURE, text="x", num_inference_steps=1, seconds=seconds, progress=False)
        assert out.waveforms.shape[-1] == round(seconds * out.sample_rate), seconds
        assert out.mel.shape[1] == math.ceil(seconds * 16_000 / 160)


def test_an_rgba_tensor_is_composited_like_an_rgba_picture():
    from melfusion.images import load_images

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    from_pil = load_images(Image.fromarray(rgba, "RGBA"))
    from_tensor = load_images(torch.from_numpy(rgba).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(from_tensor, from_pil, atol=1 / 255 + 1e-6, rtol=0)


BAD = st.sampled_from([math.inf, -math.inf, math.nan, 1e309])


@given(field=st.sampled_from(["guidance_scale", "image_guidance_scale", "seconds"]), value=BAD)
def test_generate_refuses_non_finite_numbers(tiny_model, field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        tiny_model.generate(image=None, text="x", num_inference_steps=1, progress=False, **{field: value})


@given(path=st.sampled_from([("sampling", "guidance_scale"), ("sampling", "image_guidance_scale"),
                             ("sampling", "seconds"), ("synapse", "mixer", "params", "init"),
                             ("vocoder", "params", "momentum")]),
       value=BAD)
def test_configs_refuse_non_finite_fields(path, value):
    data = mf.MelFusionConfig.preset("tiny").to_dict()
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(ValueError, match=path[-1]):
        mf.MelFusionConfig.model_validate(data)


@given(seed=st.one_of(st.integers(min_value=2**64, max_value=2**80), st.integers(max_value=-(2**63) - 1),
                      st.just(True), st.just(1.5)))
def test_generate_refuses_seeds_torch_cannot_take(tiny_model, seed):
    with pytest.raises(ValueError, match="^seed: "):
        tiny_model.generate(image=None, text="x", num_inference_steps=1, seed=seed, progress=False)


# -- found by a red-team pass ------------------------------------------------------------------------------
def test_a_dangling_link_as_out_is_the_users(tmp_path, capsys, model_dir):
    link = tmp_path / "dl.wav"
    link.symlink_to(tmp_path / "nowhere.wav")
    code, err = _run(capsys, *_gen(model_dir, link))
    _one_line_exit_2(code, err, "already exists")
    assert link.is_symlink()


def test_pictures_with_odd_pixels():
    from melfusion.images import load_images

    nan = Image.fromarray(np.full((8, 8), np.nan, np.float32), "F")
    with pytest.raises(ValueError, match="^image: .*NaN"):
        load_images(nan)
    dark16 = Image.fromarray(np.full((8, 8), 200, np.uint16))
    assert dark16.mode.startswith("I;16")
    assert float(load_images(dark16).max()) < 0.01  # 200 of 65535 is dark, not 200 of 255
    with pytest.raises(ValueError, match="^image: .*real"):
        load_images(torch.zeros(3, 4, 4, dtype=torch.complex64))


def test_non_regular_files_as_inputs(tmp_path, capsys, model_dir):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", image=fifo))
    _one_line_exit_2(code, err, "--image", "not a regular file")
    code, err = _run(capsys, "--config", str(fifo), "--image", str(PICTURE), "--text", "x",
                     "--out", str(tmp_path / "o.wav"))
    _one_line_exit_2(code, err, "config", "not a regular file")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    code, err = _run(capsys, *_gen(model_dir, tmp_path / "o.wav", image=loop))
    _one_line_exit_2(code, err, "--image", "symbolic link")


def test_config_params_of_any_number_type_must_be_finite():
    from decimal import Decimal

    for value in (np.float32("nan"), torch.tensor(float("inf")), Decimal("NaN"), np.float64("-inf")):
        data = mf.MelFusionConfig.preset("tiny").to_dict()
        data["vocoder"]["params"]["momentum"] = value
        with pytest.raises(ValueError, match="momentum"):
            mf.MelFusionConfig.model_validate(data)


def test_non_finite_outputs_are_never_written(tmp_path, tiny_model):
    out = mf.GenerationOutput(np.zeros((1, 100), np.float32), 16_000, np.full((1, 5, 4), np.nan))
    with pytest.raises(ValueError, match="^mel: .*NaN"):
        out.save_spectrogram(tmp_path / "x.png")
    with pytest.raises(ValueError, match="^index: "):
        out.save_spectrogram(tmp_path / "x.png", index=True)
    with pytest.raises(ValueError, match="^sample_rate: "):
        mf.GenerationOutput(np.zeros((1, 100), np.float32), float("nan"), out.mel).save(tmp_path / "x.wav")
    assert mf.GenerationOutput(np.zeros(100, np.float32), 16_000, out.mel).save(tmp_path / "one.wav") == [
        tmp_path / "one.wav"]  # a 1-D array is one clip, not 100 files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.wav"]
    # a denoiser that returns infinities stops the loop instead of writing noise
    bias = tiny_model.denoiser.unet.conv_out.bias
    keep = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(float("inf"))
    try:
        with pytest.raises(ValueError, match="NaN or infinite at timestep"):
            tiny_model.generate(image=None, text="x", num_inference_steps=2, progress=False)
    finally:
        with torch.no_grad():
            bias.copy_(keep)


def test_generate_checks_image_steps_and_negative_text_types(tiny_model):
    for kw, name in ((dict(image_steps="3"), "image_steps"), (dict(image_steps=1e9), "image_steps"),
                     (dict(negative_text=None), "negative_text"), (dict(text=None), "text"),
                     (dict(text=[]), "text"), (dict(text=["a", 5]), r"text\[1\]")):
        with pytest.raises(ValueError, match=f"^{name}"):
            tiny_model.generate(image=PICTURE, num_inference_steps=1, progress=False, **{"text": "x", **kw})


def test_argparse_errors_are_one_line(capsys):
    for argv, needle in ((["generate", "--image", "a.png", "--text", "x", "--out", "o.wav", "--steps", "1.5"],
                          "argument --steps: invalid int value: '1.5'"),
                         (["generate", "--text", "x"], "--image: required"),
                         (["nonsense"], "invalid choice")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_warnings_on_the_command_line_are_one_line(monkeypatch, capsys):
    import warnings

    import melfusion.cli as cli

    shown = []

    def noisy(args):  # what stderr gets for a warning while a command runs (pytest captures the real ones)
        shown.append(warnings.formatwarning("data: 3 rows\nwere odd", UserWarning, __file__, 1))
        raise ValueError("data.manifest: no usable rows")

    monkeypatch.setattr(cli, "_inspect", noisy)
    before = warnings.formatwarning
    assert cli.main(["inspect", "--preset", "tiny"]) == 2
    assert shown == ["warning: data: 3 rows were odd\n"]
    assert warnings.formatwarning is before  # put back when the command ends
    assert capsys.readouterr().err.strip() == "melfusion inspect: error: data.manifest: no usable rows"


def test_gradient_accumulation_is_bounded(tmp_path):
    from melfusion.training import TrainConfig

    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        TrainConfig.model_validate({"gradient_accumulation_steps": 10**9})
