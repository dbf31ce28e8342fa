"""melfusion.dsp agrees with librosa (mel filterbank, STFT, inverse STFT, Griffin-Lim)."""

from __future__ import annotations

import subprocess
import sys

import librosa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melfusion import dsp
from melfusion.datasets.mel import MelFrontEnd
from melfusion.vocoders import GriffinLimVocoder

# librosa warns when a frame is longer than the whole signal; short signals are part of the comparison
pytestmark = pytest.mark.filterwarnings("ignore:n_fft=.*too large:UserWarning")

# (n_fft, hop_length, win_length): the AudioLDM front end, the mini model's, and a window shorter than n_fft
GEOMETRIES = [(1024, 160, 1024), (1024, 320, 1024), (512, 128, 400), (256, 64, 256)]


@pytest.mark.parametrize("sr, n_fft, n_mels, fmin, fmax",
                         [(16_000, 1024, 64, 0.0, 8000.0), (22_050, 512, 40, 50.0, None), (32_000, 1024, 64, 50.0, 14_000.0)])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    ours = dsp.mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_mel_front_end_basis_is_librosas():
    fe = MelFrontEnd()
    ref = librosa.filters.mel(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin, fmax=fe.fmax)
    np.testing.assert_allclose(fe.mel_basis(), ref, rtol=1e-6, atol=1e-9)


def test_mel_filterbank_rejects_bad_band():
    with pytest.raises(ValueError, match="fmin, fmax"):
        dsp.mel_filterbank(16_000, 1024, 64, fmin=9000.0, fmax=8000.0)


@settings(max_examples=25, deadline=None)
@given(geometry=st.sampled_from(GEOMETRIES), length=st.integers(300, 5000), seed=st.integers(0, 2**16))
def test_stft_and_istft_match_librosa(geometry, length, seed):
    n_fft, hop, win = geometry
    y = np.random.default_rng(seed).standard_normal(length)
    ours = dsp.stft(y, n_fft, hop, win)
    ref = librosa.stft(y, n_fft=n_fft, hop_length=hop, win_length=win, center=True)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    back = dsp.istft(ours, n_fft, hop, win, length=length)
    np.testing.assert_allclose(back, librosa.istft(ref, n_fft=n_fft, hop_length=hop, win_length=win, length=length),
                               atol=1e-9)
    np.testing.assert_allclose(back, y, atol=1e-9)  # a perfect reconstruction away from a zero window sum
    no_length = dsp.istft(ours, n_fft, hop, win)
    ref_no_length = librosa.istft(ref, n_fft=n_fft, hop_length=hop, win_length=win)
    assert no_length.shape == ref_no_length.shape
    np.testing.assert_allclose(no_length, ref_no_length, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(geometry=st.sampled_from(GEOMETRIES), frames=st.integers(4, 40), n_iter=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_griffin_lim_matches_librosa(geometry, frames, n_iter, seed):
    n_fft, hop, win = geometry
    magnitude = np.abs(np.random.default_rng(seed).standard_normal((1 + n_fft // 2, frames)))
    length = (frames - 1) * hop
    ours = dsp.griffin_lim(magnitude, n_iter, n_fft, hop, win, length=length, seed=0)
    ref = librosa.griffinlim(magnitude, n_iter=n_iter, hop_length=hop, win_length=win, n_fft=n_fft, length=length,
                             random_state=0)
    np.testing.assert_allclose(ours, ref, atol=1e-8 * max(1.0, float(np.abs(ref).max())))


def test_griffin_lim_recovers_a_tone():
    sr, n_fft, hop = 16_000, 1024, 256
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 440.0 * t)
    wav = dsp.griffin_lim(np.abs(dsp.stft(tone, n_fft, hop)), 32, n_fft, hop, length=tone.shape[0])
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.shape[0])))
    assert abs(np.argmax(spectrum) * sr / wav.shape[0] - 440.0) < 2.0


@pytest.mark.parametrize("bad, match", [({"n_iter": 0}, "n_iter"), ({"momentum": -0.5}, "momentum")])
def test_griffin_lim_rejects_bad_arguments(bad, match):
    kwargs = {"n_iter": 4, "momentum": 0.99} | bad
    with pytest.raises(ValueError, match=match):
        dsp.griffin_lim(np.ones((513, 8)), n_fft=1024, hop_length=256, **kwargs)


def test_griffin_lim_and_istft_name_a_spectrum_of_the_wrong_shape():
    with pytest.raises(ValueError, match="magnitude: expected"):
        dsp.griffin_lim(np.ones((512, 8)), n_iter=2, n_fft=1024, hop_length=256)
    with pytest.raises(ValueError, match="spectrum: expected"):
        dsp.istft(np.ones((513, 8, 2)), 1024, 256)


def test_griffin_lim_takes_integer_magnitudes():
    ints = np.ones((129, 6), dtype=np.int64)
    np.testing.assert_array_equal(dsp.griffin_lim(ints, 2, 256, 64), dsp.griffin_lim(ints.astype(float), 2, 256, 64))


def test_stft_rejects_bad_input():
    with pytest.raises(ValueError, match="y: expected a 1-D"):
        dsp.stft(np.zeros((2, 100)), 256, 64)
    with pytest.raises(ValueError, match="win_length"):
        dsp.stft(np.zeros(1000), 256, 64, win_length=512)


def test_vocoder_output_is_unchanged_by_the_port():
    """The Griffin-Lim vocoder gives librosa's waveform (the shipped model's audio does not move)."""
    voc = GriffinLimVocoder(n_iter=8, hop_length=320)
    fe = voc.front_end
    mel = np.random.default_rng(0).normal(-4.0, 2.0, size=(2, 24, fe.n_mels)).astype(np.float32)
    ours = voc(mel).numpy()
    for m, wav in zip(mel, ours, strict=True):
        linear = np.maximum(voc._inverse_basis @ np.exp(np.clip(m, np.log(fe.log_floor), voc.max_log_mel)).T, 0.0)
        ref = librosa.griffinlim(linear, n_iter=8, hop_length=fe.hop_length, win_length=fe.win_length, n_fft=fe.n_fft,
                                 length=(m.shape[0] - 1) * fe.hop_length, random_state=0)
        np.testing.assert_allclose(wav[: ref.shape[0]], ref.astype(np.float32), atol=1e-5)
        assert not wav[ref.shape[0]:].any()


def test_generation_path_does_not_import_librosas_core():
    """Building the vocoder and the mel basis must not load librosa's numba-compiled core (seconds on a
    fresh install); the point of melfusion.dsp."""
    code = ("import sys; from melfusion.vocoders import GriffinLimVocoder; import torch; "
            "GriffinLimVocoder(n_iter=2, hop_length=320)(torch.zeros(1, 8, 64)); "
            "print('librosa.core.audio' in sys.modules, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
