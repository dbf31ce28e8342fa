"""The synthetic world: determinism, what each cue controls, reading attributes back, the image-LDM stage."""

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import melfusion as mf
from melfusion.datasets.synthetic import (
    ATTRIBUTES,
    CHANCE,
    COLOURS,
    IMAGE_ATTRIBUTES,
    INSTRUMENTS,
    MOODS,
    REGISTERS,
    SHADES,
    TEMPO_OF_COLOUR,
    TEMPOS,
    SyntheticItem,
    attribute_accuracy,
    read_attributes,
    render_audio,
    render_image,
    synthetic_item,
    write_synthetic_manifest,
)


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_arguments_write_the_same_bytes(tmp_path):
    a = write_synthetic_manifest(tmp_path / "a", n=6, seconds=1.0, seed=3)
    b = write_synthetic_manifest(tmp_path / "b", n=6, seconds=1.0, seed=3)
    c = write_synthetic_manifest(tmp_path / "c", n=6, seconds=1.0, seed=4)
    assert _digest(a.parent) == _digest(b.parent)
    assert _digest(a.parent) != _digest(c.parent)


def test_manifest_rows_hold_the_standard_columns_and_the_ground_truth(tmp_path):
    path = write_synthetic_manifest(tmp_path, n=48, seconds=0.5, image_size=32)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 48
    for row in rows:
        assert (tmp_path / row["location"]).is_file() and (tmp_path / row["img_path"]).is_file()
        assert {"captions", "register", "pitch_hz", "tempo", "notes_per_second", "instrument", "mood", "colour",
                "shade"} <= set(row)
        # the picture decides register and tempo
        assert row["register"] == REGISTERS[[c for c, _ in SHADES].index(row["shade"])][0]
        assert row["tempo"] == TEMPOS[TEMPO_OF_COLOUR[[c for c, _ in COLOURS].index(row["colour"])]][0]
    # 48 consecutive items: every combination exactly once
    combos = {(r["colour"], r["shade"], r["instrument"], r["mood"]) for r in rows}
    assert len(combos) == len(COLOURS) * len(SHADES) * len(INSTRUMENTS) * len(MOODS) == 48
    # each image-only class is balanced
    for attr in IMAGE_ATTRIBUTES:
        counts = {}
        for r in rows:
            counts[r[attr]] = counts.get(r[attr], 0) + 1
        assert set(counts.values()) == {48 // len(counts)}
    # the library reads it as a standard triplet manifest
    assert len(mf.datasets.read_manifest(path)) == 48
    info = json.loads((tmp_path / "attributes.json").read_text())
    assert info["image_attributes"] == list(IMAGE_ATTRIBUTES) and info["chance"]["register"] == 0.5


def test_captions_name_instrument_and_mood_but_never_the_image_cues():
    rng = np.random.default_rng(0)
    image_words = [c for c, _ in COLOURS] + [c for c, _ in SHADES] + ["warm", "cool", "slow", "fast", "low", "high"]
    for i in range(96):
        item = synthetic_item(i, rng)
        words = item.caption.split()
        assert INSTRUMENTS[item.instrument][0] in words
        assert any(w in words for w in MOODS[item.mood][1])
        assert not any(w in words for w in image_words)


def test_the_picture_shows_hue_and_brightness():
    rng = np.random.default_rng(1)
    for colour in range(len(COLOURS)):
        for shade in range(len(SHADES)):
            item = SyntheticItem(colour, shade, 0, 0, "x")
            hsv = np.asarray(render_image(item, 32, rng).convert("HSV"), dtype=np.float64) / 255
            hue = np.median(hsv[..., 0])
            distance = min(abs(hue - COLOURS[colour][1]), 1 - abs(hue - COLOURS[colour][1]))
            assert distance < 0.05
            assert abs(np.median(hsv[..., 2]) - SHADES[shade][1]) < 0.1
            assert item.register == shade and item.tempo == TEMPO_OF_COLOUR[colour]


def test_attributes_are_read_back_from_the_rendered_audio():
    rng = np.random.default_rng(2)
    items = [synthetic_item(i, rng) for i in range(0, 48, 3)]  # 16 items spanning every class
    readings = [read_attributes(render_audio(item, 2.56, 16000, rng), 16000) for item in items]
    assert attribute_accuracy(readings, items) == {a: 1.0 for a in ATTRIBUTES}
    for item, reading in zip(items, readings, strict=True):
        assert abs(np.log2(reading.pitch_hz / item.pitch_hz)) < 1 / 12  # within a semitone


def test_reading_silence_and_bad_input():
    silent = read_attributes(np.zeros(16000), 16000)
    assert silent.register is None and silent.instrument is None
    assert attribute_accuracy([silent], [SyntheticItem(0, 0, 0, 0, "x")])["register"] == 0.0
    with pytest.raises(ValueError, match="waveform"):
        read_attributes(np.zeros(100), 16000)
    with pytest.raises(ValueError, match="waveform"):
        read_attributes(np.full(16000, np.nan), 16000)
    with pytest.raises(ValueError, match="readings, truth"):
        attribute_accuracy([], [])


@pytest.mark.parametrize("kwargs, name", [({"n": 0}, "n"), ({"seconds": 0.1}, "seconds"),
                                          ({"image_size": -1}, "image_size"), ({"start": -2}, "start")])
def test_bad_arguments_name_themselves(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        write_synthetic_manifest(tmp_path, **kwargs)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 47), min_size=1, max_size=20), st.integers(0, 1))
def test_accuracy_is_the_fraction_of_matching_classes(indices, shift):
    rng = np.random.default_rng(0)
    items = [synthetic_item(i, rng) for i in indices]
    from melfusion.datasets.synthetic import AttributeReading

    readings = [AttributeReading((it.register + shift) % 2, it.tempo, None, it.mood, 1.0, 1.0, 1.0) for it in items]
    acc = attribute_accuracy(readings, items)
    assert acc["register"] == (1.0 if shift == 0 else 0.0)
    assert acc["tempo"] == acc["mood"] == 1.0 and acc["instrument"] == 0.0
    assert set(CHANCE) == set(ATTRIBUTES)


def test_image_ldm_stages_reduce_their_losses():
    from melfusion.training.image_ldm import train_image_unet, train_image_vae

    torch.manual_seed(0)
    fs = mf.MelFusionConfig.preset("mini").feature_source.build()
    rng = np.random.default_rng(0)
    pictures = [render_image(synthetic_item(i, rng), 64, rng) for i in range(8)]
    images = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1) for p in pictures])
    vae_losses = train_image_vae(fs, images, steps=40, batch_size=8, seed=0, progress=False)
    assert np.mean(vae_losses[-5:]) < 0.7 * np.mean(vae_losses[:5])
    assert not any(p.requires_grad for p in fs.vae.parameters())
    latents = fs.encode(images)
    assert abs(float(latents.std()) - 1.0) < 0.2  # the fitted scaling factor gives unit-variance latents
    unet_losses = train_image_unet(fs, latents, steps=40, batch_size=8, seed=0, progress=False)
    assert np.mean(unet_losses[-10:]) < np.mean(unet_losses[:10])
    with pytest.raises(ValueError, match="images"):
        train_image_vae(fs, images[:, :, :32], steps=1, progress=False)
