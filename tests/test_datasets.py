"""Training data: manifests (JSONL, CSV, folder), validation of every row, audio loading, fit_length,
the torch dataset and the toy world."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from melfusion.datasets import (
    TOY_CLASSES,
    ManifestError,
    Triplet,
    TripletDataset,
    ValidationReport,
    collate_triplets,
    fit_length,
    load_audio,
    read_manifest,
    validate_manifest,
    write_toy_manifest,
)
from melfusion.datasets.audio import HEAD_FRAMES

SR = 16_000


def tone(path: Path, seconds: float = 0.5, sr: int = SR, freq: float = 440.0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, **kw)
    return path


def picture(path: Path, size=(24, 16), mode: str = "RGB", color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ------------------------------------------------------------------------------------------ reading


def test_jsonl_resolves_paths_against_the_manifest_folder(tmp_path):
    data = tmp_path / "data"
    tone(data / "a" / "one.wav")
    picture(data / "img" / "one.png")
    absolute = tone(tmp_path / "elsewhere" / "two.wav")
    manifest = write_jsonl(data / "train.json", [
        {"captions": "calm piano", "location": "a/one.wav", "img_path": "img/one.png", "extra": 1},
        "",
        {"captions": "loud drums", "location": str(absolute)},
    ])
    rows = read_manifest(manifest)
    assert rows == [
        Triplet(1, "calm piano", data / "a" / "one.wav", data / "img" / "one.png"),
        Triplet(3, "loud drums", absolute, None),  # line numbers: the blank line 2 still counts
    ]
    assert rows.problems == [] and rows.source == manifest
    assert all(r.audio.is_absolute() for r in rows)


def test_csv_with_custom_column_names(tmp_path):
    tone(tmp_path / "wavs" / "x.wav")
    picture(tmp_path / "pics" / "x.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text('text,wav,img\n"a tune, with a comma",wavs/x.wav,pics/x.jpg\n\nno image,wavs/x.wav,\n')
    rows = read_manifest(manifest, columns={"caption": "text", "audio": "wav", "image": "img"})
    assert rows == [
        Triplet(2, "a tune, with a comma", tmp_path / "wavs" / "x.wav", tmp_path / "pics" / "x.jpg"),
        Triplet(4, "no image", tmp_path / "wavs" / "x.wav", None),  # header is line 1
    ]
    with pytest.raises(ManifestError, match="no column 'captions'"):
        read_manifest(manifest)


def test_folder_of_matching_files(tmp_path):
    folder = tmp_path / "songs"
    tone(folder / "b.flac", format="FLAC")
    (folder / "b.txt").write_text("  a flute \n")
    picture(folder / "b.jpg")
    tone(folder / "a.wav")
    (folder / "a.txt").write_text("a piano")
    picture(folder / "a.png")
    tone(folder / "c.wav")  # no caption, no image: a bad row
    (folder / "orphan.txt").write_text("ignored")
    rows = read_manifest(folder)
    assert rows == [Triplet(1, "a piano", folder / "a.wav", folder / "a.png"),
                    Triplet(2, "a flute", folder / "b.flac", folder / "b.jpg")]
    assert [row for row, _ in rows.problems] == [3]
    assert "c.txt" in rows.problems[0][1] and "image" in rows.problems[0][1]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ManifestError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")
    odd = tmp_path / "m.tsv"
    odd.write_text("x")
    with pytest.raises(ManifestError, match="format="):
        read_manifest(odd)
    with pytest.raises(ValueError, match="format"):
        read_manifest(odd, format="parquet")
    with pytest.raises(ValueError, match="columns: unknown keys \\['wave'\\]"):
        read_manifest(odd, format="csv", columns={"wave": "x"})
    assert issubclass(ManifestError, ValueError)
    with pytest.raises(ValueError, match="policy"):
        validate_manifest([], policy="warn")


# ------------------------------------------------------------------------------------------ validation


@pytest.fixture
def messy(tmp_path):
    """A JSONL manifest with 3 good rows and one of every kind of bad row (rows = line numbers)."""
    d = tmp_path / "messy"
    tone(d / "good.wav")
    picture(d / "good.png")
    (d / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    sf.write(d / "zero.wav", np.zeros(0, dtype=np.float32), SR)
    (d / "empty.wav").write_bytes(b"")
    nan = np.zeros(HEAD_FRAMES + 5000, dtype=np.float32)
    nan[-10] = np.nan  # past the decoded head: only the full float scan finds it
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    good = {"captions": "fine", "location": "good.wav", "img_path": "good.png"}
    lines = [
        good,                                                  # 1
        {**good, "location": "missing.wav"},                   # 2
        {**good, "location": "corrupt.wav"},                   # 3
        {**good, "location": "zero.wav"},                      # 4
        {**good, "location": "empty.wav"},                     # 5
        {**good, "captions": "   "},                           # 6
        {**good, "img_path": "gone.png"},                      # 7
        '{"captions": "broken", "location": ',                 # 8
        {**good, "captions": "fine too"},                      # 9 (an exact copy of row 1 would be bad)
        {**good, "captions": "", "location": "missing2.wav"},  # 10: two problems
        {**good, "location": "nan.wav"},                       # 11
        '["not", "an", "object"]',                             # 12
        {"captions": "no audio field"},                        # 13
        {**good, "captions": ["fine again", "second caption"]},  # 14: a list, its first caption is used
    ]
    return write_jsonl(d / "manifest.jsonl", lines)


EXPECTED_BAD = {2: "missing.wav", 3: "corrupt.wav", 4: "zero.wav", 5: "empty.wav", 6: "caption",
                7: "gone.png", 8: "JSON", 10: "missing2.wav", 11: "nan.wav", 12: "object", 13: "location"}


def test_error_policy_names_every_bad_row(messy):
    with pytest.raises(ManifestError) as info:
        validate_manifest(messy)
    message = str(info.value)
    for row, needle in EXPECTED_BAD.items():
        line = next(x for x in message.splitlines() if x.strip().startswith(f"row {row}:"))
        assert needle in line, (row, line)
    assert [row for row, _ in info.value.bad] == sorted(EXPECTED_BAD)
    reasons = dict(info.value.bad)
    assert "is empty (0 bytes)" in reasons[5]
    assert "zero-length" in reasons[4]
    assert "cannot be decoded" in reasons[3]
    assert "non-finite" in reasons[11]
    assert "caption is empty" in reasons[10] and "missing2.wav' does not exist" in reasons[10]
    assert "3 of 14 rows are good, 11 bad" in message


def test_skip_policy_keeps_the_good_rows_and_writes_a_report(messy, tmp_path):
    report_path = tmp_path / "reports" / "skipped.json"
    with pytest.warns(UserWarning, match="skipping 11 bad rows of 14"):
        report = validate_manifest(messy, policy="skip", report=report_path)
    assert isinstance(report, ValidationReport)
    assert [t.row for t in report.good] == [1, 9, 14]
    assert [row for row, _ in report.bad] == sorted(EXPECTED_BAD)
    saved = json.loads(report_path.read_text())
    assert saved["total"] == 14 and saved["good"] == 3
    assert [e["row"] for e in saved["bad"]] == sorted(EXPECTED_BAD)
    by_row = {e["row"]: e for e in saved["bad"]}
    assert by_row[5]["audio"].endswith("empty.wav") and by_row[8]["audio"] is None
    assert not [p for p in report_path.parent.iterdir() if p.name != "skipped.json"]  # no temp file left
    assert "11 bad" in report.summary()


def test_validation_of_rows_and_the_listing_cap(tmp_path):
    rows = [Triplet(i, "x", tmp_path / f"missing{i}.wav", None) for i in range(1, 61)]
    with pytest.raises(ManifestError) as info:
        validate_manifest(rows, require_image=False)
    assert "row 50:" in str(info.value) and "row 51:" not in str(info.value)
    assert "and 10 more" in str(info.value) and len(info.value.bad) == 60
    clean = validate_manifest(rows, require_image=False, check_audio=False)
    assert len(clean.good) == 60 and clean.bad == []
    with pytest.raises(ManifestError, match="no image given"):
        validate_manifest(rows[:1], check_audio=False)


# ------------------------------------------------------------------------------------------ audio


def test_load_audio_stereo_int16_44k_to_mono_16k(tmp_path):
    t = np.arange(44_100) / 44_100
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.ones_like(t)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 44_100, subtype="PCM_16")
    y = load_audio(tmp_path / "s.wav", SR)
    assert y.dtype == np.float32 and y.shape == (SR,)
    assert abs(float(y[2000:-2000].mean()) - 0.05) < 0.01  # the channels were averaged


@pytest.mark.parametrize(("sr", "subtype"), [(8000, "FLOAT"), (16_000, "PCM_24"), (22_050, "PCM_U8")])
def test_load_audio_rates_and_subtypes(tmp_path, sr, subtype):
    path = tone(tmp_path / "x.wav", seconds=0.25, sr=sr, freq=300.0, subtype=subtype)
    y = load_audio(path, SR)
    assert y.dtype == np.float32 and y.shape == (SR // 4,)
    assert 0.4 < np.abs(y).max() < 0.6
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * SR / len(y) - 300.0) < 8


def test_load_audio_errors_name_the_file(tmp_path):
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.inf, 0.1], dtype=np.float32), SR, subtype="FLOAT")
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), SR)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really audio" * 10)
    cases = {"nan.wav": "non-finite", "zero.wav": "zero-length", "empty.wav": "empty",
             "junk.wav": "cannot decode", "absent.wav": "no such file"}
    for name, what in cases.items():
        with pytest.raises(ValueError, match=f"clip: .*{name}.*") as info:
            load_audio(tmp_path / name, SR, name="clip")
        assert what in str(info.value)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(tmp_path / "nan.wav", 0)


@settings(max_examples=150, deadline=None)
@given(wave=arrays(np.float32, st.integers(0, 300), elements=st.floats(-1, 1, width=32)),
       length=st.integers(0, 400), seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_fit_length_is_a_slice_or_the_wave_padded(wave, length, seed):
    rng = None if seed is None else np.random.default_rng(seed)
    out = fit_length(wave, length, rng=rng)
    assert out.shape == (length,) and out.dtype == wave.dtype
    if len(wave) <= length:
        assert np.array_equal(out[: len(wave)], wave) and not out[len(wave):].any()
    elif rng is None:
        assert np.array_equal(out, wave[:length])
    else:
        starts = [s for s in range(len(wave) - length + 1) if np.array_equal(out, wave[s:s + length])]
        assert starts  # a contiguous slice of the input
        again = fit_length(wave, length, rng=np.random.default_rng(seed))
        assert np.array_equal(out, again)


def test_fit_length_random_starts_cover_the_range():
    wave = np.arange(10, dtype=np.float32)
    rng = np.random.default_rng(0)
    starts = {int(fit_length(wave, 7, rng=rng)[0]) for _ in range(200)}
    assert starts == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="wave"):
        fit_length(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="length"):
        fit_length(wave, -1)


# ------------------------------------------------------------------------------------------ dataset


def ramp_rows(tmp_path, n: int = 4, samples: int = 8000) -> list[Triplet]:
    """Float WAVs whose sample k holds k / samples, so a crop's first value gives its start."""
    ramp = (np.arange(samples) / samples).astype(np.float32)
    rows = []
    for i in range(n):
        path = tmp_path / f"ramp{i}.wav"
        sf.write(path, ramp, SR, subtype="FLOAT")
        rows.append(Triplet(i + 1, f"clip {i}", path, None))
    return rows


