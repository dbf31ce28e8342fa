"""Picture families of the synthetic world: every family shows its colour's hue and its shade's value, the
manifest writer cycles families and sizes in balanced blocks, augments training pictures, writes JPEGs, and
the classic pictures are unchanged."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from melfusion.datasets.synthetic import (
    COLOURS,
    HELDOUT_FAMILIES,
    HELDOUT_SIZES,
    PICTURE_FAMILIES,
    SHADES,
    TRAIN_FAMILIES,
    SyntheticItem,
    render_image,
    render_picture,
    write_synthetic_manifest,
)
from melfusion.training.mini import MiniRecipe


def _hsv(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("HSV"), dtype=np.float64) / 255


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1 - d)


def test_train_and_heldout_families_are_disjoint_and_cover_every_family():
    assert not set(TRAIN_FAMILIES) & set(HELDOUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(PICTURE_FAMILIES)
    assert "disc" in TRAIN_FAMILIES and "photo" in HELDOUT_FAMILIES


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(PICTURE_FAMILIES), st.integers(0, len(COLOURS) - 1), st.integers(0, len(SHADES) - 1),
       st.integers(24, 200), st.integers(24, 200), st.integers(0, 2**16))
def test_every_family_shows_its_hue_and_value(family, colour, shade, width, height, seed):
    image = render_picture(colour, shade, np.random.default_rng(seed), family, (width, height))
    assert image.size == (width, height) and image.mode == "RGB"
    hsv = _hsv(image)
    assert _hue_distance(float(np.median(hsv[..., 0])), COLOURS[colour][1]) < 0.05
    # the picture's mean value stays near its shade's: the two shades never overlap
    assert abs(hsv[..., 2].mean() - SHADES[shade][1]) < 0.12


def test_the_disc_family_at_a_square_size_is_the_classic_picture():
    a = render_picture(2, 1, np.random.default_rng(5), "disc", (64, 64))
    b = render_image(SyntheticItem(2, 1, 0, 0, ""), 64, np.random.default_rng(5))
    assert a.tobytes() == b.tobytes()


def test_families_differ_from_each_other():
    pictures = {f: _hsv(render_picture(0, 1, np.random.default_rng(0), f, (64, 64)))[..., 2] for f in PICTURE_FAMILIES}
    spread = {f: float(v.std()) for f, v in pictures.items()}
    assert spread["plain"] < 0.05  # the field and its pixel noise only
    assert spread["checker"] > spread["plain"] and spread["photo"] > spread["plain"]
    for a in PICTURE_FAMILIES:
        for b in PICTURE_FAMILIES:
            if a < b:
                assert not np.array_equal(pictures[a], pictures[b]), (a, b)


def test_bad_picture_arguments_name_themselves():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="family"):
        render_picture(0, 0, rng, "hexagon")
    with pytest.raises(ValueError, match="size"):
        render_picture(0, 0, rng, "plain", (0, 10))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_families_and_sizes_cycle_in_blocks_that_hold_every_picture_class(tmp_path):
    families, sizes = ["triangle", "plain"], [(40, 90), (160, 120)]
    path = write_synthetic_manifest(tmp_path, n=40, seconds=0.5, families=families, sizes=sizes, start=80)
    rows = _rows(path)
    for k, row in enumerate(rows):
        block = k // 8
        assert row["family"] == families[block % 2]
        assert (row["width"], row["height"]) == sizes[(block // 2) % 2]
        assert row["jpeg"] is None and row["img_path"].endswith(".png")
        with Image.open(tmp_path / row["img_path"]) as im:
            assert im.size == (row["width"], row["height"])
    for block in range(5):  # each block of 8 holds every colour and shade once
        cell = rows[8 * block: 8 * block + 8]
        assert len({(r["colour"], r["shade"]) for r in cell}) == 8


def test_jpeg_pictures_are_written_as_jpeg(tmp_path):
    path = write_synthetic_manifest(tmp_path, n=4, seconds=0.5, families=["photo"], jpeg_quality=40)
    for row in _rows(path):
        assert row["img_path"].endswith(".jpg") and row["jpeg"] == 40
        with Image.open(tmp_path / row["img_path"]) as im:
            assert im.format == "JPEG"


def test_augmented_training_pictures_vary_and_are_reproducible(tmp_path):
    a = write_synthetic_manifest(tmp_path / "a", n=60, seconds=0.5, augment=True)
    b = write_synthetic_manifest(tmp_path / "b", n=60, seconds=0.5, augment=True)
    rows = _rows(a)
    assert {r["family"] for r in rows} <= set(TRAIN_FAMILIES) and len({r["family"] for r in rows}) >= 4
    assert len({(r["width"], r["height"]) for r in rows}) > 10
    assert any(r["jpeg"] is not None for r in rows) and any(r["jpeg"] is None for r in rows)
    for r in rows:
        assert 1 / 2.6 <= r["width"] / r["height"] <= 2.6
    digest = [hashlib.sha256((p.parent / r["img_path"]).read_bytes()).hexdigest() for p in (a, b) for r in _rows(p)]
    assert digest[:60] == digest[60:]


def _mean_saturation(path: Path) -> float:
    with Image.open(path) as im:
        return float(np.asarray(im.convert("HSV"))[..., 1].mean() / 255)


def test_the_augmented_saturation_range_moves_only_the_saturation(tmp_path):
    default = write_synthetic_manifest(tmp_path / "a", n=24, seconds=0.5, augment=True)
    full = write_synthetic_manifest(tmp_path / "b", n=24, seconds=0.5, augment=True, saturation=(1.0, 1.0))
    same = write_synthetic_manifest(tmp_path / "c", n=24, seconds=0.5, augment=True, saturation=(0.6, 0.95))
    assert default.read_bytes() == same.read_bytes()  # the default range is the one the shipped model saw
    rows_a, rows_b = _rows(default), _rows(full)
    # every other draw (family, size, JPEG, the captions and audio) keeps its stream
    assert [{k: r[k] for k in ("family", "width", "height", "jpeg", "captions")} for r in rows_a] == \
        [{k: r[k] for k in ("family", "width", "height", "jpeg", "captions")} for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (default.parent / ra["location"]).read_bytes() == (full.parent / rb["location"]).read_bytes()
    # a plain field at saturation 1 is about fully saturated; the default range stays below 0.95 on average
    plain = [r for r in rows_b if r["family"] == "noise"]  # the one training family with no paler tint
    assert plain, "no noise picture drawn"
    for rb in plain:
        assert _mean_saturation(full.parent / rb["img_path"]) > 0.9
    assert np.mean([_mean_saturation(default.parent / r["img_path"]) for r in rows_a]) < 0.85


@pytest.mark.parametrize("saturation", [(0.9, 0.2), (0.5, 1.2), (-0.1, 0.5), (0.5,), "0.5-1", (float("nan"), 1.0),
                                        (True, 1.0), None])
def test_a_bad_saturation_range_names_itself(tmp_path, saturation):
    with pytest.raises(ValueError, match="saturation"):
        write_synthetic_manifest(tmp_path, n=2, seconds=0.5, augment=True, saturation=saturation)
    assert not (tmp_path / "manifest.jsonl").exists()
    with pytest.raises(ValueError, match="saturation"):
        MiniRecipe(saturation=saturation)


def test_heldout_sizes_are_not_square_or_not_64():
    assert all(s != (64, 64) for s in HELDOUT_SIZES) and any(w != h for w, h in HELDOUT_SIZES)


@pytest.mark.parametrize("kwargs, name", [({"families": []}, "families"), ({"families": ["hexagon"]}, "families"),
                                          ({"families": "disc"}, "families"), ({"sizes": [(3, 3)]}, "sizes"),
                                          ({"sizes": [(64,)]}, "sizes"), ({"jpeg_quality": 0}, "jpeg_quality"),
                                          ({"jpeg_quality": 99}, "jpeg_quality"), ({"augment": 1}, "augment")])
def test_bad_family_arguments_name_themselves(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        write_synthetic_manifest(tmp_path, n=2, seconds=0.5, **kwargs)
    assert not any(tmp_path.iterdir())
