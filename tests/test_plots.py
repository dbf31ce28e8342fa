"""The figures the library writes: the spectrogram PNG (axes in s and Hz, a dB colour bar, the prompt), training.png
(labelled axes, the named loss, the debiased smoothing) and benchmarks/ablation.py's chart (error bars)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import melfusion as mf
from melfusion.plots import (
    mel_band_hz,
    mel_tick_hz,
    short_title,
    spectrogram_figure,
    spectrogram_png,
    to_db,
)
from melfusion.training.logs import (
    TrainingLog,
    debiased_ema,
    loss_name,
    plot_training_log,
    smoothing_weight,
    training_figure,
)

ROOT = Path(__file__).resolve().parents[1]
AUDIOLDM = {"sample_rate": 16_000, "hop_length": 160, "fmin": 0.0, "fmax": 8000.0, "values": "ln_amplitude"}


def _mel(frames: int = 100, bands: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.log(np.maximum(np.abs(rng.normal(size=(frames, bands))), 1e-5))


def _colour_bar(fig):
    (main, *others) = fig.axes
    return main, others


# -- the spectrogram -----------------------------------------------------------------------------------------
def test_spectrogram_figure_has_seconds_hertz_a_db_colour_bar_and_the_prompt():
    fig = spectrogram_figure(_mel(), title="a calm flute melody", **AUDIOLDM)
    ax, others = _colour_bar(fig)
    assert ax.get_xlabel() == "time (s)"
    assert "Hz" in ax.get_ylabel() and "mel" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "250", "500", "1000", "2000", "4000", "8000"]
    assert len(others) == 1 and "dB" in others[0].get_ylabel() and "re 1.0" in others[0].get_ylabel()
    assert "a calm flute melody" in ax.get_title()
    # 100 frames of hop 160 at 16 kHz: frame k is centred on k * 10 ms
    assert ax.get_xlim() == pytest.approx((0.0, 0.995))
    # the colours are dB: 20 / ln 10 per natural-log unit, the loudest cell at the top of the scale
    image = ax.images[0]
    assert image.get_clim()[1] == pytest.approx(20 / math.log(10) * _mel().max())
    assert image.get_clim()[1] - image.get_clim()[0] <= 80 + 1e-9


def test_the_mel_axis_puts_each_band_at_its_filters_centre():
    import librosa

    for n, fmin, fmax in ((64, 0.0, 8000.0), (128, 0.0, 22050.0), (40, 300.0, 4000.0)):
        np.testing.assert_allclose(mel_band_hz(n, fmin, fmax),
                                   librosa.mel_frequencies(n + 2, fmin=fmin, fmax=fmax)[1:-1], rtol=1e-9)
    # the filterbank's triangles peak there (to within half an FFT bin)
    from melfusion.dsp import mel_filterbank

    basis = mel_filterbank(16_000, 1024, 64, 0.0, 8000.0)
    peaks = basis.argmax(axis=1) * 16_000 / 1024
    assert np.abs(peaks - mel_band_hz(64, 0.0, 8000.0)).max() <= 16_000 / 1024
    assert mel_tick_hz(0.0, 22050.0)[-1] == 16000.0 and mel_tick_hz(300.0, 4000.0)[0] == 500.0


def test_to_db_knows_amplitude_from_power():
    assert to_db(np.array([math.log(10.0)]), "ln_amplitude")[0][0] == pytest.approx(20.0)
    assert to_db(np.array([math.log(10.0)]), "ln_power")[0][0] == pytest.approx(10.0)
    assert to_db(np.array([-3.0]), "db")[0][0] == -3.0
    with pytest.raises(ValueError, match="values"):
        to_db(np.zeros(1), "log2")


def test_titles_are_quoted_and_long_prompts_cut_at_a_word():
    assert short_title("a calm flute melody") == "mel spectrogram: \u201ca calm flute melody\u201d"
    long = short_title("a very " * 40 + "long prompt")
    assert long.endswith("\u2026\u201d") and len(long) < 100 and "a very a very" in long and " \u2026" not in long
    assert short_title("") == "mel spectrogram (no text prompt)" and short_title(None) == "mel spectrogram"
    assert short_title("two\nlines") == "mel spectrogram: \u201ctwo lines\u201d"


def test_section_boundaries_are_faint_lines():
    fig = spectrogram_figure(_mel(256), sections=[(0.0, 0.85), (0.85, 1.7), (1.7, 2.56)], **AUDIOLDM)
    lines = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in lines] == [0.85, 1.7]
    assert all(line.get_alpha() < 1 for line in lines)


def test_more_frames_than_pixels_are_max_pooled_so_a_short_note_survives():
    from matplotlib.figure import Figure

    from melfusion.plots import draw_mel

    mel = np.full((3001, 64), -5.0)
    mel[1234, 10] = 1.0  # one loud frame
    image, _ = draw_mel(Figure().subplots(), mel, max_columns=100, **AUDIOLDM)
    drawn = np.asarray(image.get_array())
    assert drawn.shape[0] == 64 and 50 < drawn.shape[1] <= 100 and drawn.max() == pytest.approx(20 / math.log(10))
    assert spectrogram_figure(mel, **AUDIOLDM).axes[0].get_xlim()[1] == pytest.approx(30.005)


def test_without_the_front_end_the_axes_are_frames_and_bands():
    ax = spectrogram_figure(_mel(20, 8)).axes[0]
    assert ax.get_xlabel() == "frame" and ax.get_ylabel() == "mel band"
    with pytest.raises(ValueError, match="n_mels"):
        spectrogram_figure(_mel(20, 8), n_mels=64)
    for frames, bands in ((1, 64), (50, 1), (1, 1)):  # degenerate shapes still draw
        spectrogram_figure(np.zeros((frames, bands)), **AUDIOLDM)


def test_spectrogram_png_is_written_atomically_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "s.png"
    assert spectrogram_png(_mel(), path, title="x", **AUDIOLDM) == path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (800, 360)  # 8 x 3.6 in at scale 4 (100 dpi)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]  # no temporary file left beside it
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        spectrogram_png(_mel(), path, overwrite=False)
    assert path.read_bytes() == b"mine"
    spectrogram_png(_mel(), path, 2)  # the old positional call: mel, path, scale
    with Image.open(path) as im:
        assert im.size == (400, 180)
    first = path.read_bytes()
    spectrogram_png(_mel(), path, 2)
    assert path.read_bytes() == first  # deterministic
    with pytest.raises(ValueError, match="scale"):
        spectrogram_png(_mel(), path, 0)


def test_generation_output_passes_the_prompt_and_the_front_end(tmp_path, monkeypatch):
    import melfusion.plots

    seen = {}
    real = melfusion.plots.spectrogram_png

    def spy(mel, path, *args, **kwargs):
        seen.update(kwargs)
        return real(mel, path, *args, **kwargs)

    monkeypatch.setattr(melfusion.plots, "spectrogram_png", spy)
    out = mf.GenerationOutput(np.zeros((2, 1600), np.float32), 16_000, _mel(10)[None].repeat(2, 0),
                              texts=["first", "second"], sections=[(0.0, 0.05), (0.05, 0.1)], mel_params=AUDIOLDM)
    out.save_spectrogram(tmp_path / "s.png", index=1)
    assert seen["title"] == "second" and seen["sections"] == [(0.0, 0.05), (0.05, 0.1)]
    assert {k: seen[k] for k in AUDIOLDM} == AUDIOLDM
    seen.clear()
    hand_made = mf.GenerationOutput(np.zeros((1, 100), np.float32), 8000, np.zeros((1, 5, 4)))
    hand_made.save_spectrogram(tmp_path / "h.png")
    assert seen["title"] is None and "sample_rate" not in seen


def test_a_generated_clip_knows_its_mel_front_end(tiny_model):
    params = tiny_model.mel_params()
    c = tiny_model.config
    assert params == {"sample_rate": c.sample_rate, "hop_length": c.hop_length, "fmin": 0.0, "fmax": 8000.0,
                      "values": "ln_amplitude"}
    out = tiny_model.generate(text="a tune", num_inference_steps=1, seconds=0.32, progress=False)
    assert out.mel_params == params
    assert out.mel.shape[1] == math.ceil(0.32 * c.sample_rate / c.hop_length)


# -- training.png ------------------------------------------------------------------------------------------------
def _write_log(path: Path, steps: int = 30, layers: int = 2) -> Path:
    log = TrainingLog(path, tensorboard=False)
    for s in range(1, steps + 1):
        log.write(s, 1.0 / s + 0.01 * (s % 3), {"unet": 1e-3}, [0.5 + 0.001 * s * (i + 1) for i in range(layers)],
                  10.0, None)
    return log.path


def test_training_figure_names_its_axes_the_loss_and_the_layers(tmp_path):
    csv_path = _write_log(tmp_path)
    fig = training_figure(csv_path, loss_name=loss_name("epsilon"), layer_names=["up.0", "up.1"])
    loss_ax, alpha_ax = fig.axes
    assert loss_ax.get_xlabel() == "optimizer step" and "MSE on ε" in loss_ax.get_ylabel()
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels[0] == "logged loss" and labels[1].startswith("smoothed (debiased EMA, w = ")
    raw, smooth = loss_ax.lines
    assert raw.get_alpha() < 1 and smooth.get_alpha() in (None, 1)  # the raw curve faint behind the smoothed
    np.testing.assert_allclose(smooth.get_ydata(), debiased_ema(raw.get_ydata(), smoothing_weight(30)))
    assert loss_ax.get_yscale() == "log"  # the loss spans more than a decade
    assert alpha_ax.get_xlabel() == "optimizer step" and "α" in alpha_ax.get_ylabel()
    assert [t.get_text() for t in alpha_ax.get_legend().get_texts()] == ["0: up.0", "1: up.1"]


def test_many_layers_get_a_colour_bar_and_the_png_is_written(tmp_path):
    csv_path = _write_log(tmp_path, steps=5, layers=16)
    fig = training_figure(csv_path, loss_name="MSE on v")
    assert len(fig.axes) == 3 and fig.axes[1].get_legend() is None and "layer" in fig.axes[2].get_ylabel()
    log = TrainingLog(tmp_path, tensorboard=False, loss_name="MSE on v")
    assert log.plot() == tmp_path / "training.png"
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train_log.csv").write_text("step,loss\n")
    assert plot_training_log(empty / "train_log.csv", empty / "x.png") is None


def test_loss_names_follow_the_prediction_type():
    assert loss_name("epsilon", "ddpm") == "MSE on ε"
    assert loss_name("v_prediction", "ddpm") == "MSE on v"
    assert loss_name("v_prediction", "ddpm", 5.0) == "min-SNR-γ (5) weighted MSE on v"
    assert loss_name("flow", "flow", 5.0).startswith("MSE on v")
    assert "EDM" in loss_name("v_prediction", "edm")


# -- the debiased smoothing ----------------------------------------------------------------------------------------
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
weights = st.floats(min_value=0.0, max_value=0.999)


@settings(max_examples=200, deadline=None)
@given(value=finite, n=st.integers(1, 60), w=weights)
def test_a_constant_stays_exactly_that_constant(value, n, w):
    assert debiased_ema([value] * n, w) == [value] * n


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=60), w=weights)
def test_the_average_stays_within_the_inputs_so_far(values, w):
    out = debiased_ema(values, w)
    assert len(out) == len(values) and out[0] == values[0]
    for t, m in enumerate(out):
        assert min(values[: t + 1]) <= m <= max(values[: t + 1])


@settings(max_examples=100, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=60))
def test_no_smoothing_returns_the_input(values):
    assert debiased_ema(values, 0.0) == values


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=60), w=st.floats(0.0, 0.99))
def test_it_is_tensorboards_zero_started_average_divided_by_its_bias(values, w):
    s, expect = 0.0, []
    for t, x in enumerate(values, start=1):
        s = w * s + (1 - w) * x
        expect.append(s / (1 - w**t))
    np.testing.assert_allclose(debiased_ema(values, w), expect, rtol=1e-9, atol=1e-9)


def test_non_finite_values_pass_through_without_moving_the_average():
    out = debiased_ema([1.0, float("nan"), 3.0, float("inf")], 0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[3] == float("inf")
    assert out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)  # as if the NaN were not there
    with pytest.raises(ValueError, match="weight"):
        debiased_ema([1.0], 1.0)


# -- the ablation chart -----------------------------------------------------------------------------------------
def _ablation():
    spec = importlib.util.spec_from_file_location("ablation_benchmark", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_chart_has_labelled_bars_values_and_standard_errors():
    from matplotlib.container import BarContainer, ErrorbarContainer

    from melfusion.datasets.synthetic import ATTRIBUTES

    ablation = _ablation()
    score = {"n": 96, "accuracy": dict.fromkeys(ATTRIBUTES, 0.75), "fd": 80.0}
    other = {"n": 96, "accuracy": dict.fromkeys(ATTRIBUTES, 1.0), "fd": 46.6}
    fig = ablation.ablation_figure([("image + text", score), ("encoder taps", other)], "96 clips")
    axes = fig.axes
    assert len(axes) == len(ATTRIBUTES)
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["image + text  (FD 80)", "encoder taps  (FD 47)"]
    se = math.sqrt(0.75 * 0.25 / 95)
    assert ablation.accuracy_se(0.75, 96) == pytest.approx(se) and ablation.accuracy_se(1.0, 96) == 0.0
    for ax in axes:
        assert any(isinstance(c, BarContainer) for c in ax.containers)
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        segments = bars.lines[2][0].get_segments()
        assert [s[1][0] - s[0][0] for s in segments] == pytest.approx([200 * se, 0.0])  # +-1 SE, in %
        assert {t.get_text() for t in ax.texts} == {"75", "100"}
        assert "%" in ax.get_xlabel()
    assert "standard error" in fig._suptitle.get_text()