def starts_of(ds: TripletDataset) -> list[int]:
    return [int(round(float(ds[i]["audio"][0]) * 8000)) for i in range(len(ds))]


def test_random_crops_depend_only_on_seed_epoch_and_index(tmp_path):
    rows = ramp_rows(tmp_path)
    ds = TripletDataset(rows, sample_rate=SR, seconds=0.1, image_size=None, random_crop=True, seed=3)
    assert len(ds) == 4 and ds[0]["audio"].shape == (1600,) and ds[0]["image"] is None
    first = starts_of(ds)
    expected = [int(np.random.default_rng([3, 0, i]).integers(0, 8000 - 1600, endpoint=True)) for i in range(4)]
    assert first == expected
    ds.set_epoch(1)
    second = starts_of(ds)
    assert second != first
    resumed = TripletDataset(rows, sample_rate=SR, seconds=0.1, image_size=None, random_crop=True, seed=3)
    resumed.set_epoch(1)
    assert [starts_of(resumed)[i] for i in (3, 1, 0, 2)] == [second[i] for i in (3, 1, 0, 2)]
    plain = TripletDataset(rows, sample_rate=SR, seconds=0.1, image_size=None)
    plain.set_epoch(5)
    assert starts_of(plain) == [0, 0, 0, 0]
    padded = TripletDataset(rows, sample_rate=SR, seconds=1.0, image_size=None, random_crop=True)
    audio = padded[0]["audio"]
    assert audio.shape == (SR,) and float(audio[0]) == 0.0 and not audio[8000:].any()


