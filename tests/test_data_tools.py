"""``melfusion data check`` and ``melfusion data split`` (melfusion.datasets.tools) on tiny WAV/PNG manifests."""

import csv
import json
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from melfusion.cli import main
from melfusion.datasets import Triplet, read_manifest
from melfusion.datasets.tools import (
    SkippedRowsWarning,
    assign_groups,
    check_manifest,
    check_ratios,
    split_manifest,
    split_rows,
)

# ------------------------------------------------------------------------------------------------ helpers


def _wav(path: Path, seconds: float = 0.1, rate: int = 8000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = 0.1 * np.ones((int(seconds * rate), channels), dtype=np.float32)
    sf.write(path, wave, rate, subtype="PCM_16")


def _png(path: Path, size=(16, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def _jsonl(path: Path, records, extra_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _good(root: Path) -> list[dict]:
    """Three clips: c0 with two images (a clip of Extended MusicCaps), c1 stereo 16 kHz, c2; relative paths."""
    _wav(root / "audio/c0.wav", 0.1)
    _wav(root / "audio/c1.wav", 0.2, rate=16000, channels=2)
    _wav(root / "audio/c2.wav", 0.3)
    _png(root / "img/i0.png")
    _png(root / "img/i1.png", (20, 10))
    _png(root / "img/i2.png", (8, 8), "L")
    _png(root / "img/i3.png")
    return [
        {"captions": "a calm piano", "location": "audio/c0.wav", "img_path": "img/i0.png", "genre": "classical"},
        {"captions": ["soft piano at dusk", "ignored"], "location": "audio/c0.wav", "img_path": "img/i1.png"},
        {"captions": "drums", "location": "audio/c1.wav", "img_path": "img/i2.png"},
        {"captions": "a slow guitar ballad", "location": "audio/c2.wav", "img_path": "img/i3.png"},
    ]


def _clips(root: Path, n: int, images_per_clip: int = 1) -> Path:
    """A manifest of ``n`` clips of ``images_per_clip`` rows each (one shared WAV file keeps it fast)."""
    _wav(root / "audio/shared.wav")
    _png(root / "img/shared.png")
    records = []
    for c in range(n):
        (root / f"audio/c{c}.wav").write_bytes((root / "audio/shared.wav").read_bytes())
        for i in range(images_per_clip):
            records.append({"captions": f"clip {c} image {i}", "location": f"audio/c{c}.wav",
                            "img_path": "img/shared.png", "clip": c})
    return _jsonl(root / "m.jsonl", records)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------------------------------------------------- check


def test_check_summarises_a_good_manifest(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", _good(tmp_path))
    report = check_manifest(m, progress=False)
    assert report["rows"] == {"total": 4, "good": 4, "bad": 0} and report["bad"] == []
    audio, images, captions = report["audio"], report["images"], report["captions"]
    assert audio["clips"] == 3 and audio["images_per_clip"]["max"] == 2
    assert audio["seconds"]["min"] == pytest.approx(0.1) and audio["seconds"]["max"] == pytest.approx(0.3)
    assert audio["seconds"]["total"] == pytest.approx(0.6)  # over distinct clips, not rows
    assert audio["sample_rates"] == {"8000": 2, "16000": 1} and audio["channels"] == {"1": 2, "2": 1}
    assert images["sizes"] == {"16x12": 2, "20x10": 1, "8x8": 1}
    assert (images["min_side"], images["max_side"]) == (8, 20) and images["modes"] == {"RGB": 3, "L": 1}
    assert captions["words"] == {"min": 1, "median": 3.5, "max": 4}  # a list caption counts its first item
    json.dumps(report)  # JSON-ready


def test_data_check_good_jsonl_exits_0(tmp_path, capsys):
    m = _jsonl(tmp_path / "m.jsonl", _good(tmp_path))
    code, out, _ = _run(capsys, "check", m, "--no-progress")
    assert code == 0
    assert "rows: 4 total, 4 good, 0 bad" in out and "8000 Hz (2), 16000 Hz (1)" in out
    assert "16x12 (2)" in out and "audio seconds" in out
    assert out.strip().splitlines()[-1] == "all 4 rows are good"


def test_data_check_good_csv_and_folder(tmp_path, capsys):
    records = _good(tmp_path)
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["captions", "location", "img_path"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "captions": r["captions"] if isinstance(r["captions"], str) else r["captions"][0]}
                         for r in records)
    code, out, _ = _run(capsys, "check", tmp_path / "m.csv", "--no-progress")
    assert code == 0 and "(csv)" in out and "all 4 rows are good" in out

    folder = tmp_path / "folder"
    for i, seconds in enumerate((0.1, 0.2)):
        _wav(folder / f"t{i}.wav", seconds)
        _png(folder / f"t{i}.png")
        (folder / f"t{i}.txt").write_text(f"tune {i}", encoding="utf-8")
    code, out, _ = _run(capsys, "check", folder, "--no-progress")
    assert code == 0 and "(folder)" in out and "all 2 rows are good" in out


def test_data_check_broken_manifest_exits_2_with_the_bad_rows(tmp_path, capsys):
    records = _good(tmp_path)
    (tmp_path / "audio/corrupt.wav").write_bytes(b"RIFF not really a wave file" * 10)
    records += [
        {"captions": "no picture", "location": "audio/c2.wav", "img_path": "img/missing.png"},  # row 5
        {"captions": "noise", "location": "audio/corrupt.wav", "img_path": "img/i0.png"},       # row 6
        {"captions": "   ", "location": "audio/c1.wav", "img_path": "img/i3.png"},              # row 7
    ]
    m = _jsonl(tmp_path / "m.jsonl", records, ['{"captions": "half a line'])             # row 8
    code, out, err = _run(capsys, "check", m, "--no-progress")
    assert code == 2 and "Traceback" not in out + err
    assert "rows: 8 total, 4 good, 4 bad" in out
    bad = {line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  row ")}
    assert bad == {"row 5", "row 6", "row 7", "row 8"}
    assert "missing.png" in out and "corrupt.wav" in out and "caption is empty" in out and "not valid JSON" in out
    assert out.strip().splitlines()[-1].startswith("4 of 8 rows are bad")
    report = check_manifest(m, progress=False)
    assert [b["row"] for b in report["bad"]] == [5, 6, 7, 8] and report["audio"]["clips"] == 3


def test_data_check_resolves_paths_against_the_manifest_folder(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "m.jsonl", _good(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = _run(capsys, "check", os.path.join("..", "data", "m.jsonl"), "--no-progress")
    assert code == 0 and "all 4 rows are good" in out


def test_data_check_unreadable_manifest_is_one_error_line(tmp_path, capsys):
    code, out, err = _run(capsys, "check", tmp_path / "nope.jsonl")
    assert code == 2 and err.strip().startswith("melfusion data: error: manifest: no such file")
    assert len(err.strip().splitlines()) == 1 and out == ""
    (tmp_path / "m.csv").write_text("text,path\nhello,a.wav\n", encoding="utf-8")
    code, _, err = _run(capsys, "check", tmp_path / "m.csv")
    assert code == 2 and "has no column" in err and "m.csv" in err and "Traceback" not in err


def test_data_check_without_references_or_images(tmp_path, capsys):
    _png(tmp_path / "img/a.png")
    m = _jsonl(tmp_path / "test.jsonl", [{"captions": "a tune", "img_path": "img/a.png"}])
    assert _run(capsys, "check", m, "--no-progress")[0] == 2  # the audio field is required by default
    code, out, _ = _run(capsys, "check", m, "--no-audio", "--no-progress")
    assert code == 0 and "1 rows without audio" in out
    _wav(tmp_path / "a.wav")
    m = _jsonl(tmp_path / "audio_text.jsonl", [{"captions": "a tune", "location": "a.wav"}])
    code, out, _ = _run(capsys, "check", m, "--no-progress")
    assert code == 2 and "no image given" in out
    assert _run(capsys, "check", m, "--no-image-required", "--no-progress")[0] == 0


def test_data_check_json_report_is_never_written_over_a_file(tmp_path, capsys):
    m = _jsonl(tmp_path / "m.json", _good(tmp_path))  # JSON lines in a .json file
    out_json = tmp_path / "report.json"
    assert _run(capsys, "check", m, "--json", out_json, "--no-progress")[0] == 0
    saved = json.loads(out_json.read_text(encoding="utf-8"))
    assert saved["rows"]["good"] == 4 and saved["audio"]["clips"] == 3
    code, _, err = _run(capsys, "check", m, "--json", out_json, "--no-progress")
    assert code == 2 and "already exists" in err and "--json" in err
    assert _run(capsys, "check", m, "--json", out_json, "--overwrite", "--no-progress")[0] == 0
    before = m.read_bytes()
    code, _, err = _run(capsys, "check", m, "--json", m, "--overwrite", "--no-progress")
    assert code == 2 and "an input" in err and m.read_bytes() == before


# -------------------------------------------------------------------------------------------------- split


def test_split_writes_manifests_that_read_back_and_resolve(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    m = _clips(data, 10, images_per_clip=2)
    out_dir = tmp_path / "splits"
    code, out, _ = _run(capsys, "split", m, "--ratios", "0.6,0.2,0.2", "--seed", 0, "--out-dir", out_dir)
    assert code == 0
    assert "train: 12 rows, 6 clips" in out and "val: 4 rows, 2 clips" in out and "test: 4 rows, 2 clips" in out
    original = {(t.caption, t.audio, t.image) for t in read_manifest(m)}
    seen = set()
    for name in ("train", "val", "test"):
        path = out_dir / f"{name}.jsonl"
        rows = read_manifest(path)
        assert not rows.problems and all(t.audio.is_file() and t.image.is_file() for t in rows)
        seen |= {(t.caption, t.audio, t.image) for t in rows}
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert set(record) == {"captions", "location", "img_path", "clip"}  # every original field
            assert record["location"].startswith("../data/audio/")  # relative, from the new folder
    assert seen == original


def test_split_default_outputs_sit_beside_the_manifest(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    m = _clips(data, 5)
    monkeypatch.chdir(tmp_path)  # the manifest is given relative to another folder
    code, out, _ = _run(capsys, "split", "data/m.jsonl", "--ratios", "0.8,0.2")
    assert code == 0 and "train: 4 rows" in out and "test: 1 row," in out
    assert sorted(p.name for p in data.glob("m.*.jsonl")) == ["m.test.jsonl", "m.train.jsonl"]
    lines = (data / "m.train.jsonl").read_text(encoding="utf-8").splitlines()
    inputs = set(m.read_text(encoding="utf-8").splitlines())
    assert set(lines) <= inputs  # the same folder: every record is written back as it was
    assert all(t.audio.is_file() for t in read_manifest(data / "m.test.jsonl"))


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path):
    m = _clips(tmp_path, 20)
    a = split_manifest(m, seed=3, out_dir=tmp_path / "a")
    b = split_manifest(m, seed=3, out_dir=tmp_path / "b")
    c = split_manifest(m, seed=4, out_dir=tmp_path / "c")
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert [len(a[n]) for n in a] == [12, 4, 4]
    assert {n: [t.row for t in rows] for n, rows in a.items()} == {n: [t.row for t in rows] for n, rows in b.items()}
    assert (tmp_path / "a/test.jsonl").read_bytes() != (tmp_path / "c/test.jsonl").read_bytes()
    assert {n: [t.row for t in rows] for n, rows in a.items()} != {n: [t.row for t in rows] for n, rows in c.items()}


def test_split_does_not_depend_on_row_order(tmp_path):
    m = _clips(tmp_path, 15, images_per_clip=2)
    lines = m.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    a = split_manifest(m, seed=1, out_dir=tmp_path / "a")
    b = split_manifest(shuffled, seed=1, out_dir=tmp_path / "b")
    assert {n: {t.caption for t in rows} for n, rows in a.items()} == {n: {t.caption for t in rows} for n, rows in b.items()}


def test_split_keeps_the_rows_of_one_clip_together(tmp_path):
    m = _clips(tmp_path, 7, images_per_clip=3)
    result = split_manifest(m, seed=0, out_dir=tmp_path / "out")
    where = {}
    for name, rows in result.items():
        for t in rows:
            where.setdefault(t.audio, set()).add(name)
    assert len(where) == 7 and all(len(names) == 1 for names in where.values())
    assert sum(result.groups.values()) == 7 and sum(len(rows) for rows in result.values()) == 21


@pytest.mark.parametrize("ratios", ["0.5,0.2", "0.5,0.3,0.1,0.1", "a,b,c", "1", "-0.2,1.2", "nan,0.5,0.5",
                                    "inf,0,0", ""])
def test_split_refuses_bad_ratios(tmp_path, capsys, ratios):
    m = _clips(tmp_path, 3)
    code, out, err = _run(capsys, "split", m, f"--ratios={ratios}")
    assert code == 2 and err.startswith("melfusion data: error: --ratios:") and "Traceback" not in err
    assert not list(tmp_path.glob("m.*.jsonl"))


def test_ratios_are_normalised_within_a_tolerance():
    assert check_ratios((0.333, 0.333, 0.333)) == (Fraction(1, 3),) * 3
    assert check_ratios([0.6, 0.2, 0.2]) == (Fraction(3, 5), Fraction(1, 5), Fraction(1, 5))
    with pytest.raises(ValueError, match="ratios: .* sums to 0.99"):
        check_ratios((0.33, 0.33, 0.33))
    with pytest.raises(ValueError, match="names: expected 2 split names"):
        split_manifest("unused.jsonl", (0.5, 0.5), names=("train", "val", "test"))


def test_split_never_overwrites_without_the_flag_and_never_the_input(tmp_path, capsys):
    m = _clips(tmp_path, 5)
    out_dir = tmp_path / "out"
    assert _run(capsys, "split", m, "--out-dir", out_dir)[0] == 0
    before = (out_dir / "train.jsonl").read_bytes()
    code, _, err = _run(capsys, "split", m, "--out-dir", out_dir, "--seed", 9)
    assert code == 2 and "already exists" in err and "--out-dir" in err
    assert (out_dir / "train.jsonl").read_bytes() == before
    assert _run(capsys, "split", m, "--out-dir", out_dir, "--seed", 9, "--overwrite")[0] == 0
    train = tmp_path / "train.jsonl"
    train.write_bytes(m.read_bytes())
    code, _, err = _run(capsys, "split", train, "--out-dir", tmp_path, "--overwrite")
    assert code == 2 and "an input" in err and train.read_bytes() == m.read_bytes()


def test_split_skips_bad_rows_and_names_them(tmp_path, capsys):
    records = _good(tmp_path)
    records.append({"captions": "", "location": "audio/c1.wav", "img_path": "img/i0.png"})  # row 5
    m = _jsonl(tmp_path / "m.jsonl", records, ["[1, 2]"])                                   # row 6
    code, out, err = _run(capsys, "split", m, "--ratios", "0.5,0.5", "--out-dir", tmp_path / "out")
    assert code == 0 and "skipped 2 bad rows of 6" in err
    assert "row 5: caption is empty" in err and "row 6: expected a JSON object" in err
    written = sum(len(read_manifest(p)) for p in (tmp_path / "out").glob("*.jsonl"))
    assert written == 4
    with pytest.warns(SkippedRowsWarning, match="row 5 .*row 6"):
        result = split_manifest(m, (0.5, 0.5), out_dir=tmp_path / "api")
    assert [row for row, _ in result.skipped] == [5, 6]
    _jsonl(tmp_path / "all_bad.jsonl", [{"captions": "", "location": "audio/c0.wav"}])
    code, _, err = _run(capsys, "split", tmp_path / "all_bad.jsonl", "--out-dir", tmp_path / "none")
    assert code == 2 and "no usable rows" in err and not (tmp_path / "none").exists()


def test_split_csv_writes_json_lines_with_every_column(tmp_path):
    data = tmp_path / "data"
    records = _good(data)
    with open(data / "m.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["captions", "location", "img_path", "genre"])
        for r in records:
            writer.writerow([r["captions"] if isinstance(r["captions"], str) else r["captions"][0],
                             r["location"], r["img_path"], r.get("genre", "")])
    result = split_manifest(data / "m.csv", (0.5, 0.5), out_dir=tmp_path / "out")
    for path in result.paths.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert list(record) == ["captions", "location", "img_path", "genre"]
            assert record["location"].startswith("../data/audio/") and record["genre"] in ("", "classical")
        assert all(t.audio.is_file() and t.image.is_file() for t in read_manifest(path))
    assert sorted(t.row for rows in result.values() for t in rows) == [2, 3, 4, 5]  # CSV rows: line numbers


def test_split_folder_dataset_and_rows_without_audio(tmp_path):
    folder = tmp_path / "tunes"
    for i in range(4):
        _wav(folder / f"t{i}.wav")
        _png(folder / f"t{i}.png")
        (folder / f"t{i}.txt").write_text(f"tune {i}", encoding="utf-8")
    result = split_manifest(folder, (0.5, 0.5))
    assert set(result.paths.values()) == {tmp_path / "tunes.train.jsonl", tmp_path / "tunes.test.jsonl"}
    first = json.loads((tmp_path / "tunes.train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["location"].startswith("tunes/t") and first["img_path"].startswith("tunes/t")
    assert sum(len(read_manifest(p)) for p in result.paths.values()) == 4

    _png(tmp_path / "img/a.png")
    _png(tmp_path / "img/b.png")
    test_set = _jsonl(tmp_path / "test.jsonl", [{"captions": f"c{i}", "img_path": f"img/{'ab'[i % 2]}.png"}
                                                for i in range(6)])
    result = split_manifest(test_set, (0.5, 0.5), require_audio=False, out_dir=tmp_path / "out")
    assert sorted(len(rows) for rows in result.values()) == [3, 3]  # grouped by image: three rows each
    assert all(len({t.image for t in rows}) == 1 for rows in result.values())


# ---------------------------------------------------------------------------------------- split properties


@st.composite
def _rows_and_ratios(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=0, max_size=30))  # rows per clip
    rows = []
    row = 0
    for clip, size in enumerate(sizes):
        for image in range(size):
            row += 1
            rows.append(Triplet(row, f"clip {clip}", Path(f"/d/audio/{clip}.wav"), Path(f"/d/img/{clip}_{image}.png")))
    rows = draw(st.permutations(rows))
    weights = draw(st.lists(st.integers(0, 10), min_size=2, max_size=3).filter(lambda w: sum(w) > 0))
    ratios = [w / sum(weights) for w in weights]
    return rows, len(sizes), ratios, draw(st.integers(-(2**40), 2**40))


@given(_rows_and_ratios())
def test_split_rows_properties(case):
    """Every row in exactly one split, a clip never split, and each split within one clip of its share."""
    rows, clips, ratios, seed = case
    splits = split_rows(rows, ratios, seed, base="/d")
    placed = [t.row for split in splits.values() for t in split]
    assert sorted(placed) == sorted(t.row for t in rows)
    where: dict[Path, set[str]] = {}
    for name, split in splits.items():
        assert [t.row for t in split] == sorted(t.row for t in split)  # each split in row order
        for t in split:
            where.setdefault(t.audio, set()).add(name)
    assert all(len(names) == 1 for names in where.values())
    exact = check_ratios(ratios)
    for split, share in zip(splits.values(), exact, strict=True):
        groups = len({t.audio for t in split})
        assert abs(groups - share * clips) < 1
        if share == 0:
            assert split == []
    assert split_rows(list(reversed(rows)), ratios, seed, base="/d") == splits


@given(st.sets(st.text(min_size=1, max_size=8), max_size=40), st.integers(0, 1000))
def test_assign_groups_is_a_function_of_the_set_of_labels(labels, seed):
    order = sorted(labels)
    a = assign_groups(order, (0.6, 0.2, 0.2), seed)
    b = assign_groups(list(reversed(order)) + order, (0.6, 0.2, 0.2), seed)
    assert a == b and set(a) == labels
