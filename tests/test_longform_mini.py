"""Storyboards and long pieces on the shipped mini model: each section is heard as its own picture, the
boundaries do not click, a long piece keeps its picture's attributes throughout.

The default run checks two storyboards (8 sections); the benchmark's 20 storyboards and the 30 s piece are
marked slow (``make test-slow``); their figures are in docs/long-form.md (benchmarks/storyboard.py,
benchmarks/long_form.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from melfusion import MelFusion
from melfusion.datasets.synthetic import TEMPO_OF_COLOUR, read_attributes, render_picture
from melfusion.longform import seam_report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

#: bright-warm, dark-cool, bright-cool, dark-warm: (colour, shade, held-out family)
FOUR = ((0, 1, "triangle"), (3, 0, "photo"), (2, 1, "checker"), (1, 0, "gradient"))


@pytest.fixture(scope="module")
def mini():
    return MelFusion.from_pretrained("mini")


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0)])
def test_each_storyboard_section_is_heard_as_its_picture_and_the_boundaries_are_clean(mini, order):
    rng = np.random.default_rng(sum(order[:2]))
    pictures = [render_picture(FOUR[k][0], FOUR[k][1], rng, FOUR[k][2], (160, 120)) for k in order]
    out = mini.generate(images=pictures, text="a calm flute melody", num_inference_steps=10, seed=1, progress=False)
    sr, wave = out.sample_rate, out.waveforms[0]
    clip = mini.config.sampling.seconds
    assert out.sections == [(pytest.approx(i * clip), pytest.approx((i + 1) * clip)) for i in range(4)]
    right = {"register": 0, "tempo": 0}
    for k, (a, b) in zip(order, out.sections, strict=True):
        got = read_attributes(wave[int(round(a * sr)): int(round(b * sr))], sr)
        right["register"] += got.register == FOUR[k][1]
        right["tempo"] += got.tempo == TEMPO_OF_COLOUR[FOUR[k][0]]
    assert right["register"] >= 3 and right["tempo"] >= 3, right
    assert right["register"] + right["tempo"] >= 7, right
    report = seam_report(wave, sr, [a for a, _ in out.sections[1:]])
    assert report.clean, report
    assert len(report.inside_jump) >= 60  # the range inside is measured on enough stretches


@pytest.mark.slow
def test_twenty_storyboards_as_accurate_as_single_clips(mini):
    import storyboard

    result = storyboard.run(mini, 20, 10, 0, progress=False)
    sections = [s for row in result["storyboards"] for s in row["sections"]]
    for key in ("register", "tempo"):
        story = np.mean([s[f"{key}_heard"] == s[key] for s in sections])
        single = np.mean([s[f"single_{key}_heard"] == s[key] for s in sections])
        assert story >= 0.9 and story >= single - 0.1, (key, story, single)
    assert sum(row["clean"] for row in result["storyboards"]) == 20


@pytest.mark.slow
def test_a_thirty_second_piece_keeps_its_picture_throughout():
    import long_form

    result = long_form.attributes("mini", 30.0, 2, 10, 0)
    for row in result["pictures"]:
        windows = row["windows"]
        assert len(windows) == 11
        assert np.mean([w["register"] == row["register"] for w in windows]) >= 0.9, row
        assert np.mean([w["tempo"] == row["tempo"] for w in windows]) >= 0.9, row