@pytest.mark.parametrize(("mode", "color"), [("L", 128), ("RGBA", (0, 0, 255, 128)), ("P", 3),
                                             ("I;16", 40000), ("RGB", (10, 200, 30))])
def test_images_of_any_mode_become_square_rgb(tmp_path, mode, color):
    path = picture(tmp_path / "im.png", size=(48, 30), mode=mode, color=color)
    audio = tone(tmp_path / "a.wav", seconds=0.3, sr=22_050)
    ds = TripletDataset([Triplet(1, "x", audio, path)], sample_rate=SR, seconds=0.5, image_size=16)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1.0
    assert item["audio"].shape == (8000,) and item["audio"].dtype == torch.float32
    keep = TripletDataset([Triplet(1, "x", audio, path)], sample_rate=SR, seconds=0.5, image_size=None)
    assert keep[0]["image"].shape == (3, 30, 48)


def test_square_image_resizes_the_short_side_then_centre_crops(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (20, 0, 40, 20))  # a white centre third
    path = tmp_path / "wide.png"
    im.save(path)
    ds = TripletDataset([Triplet(1, "x", tone(tmp_path / "a.wav"), path)], sample_rate=SR, seconds=0.1,
                        image_size=10)
    x = ds[0]["image"]
    assert x.shape == (3, 10, 10) and float(x[:, :, 2:8].min()) > 0.9  # only the centre survives


