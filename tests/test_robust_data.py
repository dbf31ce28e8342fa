"""Bad data in, one clean line out: truncated, corrupt, non-finite, oversized or misplaced audio and images;
manifests with odd rows; writers that never overwrite what they did not write; evaluate's inputs and
outputs kept apart; no NaN in any metric."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import save_file

from melfusion.checks import NonFiniteError
from melfusion.datasets import (
    ManifestError,
    Triplet,
    TripletDataset,
    check_audio,
    load_audio,
    read_manifest,
    validate_manifest,
    write_synthetic_manifest,
    write_toy_manifest,
)
from melfusion.files import OutputExistsError
from melfusion.metrics import (
    EmbeddingCache,
    add_evaluate_arguments,
    evaluate,
    frechet_distance,
    imsm,
    kl_divergence,
    kl_divergence_per_pair,
)
from melfusion.metrics.evaluate import input_files, write_json
from melfusion.metrics.manifest import read_manifest as read_metric_manifest
from melfusion.metrics.synthetic import read_synthetic_rows
from test_metrics_embedders import tiny_cnn14, tiny_vggish, tone

SR = 16_000
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def wav(path: Path, seconds: float = 0.5, sr: int = SR, channels: int = 1, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = tone(seconds, sr)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr, **kw)
    return path


def cut(path: Path, nbytes: int) -> Path:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels but holds no image data (a decompression bomb's
    first bytes: PIL refuses it at open, before any size check of ours)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def picture(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ------------------------------------------------------------------------------------------ truncated audio


@QUICK
@given(fmt=st.sampled_from([("WAV", "wav"), ("AIFF", "aiff"), ("W64", "w64"), ("RF64", "rf64")]),
       subtype=st.sampled_from(["PCM_16", "PCM_24", "FLOAT"]), channels=st.integers(1, 2),
       fraction=st.floats(0.0001, 0.999))
def test_a_truncated_file_is_refused_by_the_loader_and_the_check(tmp_path, fmt, subtype, channels, fraction):
    kind, ext = fmt
    path = wav(tmp_path / f"clip.{ext}", seconds=0.25, channels=channels, subtype=subtype, format=kind)
    assert check_audio(path) is None and load_audio(path, SR).shape == (SR // 4,)
    data_bytes = (SR // 4) * channels * {"PCM_16": 2, "PCM_24": 3, "FLOAT": 4}[subtype]
    cut(path, max(1, int(fraction * data_bytes)))  # the header still says every frame is there
    problem = check_audio(path)
    assert problem is not None and "truncated" in problem
    with pytest.raises(ValueError, match=r"clip: '.*clip\.\w+' is truncated") as info:
        load_audio(path, SR, name="clip")
    assert "\n" not in str(info.value)


def test_a_truncated_flac_fails_mid_read_as_a_corrupt_file(tmp_path):
    path = cut(wav(tmp_path / "song.flac", seconds=1.0, format="FLAC"), 2000)
    with pytest.raises(ValueError, match=r"'.*song\.flac' is truncated or corrupt: decoding failed"):
        load_audio(path, SR)
    assert "truncated or corrupt" in check_audio(path)


def test_validation_lists_a_truncated_row_and_training_never_reads_it(tmp_path):
    picture(tmp_path / "p.png")
    wav(tmp_path / "good.wav")
    cut(wav(tmp_path / "short.wav"), 3000)
    manifest = jsonl(tmp_path / "m.jsonl", [{"captions": "ok", "location": "good.wav", "img_path": "p.png"},
                                            {"captions": "cut", "location": "short.wav", "img_path": "p.png"}])
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest)
    assert [row for row, _ in info.value.bad] == [2] and "short.wav' is truncated" in info.value.bad[0][1]
    ds = TripletDataset(read_manifest(manifest), sample_rate=SR, seconds=1.0, image_size=8)
    assert ds[0]["audio"].shape == (SR,)
    with pytest.raises(ValueError, match="row 2 audio: .*short.wav' is truncated"):
        ds[1]


# ------------------------------------------------------------------------------------------ other bad audio


def _patch_rate(path: Path, rate: int) -> Path:
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("rate", [1, 500, 3_000_000, 0xFFFFFFFF])
def test_absurd_sample_rates_are_refused(tmp_path, rate):
    path = _patch_rate(wav(tmp_path / "odd.wav", subtype="PCM_16"), rate)
    assert "Hz, outside" in check_audio(path)
    with pytest.raises(ValueError, match=r"odd\.wav.* Hz, outside 1000\.\.768000 Hz"):
        load_audio(path, SR)
    with pytest.raises(ValueError, match="sample_rate: expected a positive integer up to"):
        load_audio(wav(tmp_path / "fine.wav"), 10**9)


def test_non_finite_samples_in_any_channel(tmp_path):
    x = np.zeros((4000, 2), dtype=np.float32)
    x[100, 0], x[100, 1] = np.inf, -np.inf  # the channel mean is NaN
    sf.write(tmp_path / "inf.wav", x, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match="inf.wav' has non-finite samples"):
        load_audio(tmp_path / "inf.wav", SR)
    assert "non-finite" in check_audio(tmp_path / "inf.wav")
    big = np.full((4000, 2), 3e38, dtype=np.float32)  # finite: averaging the channels must not overflow
    sf.write(tmp_path / "big.wav", big, SR, subtype="FLOAT")
    assert np.isfinite(load_audio(tmp_path / "big.wav", SR)).all()


def test_long_and_huge_files_are_refused_before_decoding(tmp_path, monkeypatch):
    path = wav(tmp_path / "long.wav", seconds=1.0)
    with pytest.raises(ValueError, match=r"long\.wav' is 1\.0 s long, over the 0\.5 s limit"):
        load_audio(path, SR, max_seconds=0.5)
    assert "over the 0.5 s limit" in check_audio(path, max_seconds=0.5)
    import melfusion.checks

    monkeypatch.setattr(melfusion.checks, "memory_bytes", lambda: 1000)  # a machine with 1000 bytes
    with pytest.raises(ValueError, match=r"audio: decoding '.*long\.wav' .* needs about .* GiB, more than"):
        load_audio(path, SR)


def test_the_dataset_refuses_files_far_longer_than_its_window(tmp_path, monkeypatch):
    import melfusion.datasets.triplets as triplets

    rows = [Triplet(1, "x", wav(tmp_path / "a.wav", seconds=1.0), None)]
    monkeypatch.setattr(triplets, "max_audio_seconds", lambda seconds: 10 * seconds)
    with pytest.raises(ValueError, match=r"row 1 audio: .*a\.wav' is 1\.0 s long, over the 0\.5 s limit"):
        TripletDataset(rows, sample_rate=SR, seconds=0.05, image_size=None)[0]
    for seconds in (0.0, float("nan"), 1e-9):
        with pytest.raises(ValueError, match="seconds"):
            TripletDataset(rows, sample_rate=SR, seconds=seconds, image_size=None)
    with pytest.raises(ValueError, match="image_size"):
        TripletDataset(rows, sample_rate=SR, seconds=0.5, image_size=100_000)


# ------------------------------------------------------------------------------------------ manifest rows


def test_every_bad_row_gets_one_line_naming_it(tmp_path):
    picture(tmp_path / "p.png")
    wav(tmp_path / "a.wav")
    png_header(tmp_path / "bomb.png", 30_000, 30_000)
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "folder.png").mkdir()
    good = {"captions": "fine", "location": "a.wav", "img_path": "p.png"}
    rows = [
        good,                                                  # 1
        {**good, "img_path": "bomb.png"},                      # 2: a decompression bomb
        {**good, "location": "folder.wav"},                    # 3: a folder, not audio
        {**good, "img_path": "folder.png"},                    # 4: a folder, not an image
        {**good, "captions": " \t "},                          # 5: whitespace
        {**good, "captions": 7},                               # 6: not a string
        {**good, "captions": None},                            # 7: null
        {**good, "captions": []},                              # 8: an empty list
        {**good, "captions": ["a", 3]},                        # 9: a list holding a number
        good,                                                  # 10: an exact duplicate of row 1
        {**good, "location": "x" * 5000 + ".wav"},             # 11: a name the OS refuses
        {**good, "location": "a\u0000.wav"},                   # 12: a NUL in the path
        "[[[[" * 20_000,                                       # 13: nested too deeply for json
        {**good, "captions": ["first\u2028caption", "second"]},  # 14: fine: the first caption, U+2028 and all
    ]
    manifest = jsonl(tmp_path / "m.jsonl", rows)
    with (manifest.open("ab")) as f:
        f.write(b'{"captions": "caf\xe9", "location": "a.wav", "img_path": "p.png"}\n')  # 15: Latin-1, not UTF-8
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest)
    bad = dict(info.value.bad)
    assert sorted(bad) == list(range(2, 14)) + [15]
    assert "bomb.png" in bad[2] and "folder.wav' is a folder" in bad[3] and "folder.png' is a folder" in bad[4]
    assert "caption is empty" in bad[5] and "is an int" in bad[6] and "is null" in bad[7]
    assert "empty list" in bad[8] and "holding an int" in bad[9] and "duplicates row 1" in bad[10]
    assert "cannot be read" in bad[11] and "NUL" in bad[12] and "nested too deeply" in bad[13]
    assert "not UTF-8" in bad[15]
    assert all("\n" not in reason for reason in bad.values())
    message = str(info.value)
    assert "2 of 15 rows are good, 13 bad" in message
    with pytest.warns(UserWarning, match="skipping 13 bad rows of 15"):
        assert [t.row for t in validate_manifest(manifest, policy="skip").good] == [1, 14]
    rows = read_manifest(manifest)
    assert [t.caption for t in rows if t.row == 14] == ["first\u2028caption"]


def test_a_decompression_bomb_from_pil_itself_is_a_bad_row(tmp_path, monkeypatch):
    from PIL import Image

    import melfusion.datasets.manifest as manifest_module

    def bomb(path, name="image"):
        raise Image.DecompressionBombError(f"Image size (900000000 pixels) exceeds limit\nof {path}")

    monkeypatch.setattr(manifest_module, "open_image", bomb)
    rows = [Triplet(1, "x", wav(tmp_path / "a.wav"), picture(tmp_path / "p.png"))]
    with pytest.raises(ManifestError) as info:
        validate_manifest(rows)
    assert info.value.bad[0][0] == 1 and "p.png' is too large to decode safely" in info.value.bad[0][1]
    assert "\n" not in info.value.bad[0][1]


@settings(max_examples=80, deadline=None)
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=2), max_leaves=6))
def test_any_json_caption_is_a_caption_or_one_problem_naming_the_row(value):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "m.jsonl"
        manifest.write_text(json.dumps({"captions": value, "location": "a.wav"}) + "\n")
        rows = read_manifest(manifest)
    if isinstance(value, str):
        assert [t.caption for t in rows] == [value] and not rows.problems
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        assert [t.caption for t in rows] == [value[0]] and not rows.problems  # the first caption
    else:
        assert not rows and len(rows.problems) == 1 and rows.problems[0][0] == 1
        assert "caption" in rows.problems[0][1] and "\n" not in rows.problems[0][1]


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\t\n"),
                                               ("bom.jsonl", b"\xef\xbb\xbf\n"), ("array.json", b"[]"),
                                               ("header.csv", b"captions,location\n")])
def test_an_empty_manifest_is_one_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ManifestError, match=f"manifest: '.*{name}' has no rows"):
        read_manifest(tmp_path / name)
    with pytest.raises(ManifestError, match=f"{name}' has no rows"):
        validate_manifest(tmp_path / name)
    (tmp_path / "folder").mkdir(exist_ok=True)
    with pytest.raises(ManifestError, match="holds no audio files"):
        read_manifest(tmp_path / "folder")
    with pytest.raises(ManifestError, match="no rows to validate"):
        validate_manifest([])


def test_a_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"captions,location\nfine,a.wav\ncaf\xe9,b.wav\n")
    with pytest.raises(ManifestError, match=r"m\.csv' is not UTF-8 text \(line 3: byte 0xe9"):
        read_manifest(path)


def test_metric_manifests_take_the_first_of_a_caption_list(tmp_path):
    manifest = jsonl(tmp_path / "m.jsonl", [{"captions": ["one", "two"], "location": "a.wav"},
                                            {"captions": "three", "location": "b.flac"}])
    rows = read_metric_manifest(manifest)
    assert rows["a"].caption == "one" and rows["b"].caption == "three"
    jsonl(manifest, [{"captions": [], "location": "a.wav"}])
    with pytest.raises(ValueError, match=r"row 1: caption field 'captions' is an empty list"):
        read_metric_manifest(manifest)
    manifest.write_text('{"captions": "bad \\ud800 text", "location": "a.wav"}\n')  # valid JSON, not text
    with pytest.raises(ValueError, match="row 1: caption field 'captions' holds an unpaired surrogate"):
        read_metric_manifest(manifest)


def test_synthetic_rows_read_captions_lists_and_name_bad_lines(tmp_path):
    base = {"location": "a.wav", "img_path": "a.png", "register": "low", "tempo": "slow", "instrument": "flute",
            "mood": "calm"}
    manifest = jsonl(tmp_path / "m.jsonl", [{**base, "captions": ["x", "y"]}, {**base, "captions": "z"}])
    assert [r["captions"] for r in read_synthetic_rows(manifest)] == ["x", "z"]
    assert len(read_synthetic_rows(manifest, limit=1)) == 1
    with pytest.raises(ValueError, match="limit"):
        read_synthetic_rows(manifest, limit=-1)
    jsonl(manifest, [{**base, "captions": "z"}, '{"captions": '])
    with pytest.raises(ValueError, match=r"row 2 of '.*m\.jsonl' is not valid JSON"):
        read_synthetic_rows(manifest)


# ------------------------------------------------------------------------------------------ writers


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_toy_writer_never_overwrites_what_it_did_not_write(tmp_path):
    folder = tmp_path / "toy"
    manifest = write_toy_manifest(folder, n=3, seconds=0.1, image_size=8)
    before = _tree(folder)
    assert write_toy_manifest(folder, n=3, seconds=0.1, image_size=8) == manifest  # the same set again: fine
    assert _tree(folder) == before
    with pytest.raises(OutputExistsError, match=r"already holds a different dataset \(audio/toy_0000.wav"):
        write_toy_manifest(folder, n=3, seconds=0.1, image_size=8, seed=1)
    with pytest.raises(OutputExistsError, match=r"holds files this call does not write \(manifest.jsonl\)"):
        write_toy_manifest(folder, n=3, seconds=0.1, image_size=8, format="csv")
    assert _tree(folder) == before  # nothing was written by the refused calls
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"notes\.txt"):
        write_toy_manifest(folder, n=2, seconds=0.1, image_size=8)
    write_toy_manifest(folder, n=3, seconds=0.1, image_size=8, seed=1, overwrite=True)
    after = _tree(folder)
    assert after["notes.txt"] == b"mine" and after["audio/toy_0000.wav"] != before["audio/toy_0000.wav"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_toy_manifest(tmp_path / "file", n=1)


def test_synthetic_writer_refuses_another_set_and_respects_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_synthetic_manifest(tmp_path / "s", n=2, seconds=0.5, image_size=8)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o640} and "attributes.json" in modes
    assert not [p for p in (tmp_path / "s").rglob("*.tmp")]
    with pytest.raises(OutputExistsError, match="different dataset"):
        write_synthetic_manifest(tmp_path / "s", n=2, seconds=0.5, image_size=8, seed=5)
    assert write_synthetic_manifest(tmp_path / "s", n=2, seconds=0.5, image_size=8) == path


def test_the_skipped_rows_report_never_replaces_someone_elses_file(tmp_path):
    manifest = jsonl(tmp_path / "m.json", [{"captions": "x", "location": "missing.wav"}])
    with pytest.raises(ValueError, match="is an input of this call"):
        validate_manifest(manifest, policy="skip", report=manifest, overwrite=True)
    mine = tmp_path / "mine.json"
    mine.write_text('{"precious": true}')
    with pytest.raises(OutputExistsError, match="mine.json' already exists"):
        validate_manifest(manifest, policy="skip", report=mine, require_image=False)
    assert mine.read_text() == '{"precious": true}'
    with pytest.raises(ValueError, match="expected one of .json"):
        validate_manifest(manifest, policy="skip", report=tmp_path / "r.txt", require_image=False)
    report = tmp_path / "skipped.json"
    for _ in range(2):  # an earlier report is replaced without being told
        with pytest.warns(UserWarning, match="skipping 1 bad rows"):
            validate_manifest(manifest, policy="skip", report=report, require_image=False)
    assert json.loads(report.read_text())["total"] == 1
    with pytest.warns(UserWarning):
        validate_manifest(manifest, policy="skip", report=mine, require_image=False, overwrite=True)
    assert json.loads(mine.read_text())["good"] == 0


# ------------------------------------------------------------------------------------------ evaluate inputs


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_file(tiny_vggish().state_dict(), str(root / "vggish.safetensors"))
    torch.save({"model": tiny_cnn14().state_dict()}, root / "Cnn14_mAP=0.431.pth")
    return {"vggish": root / "vggish.safetensors", "panns": root / "Cnn14_mAP=0.431.pth"}


def _pairs(folder: Path, stems=("a", "b", "c")) -> list[Path]:
    return [wav(folder / f"{s}.wav", seconds=1.0) for s in stems]


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(1, 3), gen_count=st.integers(1, 3), ref_count=st.integers(1, 3),
       ref_inside=st.booleans())
def test_nested_folders_give_disjoint_sets(depth, gen_count, ref_count, ref_inside):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outer = Path(tmp) / "out"
        inner = outer.joinpath(*[f"d{i}" for i in range(depth)])
        for i in range(gen_count if not ref_inside else ref_count):
            (inner / f"in{i}.wav").parent.mkdir(parents=True, exist_ok=True)
            (inner / f"in{i}.wav").write_bytes(b"x")
        for i in range(ref_count if not ref_inside else gen_count):
            (outer / f"out{i}.wav").write_bytes(b"x")
        gen, ref = (outer, inner) if ref_inside else (inner, outer)
        g, r = input_files(gen, ref)
        assert not set(g) & set(r)
        assert len(g) == gen_count and len(r) == ref_count
        assert all(p.name.startswith("out" if ref_inside else "in") for p in g)


def test_evaluate_never_counts_the_reference_as_generated(tmp_path, weights):
    out = tmp_path / "out"
    _pairs(out)
    _pairs(out / "ref")
    result = evaluate(out, out / "ref", metrics="kl", panns=weights["panns"], cache=False, progress=False)
    assert result["files"] == {"generated": 3, "reference": 3} and result["metrics"]["kl"]["pairs"] == 3
    with pytest.raises(ValueError, match="reference: .* is the generated folder itself; --generated and --reference"):
        evaluate(out, out, metrics="kl", panns=weights["panns"], cache=False)
    with pytest.raises(ValueError, match="reference: .* is the generated folder itself"):
        evaluate(out / "ref", out / "." / "ref", metrics="fad", cache=False)
    linked = tmp_path / "linked"
    linked.mkdir()
    os.link(out / "a.wav", linked / "a.wav")
    with pytest.raises(ValueError, match=r"generated, reference: .*a\.wav is in both sets"):
        evaluate(out, linked, metrics="kl", cache=False)
    with pytest.raises(ValueError, match="cache_dir: .* is inside the input folder"):
        evaluate(out, out / "ref", metrics="kl", panns=weights["panns"], cache_dir=out / "cache")
    (tmp_path / "cachefile").write_text("x")
    with pytest.raises(ValueError, match="cache_dir: .* is a file"):
        evaluate(out, out / "ref", metrics="kl", panns=weights["panns"], cache_dir=tmp_path / "cachefile")


def _cli(*args):
    from melfusion.cli import main

    return main(["evaluate", *map(str, args), "--no-progress", "--no-cache"])


def test_evaluate_out_is_never_an_input_or_an_unasked_overwrite(tmp_path, weights, capsys):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    _pairs(gen)
    _pairs(ref)
    common = ("--generated", gen, "--reference", ref, "--metrics", "kl", "--panns", weights["panns"])
    out = tmp_path / "results.json"
    assert _cli(*common, "--out", out) == 0
    first = out.read_text()
    out.write_text('{"mine": 1}')
    assert _cli(*common, "--out", out) == 2
    err = capsys.readouterr().err
    assert "--out: " in err and "already exists" in err and err.count("\n") == 1
    assert out.read_text() == '{"mine": 1}'
    assert _cli(*common, "--out", out, "--overwrite") == 0 and out.read_text() == first
    manifest = jsonl(tmp_path / "m.json", [{"captions": "x", "location": "a.wav"}])
    assert _cli(*common, "--manifest", manifest, "--out", manifest, "--overwrite") == 2
    assert "is an input of this call" in capsys.readouterr().err
    assert _cli(*common, "--out", gen / "a.wav", "--overwrite") == 2
    assert "expected one of .json" in capsys.readouterr().err
    assert _cli("--generated", gen, "--reference", gen, "--metrics", "kl", "--panns", weights["panns"]) == 2
    assert "--generated and --reference must name different folders" in capsys.readouterr().err
    import argparse

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    assert parser.parse_args(["--generated", "g"]).overwrite is False


# ------------------------------------------------------------------------------------------ no NaN in metrics


class NaNEmbedder:
    name, sample_rate, outputs, source = "vggish", SR, ("embedding",), None

    def identity(self):
        return "nan-embedder"

    def embed_outputs(self, waveform):
        return {"embedding": np.full((2, 4), np.nan, dtype=np.float32)}


def test_non_finite_metric_inputs_are_errors_naming_the_file(tmp_path, weights):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    _pairs(gen)
    _pairs(ref)
    with pytest.raises(NonFiniteError, match=r"a\.wav': the vggish embedding holds NaN"):
        evaluate(gen, ref, metrics="fad", vggish=NaNEmbedder(), cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing non-finite was cached
    x = np.zeros(SR, dtype=np.float32)
    x[5] = np.nan
    sf.write(gen / "b.wav", x, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"audio file: '.*b\.wav' has non-finite samples"):
        evaluate(gen, ref, metrics="kl", panns=weights["panns"], cache=False, progress=False)
    with pytest.raises(ValueError, match="not a finite float array"):
        EmbeddingCache(tmp_path / "c").put("ab" * 32, np.array([np.nan], dtype=np.float32))


def test_silent_clips_give_finite_documented_results(tmp_path, weights):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    for stem in ("a", "b", "c"):
        sf.write(gen / f"{stem}.wav", np.zeros(SR * 2, np.float32), SR)
    _pairs(ref)
    with pytest.warns(UserWarning):  # 3 clips for CNN14's 16 dimensions
        result = evaluate(gen, ref, metrics="fad,fd,kl", vggish=weights["vggish"], panns=weights["panns"],
                          cache=False, progress=False)
    values = [m["value"] for m in result["metrics"].values()]
    assert len(values) == 3 and all(np.isfinite(v) for v in values)
    json.loads(json.dumps(result, allow_nan=False))


def test_results_json_never_holds_nan(tmp_path):
    with pytest.raises(NonFiniteError, match=r"result\.metrics\.fad\.value"):
        write_json({"metrics": {"fad": {"value": float("nan")}}}, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    write_json({"metrics": {"fad": {"value": 1.0, "r2": None}}}, tmp_path / "r.json")
    with pytest.raises(OutputExistsError):
        write_json({}, tmp_path / "r.json")


@settings(max_examples=60, deadline=None)
@given(logits=arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 6)),
                     elements=st.floats(-1e6, 1e6, allow_nan=False)),
       shift=st.floats(-1e6, 1e6), variant=st.sampled_from(["softmax", "sigmoid"]), eps=st.sampled_from([0.0, 1e-6]))
def test_kl_of_finite_logits_is_finite(logits, shift, variant, eps):
    other = logits[::-1] + shift
    per_pair = kl_divergence_per_pair(logits, other, variant=variant, eps=eps)
    assert np.isfinite(per_pair).all()
    if variant == "softmax" and eps == 0.0:
        assert (per_pair >= -1e-9 * np.maximum(1, np.abs(per_pair))).all()  # a true KL is never negative


def test_non_finite_settings_are_refused_not_propagated():
    a = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match="eps"):
        kl_divergence(a, a, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        frechet_distance(a, a + 1, eps=float("nan"))
    with pytest.raises(ValueError, match="too large for a covariance"):
        frechet_distance(a * 1e300, a)
    s = np.eye(3)
    with pytest.raises(ValueError, match="image_logit_scale"):
        imsm(s, s, image_logit_scale=float("inf"))
    with pytest.raises(FloatingPointError, match="imsm"):
        imsm(s * 1e300, s * 1e300)


def test_nan_weights_and_nan_waveforms_stop_at_the_door(tmp_path):
    from melfusion.datasets import MelFrontEnd
    from melfusion.metrics import VGGishEmbedder

    state = tiny_vggish().state_dict()
    next(iter(state.values()))[0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteError, match=r"vggish: 1 tensor\(s\) in '.*nan\.safetensors' hold NaN"):
        VGGishEmbedder.from_pretrained(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="waveform: holds NaN"):
        MelFrontEnd()(np.array([0.0, np.nan] * 800, dtype=np.float32))


def test_a_manifest_that_is_a_pipe_is_refused_not_read(tmp_path):
    import os

    from melfusion.datasets import read_manifest

    fifo = tmp_path / "m.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_manifest(fifo)
