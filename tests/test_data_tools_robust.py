"""Adversarial inputs to ``melfusion data check | split | synthetic``: one error line, exit status 2, nothing lost."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from melfusion.cli import main


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["data", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err


def _one_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _manifest(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "i").mkdir()
    sf.write(root / "a/0.wav", np.zeros(800, dtype=np.float32), 8000)
    Image.new("RGB", (8, 8)).save(root / "i/0.png")
    m = root / "m.jsonl"
    m.write_text(json.dumps({"captions": "a tune", "location": "a/0.wav", "img_path": "i/0.png"}) + "\n")
    return m


def _loop(a: Path, b: Path) -> Path:
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    return a


def test_looping_link_manifest_is_one_error_line(tmp_path, capsys):
    loop = _loop(tmp_path / "l1.jsonl", tmp_path / "l2.jsonl")
    _one_error(*_run(capsys, "split", loop, "--out-dir", tmp_path / "out"), "manifest", "l1.jsonl")
    _one_error(*_run(capsys, "split", loop), "manifest", "l1.jsonl")
    _one_error(*_run(capsys, "check", loop, "--json", tmp_path / "r.json"), "manifest", "l1.jsonl")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_looping_link_output_is_one_error_line(tmp_path, capsys):
    m = _manifest(tmp_path / "d")
    out = tmp_path / "out"
    out.mkdir()
    _loop(out / "train.jsonl", out / "other.jsonl")
    for flags in ((), ("--overwrite",)):
        _one_error(*_run(capsys, "split", m, "--out-dir", out, *flags), "--out-dir", "train.jsonl")
    assert os.path.islink(out / "train.jsonl")
    report = _loop(tmp_path / "r1.json", tmp_path / "r2.json")
    _one_error(*_run(capsys, "check", m, "--json", report, "--overwrite", "--no-progress"), "--json", "r1.json")


def test_json_integer_over_the_digit_limit_names_the_manifest(tmp_path, capsys):
    m = _manifest(tmp_path)
    row = '{"captions": "a", "location": "a/0.wav", "img_path": "i/0.png", "n": ' + "9" * 5000 + "}"
    for name, text in (("big.jsonl", row + "\n"), ("big.json", f"[{row}]")):
        (tmp_path / name).write_text(text)
        _one_error(*_run(capsys, "split", tmp_path / name, "--out-dir", tmp_path / "o"), "manifest", name)
        _one_error(*_run(capsys, "check", tmp_path / name, "--no-progress"), "manifest", name)
    assert m.exists()


def test_split_names_differing_only_in_case_are_refused(tmp_path, capsys):
    m = _manifest(tmp_path)
    _one_error(*_run(capsys, "split", m, "--names", "Train,val,train", "--out-dir", tmp_path / "o"), "--names")
    assert not (tmp_path / "o").exists()


def test_empty_paths_are_refused(tmp_path, capsys, monkeypatch):
    m = _manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_error(*_run(capsys, "split", m, "--out-dir", ""), "--out-dir")
    _one_error(*_run(capsys, "split", ""), "manifest")
    _one_error(*_run(capsys, "check", ""), "manifest")
    _one_error(*_run(capsys, "synthetic", "", "--rows", 1), "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "i", "m.jsonl"]


@pytest.mark.parametrize("argv, word", [
    (["--rows", "1" + "0" * 30], "--rows"),  # once a hang: the file list was built before anything was checked
    (["--rows", "0"], "--rows"),
    (["--seed", "-1", "--rows", "1"], "--seed"),
    (["--start", "-1", "--rows", "1"], "--start"),
    (["--families", "triangle,hexagon", "--rows", "1"], "--families"),
    (["--sizes", "160x", "--rows", "1"], "--sizes"),
    (["--sizes", "4x4", "--rows", "1"], "--sizes"),
    (["--jpeg", "0", "--rows", "1"], "--jpeg"),
])
def test_synthetic_bad_numbers(tmp_path, capsys, argv, word):
    _one_error(*_run(capsys, "synthetic", tmp_path / "s", *argv), word)
    assert not (tmp_path / "s").exists()


def test_synthetic_bad_folders(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    loop = _loop(tmp_path / "l1", tmp_path / "l2")
    for folder in (tmp_path / "afile/x/y", tmp_path / "dangling", loop):
        _one_error(*_run(capsys, "synthetic", folder, "--rows", 1), "folder")
    assert (tmp_path / "afile").read_text() == "keep" and os.path.islink(tmp_path / "dangling")
    if Path("/proc/self").is_dir():  # a folder that cannot be made: an OSError naming the folder
        _one_error(*_run(capsys, "synthetic", "/proc/melfusion-x", "--rows", 1), "folder", "/proc/melfusion-x")


def test_synthetic_families_sizes_and_jpeg(tmp_path, capsys):
    import json

    code, _ = _run(capsys, "synthetic", tmp_path / "g", "--rows", 16, "--families", "heldout", "--sizes",
                      "160x120, 40x90", "--jpeg", 50)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "g" / "manifest.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows] == ["triangle"] * 8 + ["gradient"] * 8
    assert {(r["width"], r["height"]) for r in rows} == {(160, 120)} and {r["jpeg"] for r in rows} == {50}
    code, _ = _run(capsys, "synthetic", tmp_path / "t", "--rows", 8, "--augment")
    assert code == 0 and "family" in (tmp_path / "t" / "manifest.jsonl").read_text()