def test_collate_and_a_dataloader(tmp_path):
    manifest = write_toy_manifest(tmp_path / "toy", n=6, seconds=0.5, image_size=20)
    ds = TripletDataset(read_manifest(manifest), sample_rate=SR, seconds=0.25, image_size=16,
                        random_crop=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_triplets)))
    assert batch["audio"].shape == (4, 4000) and batch["image"].shape == (4, 3, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.long
    assert batch["row"].tolist() == [1, 2, 3, 4] and len(batch["text"]) == 4
    mixed = collate_triplets([ds[0], {**ds[1], "image": None}])
    assert mixed["image"] is None and mixed["audio"].shape == (2, 4000)
    with pytest.raises(IndexError):
        ds[6]


# ------------------------------------------------------------------------------------------ toy world


def peak_hz(path: Path) -> float:
    y, sr = sf.read(path)
    return float(np.argmax(np.abs(np.fft.rfft(y))) * sr / len(y))


def image_hue(path: Path) -> float:
    """The circular mean hue of an image, in [0, 1)."""
    angle = np.asarray(Image.open(path).convert("HSV"), dtype=np.float64)[..., 0] / 255 * 2 * np.pi
    return float(np.angle(np.exp(1j * angle).mean()) / (2 * np.pi)) % 1.0


def test_toy_world_is_deterministic_and_clean(tmp_path):
    first = write_toy_manifest(tmp_path / "a", n=16)
    second = write_toy_manifest(tmp_path / "b", n=16)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 33
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = write_toy_manifest(tmp_path / "c", n=16, seed=1)
    assert (tmp_path / "c" / files[0]).read_bytes() != (tmp_path / "a" / files[0]).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = validate_manifest(first, policy="skip")
    assert len(report.good) == 16 and report.bad == []
    assert first.name == second.name == other.name == "manifest.jsonl"
    csv_path = write_toy_manifest(tmp_path / "d", n=4, format="csv")
    rows = read_manifest(csv_path)
    assert csv_path.name == "manifest.csv" and [r.row for r in rows] == [2, 3, 4, 5]
    assert len(validate_manifest(rows).good) == 4
    with pytest.raises(ValueError, match="format"):
        write_toy_manifest(tmp_path / "e", format="yaml")


def test_toy_hue_sets_the_pitch_and_the_caption_the_loudness(tmp_path):
    rows = read_manifest(write_toy_manifest(tmp_path, n=12, seconds=1.0))
    class_hues = np.array([hue for _, hue, _ in TOY_CLASSES])
    by_hue: dict[int, set[int]] = {}
    for t in rows:
        gap = np.abs(image_hue(t.image) - class_hues)
        nearest = int(np.argmin(np.minimum(gap, 1 - gap)))  # hue is circular
        assert min(gap[nearest], 1 - gap[nearest]) < 0.05
        by_hue.setdefault(nearest, set()).add(round(peak_hz(t.audio)))
    assert len(by_hue) == 4  # four hue classes ...
    pitches = [next(iter(p)) for p in by_hue.values()]
    assert all(len(p) == 1 for p in by_hue.values())  # ... each with one pitch ...
    assert len(set(pitches)) == 4  # ... and different pitches
    assert sorted(pitches) == [220, 277, 330, 440]
    loudness: dict[str, float] = {}
    for t in rows:
        loudness[t.caption] = float(np.abs(sf.read(t.audio)[0]).max())
    assert loudness["a soft flute tone"] < loudness["a pulsing organ tone"] < loudness["a bright plucked tone"]


def test_a_dataset_without_images_never_opens_them(tmp_path):
    # a text-only model trains on a manifest whose pictures differ in size (or are unreadable): nothing to stack
    from melfusion.datasets import TripletDataset, collate_triplets
    from melfusion.datasets.manifest import read_manifest, validate_manifest
    from melfusion.datasets.synthetic import write_synthetic_manifest

    manifest = write_synthetic_manifest(tmp_path, n=3, seconds=0.5, sizes=[(40, 90), (64, 64)], augment=True)
    rows = validate_manifest(read_manifest(manifest)).good
    Path(rows[0].image).write_bytes(b"not a picture")  # this test's own file
    data = TripletDataset(rows, sample_rate=16000, seconds=0.5, image_size=None, images=False)
    batch = collate_triplets([data[i] for i in range(3)])
    assert batch["image"] is None and batch["audio"].shape == (3, 8000)
