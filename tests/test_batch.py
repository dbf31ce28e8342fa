"""Batch generation from a manifest (melfusion.batch, ``melfusion generate --manifest``): bad rows, resuming,
SIGKILL, several processes, provenance, and evaluate reading it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import melfusion as mf
from melfusion.batch import (
    GENERATIONS,
    RECORD_FIELDS,
    generate_manifest,
    plan_rows,
    read_generations,
    row_seed,
)
from melfusion.cli import main
from melfusion.datasets.manifest import Triplet

STEPS = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = mf.MelFusion.from_config("tiny")
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return mf.MelFusion.from_pretrained(tiny_folder)


def write_set(folder: Path, rows: int = 12, bad: bool = True) -> Path:
    """``rows`` rows: pictures of several sizes, references for most; with ``bad``, row 4's image is missing
    and row 9's is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    (folder / "audio").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        size = [(40, 90), (64, 64), (160, 120)][i % 3]
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "images" / f"p{i}.png")
        sf.write(folder / "audio" / f"clip{i}.wav", np.zeros(1600, np.float32), 16000)
        row = {"captions": [f"a calm tune number {i}"], "img_path": f"images/p{i}.png"}
        if i % 4 != 3:
            row["location"] = f"audio/clip{i}.wav"
        lines.append(row)
    if bad:
        lines[3]["img_path"] = "images/nowhere.png"
        (folder / "images" / "broken.png").write_bytes(b"not a png at all")
        lines[8]["img_path"] = "images/broken.png"
    manifest = folder / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return manifest


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.wav"))}


def stats(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], timeout: int = 600, launch: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launch or [sys.executable, "-m", "melfusion.cli"]) + args
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


# -- bad rows, skipping, provenance ---------------------------------------------------------------------


def test_twelve_rows_two_bad_give_ten_files_and_a_report(tiny, tmp_path):
    manifest = write_set(tmp_path / "data")
    out = tmp_path / "gen"
    report = generate_manifest(tiny, manifest, out, batch_size=4, num_inference_steps=STEPS, progress=False)
    files = sorted(p.name for p in out.glob("*.wav"))
    assert len(files) == 10
    assert [row for row, _ in report.bad] == [4, 9]
    assert "nowhere.png" in report.bad[0][1] and "broken.png" in report.bad[1][1]
    # ids: the reference's stem, else the manifest row number
    assert "clip0.wav" in files and "row-8.wav" in files and "row-4.wav" not in files
    records = read_generations(out)
    assert [r["file"] for r in records] == [f for f in
                                            ["clip0.wav", "clip1.wav", "clip2.wav", "clip4.wav", "clip5.wav",
                                             "clip6.wav", "row-8.wav", "clip9.wav", "clip10.wav", "row-12.wav"]]
    for r in records:
        assert set(RECORD_FIELDS) <= set(r)
        data = (out / r["file"]).read_bytes()
        import hashlib

        assert r["audio_sha256"] == hashlib.sha256(data).hexdigest()
        assert r["image_sha256"] == hashlib.sha256(Path(r["image"]).read_bytes()).hexdigest()
        assert r["settings"]["num_inference_steps"] == STEPS and r["settings"]["batch_size"] == 4
        assert r["model"]["weights_sha256"] and len(r["model"]["weights_sha256"]) == 64
        assert r["melfusion_version"] == mf.__version__
        assert r["seed"] == row_seed(0, r["row_id"], 0)
    assert records[0]["reference"].endswith("audio/clip0.wav") and records[6]["reference"] is None
    assert records[0]["caption"] == "a calm tune number 0"


def test_cli_reports_bad_rows_by_number_and_file_with_status_2(tiny_folder, tmp_path):
    manifest = write_set(tmp_path / "data")
    out = tmp_path / "gen"
    proc = cli(["generate", "--manifest", str(manifest), "--out-dir", str(out), "--model", str(tiny_folder),
                "--steps", str(STEPS), "--batch-size", "4", "--no-progress"])
    assert proc.returncode == 2, proc.stderr
    assert "row 4:" in proc.stderr and "nowhere.png" in proc.stderr
    assert "row 9:" in proc.stderr and "broken.png" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(list(out.glob("*.wav"))) == 10


def test_a_second_run_does_no_work(tiny, tmp_path):
    manifest = write_set(tmp_path / "data")
    out = tmp_path / "gen"
    generate_manifest(tiny, manifest, out, batch_size=4, num_inference_steps=STEPS, progress=False)
    before = stats(out)
    calls = []
    original = tiny.generate
    tiny.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = generate_manifest(tiny, manifest, out, batch_size=4, num_inference_steps=STEPS, progress=False)
    finally:
        del tiny.generate
    assert calls == [] and again.written == [] and len(again.skipped) == 10
    assert stats(out) == before  # not one file rewritten, generations.jsonl included


def test_batch_size_does_not_change_which_files_or_seeds(tiny, tmp_path):
    manifest = write_set(tmp_path / "data", rows=5, bad=False)
    a = generate_manifest(tiny, manifest, tmp_path / "a", batch_size=1, num_inference_steps=STEPS, progress=False)
    b = generate_manifest(tiny, manifest, tmp_path / "b", batch_size=5, num_inference_steps=STEPS, progress=False)
    assert sorted(p.name for p in a.files) == sorted(p.name for p in b.files)
    ra, rb = read_generations(tmp_path / "a"), read_generations(tmp_path / "b")
    assert [r["seed"] for r in ra] == [r["seed"] for r in rb]
    # the same clip, up to the round-off of another batch shape
    for x, y in zip(ra, rb, strict=True):
        wa, _ = sf.read(tmp_path / "a" / x["file"])
        wb, _ = sf.read(tmp_path / "b" / y["file"])
        assert np.corrcoef(wa, wb)[0, 1] > 0.9


def test_a_row_does_not_depend_on_its_batch(tiny, tmp_path):
    # rows are generated in fixed batches: a subset (limit) gives the same bytes for the rows it shares
    manifest = write_set(tmp_path / "data", rows=6, bad=False)
    generate_manifest(tiny, manifest, tmp_path / "all", batch_size=3, num_inference_steps=STEPS, progress=False)
    generate_manifest(tiny, manifest, tmp_path / "some", batch_size=3, num_inference_steps=STEPS, limit=3,
                      progress=False)
    some = snapshot(tmp_path / "some")
    assert len(some) == 3 and all(snapshot(tmp_path / "all")[k] == v for k, v in some.items())


def test_other_settings_or_foreign_files_are_refused_before_any_work(tiny, tmp_path):
    manifest = write_set(tmp_path / "data", rows=3, bad=False)
    out = tmp_path / "gen"
    generate_manifest(tiny, manifest, out, num_inference_steps=STEPS, progress=False)
    before = stats(out)
    with pytest.raises(FileExistsError, match="other settings.*num_inference_steps 3 -> 4"):
        generate_manifest(tiny, manifest, out, num_inference_steps=STEPS + 1, progress=False)
    assert stats(out) == before
    foreign = tmp_path / "gen2"
    foreign.mkdir()
    (foreign / "clip0.wav").write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="no provenance record"):
        generate_manifest(tiny, manifest, foreign, num_inference_steps=STEPS, progress=False)
    assert (foreign / "clip0.wav").read_bytes() == b"the user's own file"
    # with overwrite: replaced
    generate_manifest(tiny, manifest, out, num_inference_steps=STEPS + 1, progress=False, overwrite=True)
    assert {r["settings"]["num_inference_steps"] for r in read_generations(out)} == {STEPS + 1}


def test_an_output_that_is_an_input_is_refused(tiny, tmp_path):
    data = tmp_path / "data"
    manifest = write_set(data, rows=2, bad=False)
    # the reference clips live in data/audio and are named clip0.wav: generating into that folder would hit them
    with pytest.raises(ValueError, match="is an input"):
        generate_manifest(tiny, manifest, data / "audio", num_inference_steps=STEPS, progress=False)
    assert sf.read(data / "audio" / "clip0.wav")[0].shape == (1600,)


def test_samples_and_manifests_in_other_formats(tiny, tmp_path):
    data = tmp_path / "data"
    write_set(data, rows=2, bad=False)
    csv = data / "test.csv"
    csv.write_text("captions,img_path\n\"a calm tune\",images/p0.png\n\"a lively tune\",images/p1.png\n")
    out = tmp_path / "gen"
    report = generate_manifest(tiny, csv, out, num_samples=2, num_inference_steps=STEPS, progress=False)
    assert sorted(p.name for p in out.glob("*.wav")) == ["row-2_0.wav", "row-2_1.wav", "row-3_0.wav", "row-3_1.wav"]
    assert report.ok
    seeds = {r["file"]: r["seed"] for r in read_generations(out)}
    assert len(set(seeds.values())) == 4
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (50, 30), (200, 10, 10)).save(folder / "red.png")
    (folder / "red.txt").write_text("a calm flute melody")
    generate_manifest(tiny, folder, tmp_path / "gen3", num_inference_steps=STEPS, progress=False)
    assert [p.name for p in (tmp_path / "gen3").glob("*.wav")] == ["row-1.wav"]


def test_cli_flags_that_need_a_manifest_or_a_single_clip(tmp_path, capsys):
    assert main(["generate", "--out-dir", str(tmp_path), "--image", "x.png", "--text", "t", "--out",
                 str(tmp_path / "a.wav")]) == 2
    assert "--out-dir: only with --manifest" in capsys.readouterr().err
    assert main(["generate", "--manifest", str(tmp_path / "none.jsonl"), "--out-dir", str(tmp_path / "g")]) == 2
    assert "--manifest: no such file" in capsys.readouterr().err
    assert main(["generate", "--manifest", str(tmp_path), "--image", "x.png"]) == 2
    assert "--image: not used with --manifest" in capsys.readouterr().err
    assert main(["generate", "--text", "t", "--out", str(tmp_path / "a.wav")]) == 2
    assert "--image: required" in capsys.readouterr().err


# -- killed and restarted; several processes -------------------------------------------------------------


ARGS = ["--steps", str(STEPS), "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    """An uninterrupted run over 8 rows, in this process (one thread, as the subprocesses below)."""
    root = tmp_path_factory.mktemp("whole")
    manifest = write_set(root / "data", rows=8, bad=False)
    out = root / "gen"
    generate_manifest(tiny, manifest, out, batch_size=2, num_inference_steps=STEPS, progress=False)
    return manifest, out


def _args(manifest: Path, folder: Path) -> list[str]:
    return ["generate", "--manifest", str(manifest), "--model", str(folder), *ARGS]


# killed later on: in make test-slow (the in-process test below interrupts every write point)
@pytest.mark.parametrize("after", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_a_run_killed_with_sigkill_and_restarted_gives_the_same_bytes(tiny_folder, whole, tmp_path, after):
    manifest, reference = whole
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "melfusion.cli", *_args(manifest, tiny_folder), "--out-dir",
                             str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("*.wav"))) < after and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(out.glob("*.wav"))
    assert after <= len(partial) < 8, "the run finished before it could be killed"
    again = cli([*_args(manifest, tiny_folder), "--out-dir", str(out)])
    assert again.returncode == 0, again.stderr
    assert snapshot(out) == snapshot(reference)
    assert _records(out) == _records(reference)
    leftovers = [p.name for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []


def _records(folder: Path) -> list[dict]:
    """The provenance records, less the model's name (a path in the CLI, None in Python)."""
    return [{**r, "model": {**r["model"], "name_or_path": None}} for r in read_generations(folder)]


def test_a_run_interrupted_at_every_write_completes_to_the_same_bytes(tiny, whole, tmp_path, monkeypatch):
    import melfusion.batch as batch

    manifest, reference = whole
    real = batch.write_atomic
    rows = 4  # the first two batches of the 8 rows (fixed batches: the same bytes as in the whole run)
    expected = {k: v for k, v in snapshot(reference).items() if k in {f"clip{i}.wav" for i in range(3)} | {"row-4.wav"}}
    expected_records = [r for r in _records(reference) if r["file"] in expected]
    writes = rows * 2 + 1  # a record and a file per row, then generations.jsonl
    for stop in range(writes):
        out = tmp_path / f"stop{stop}"
        count = {"n": 0}

        def failing(path, data, _stop=stop, _count=count, **kw):
            if _count["n"] == _stop:
                raise KeyboardInterrupt
            _count["n"] += 1
            return real(path, data, **kw)

        monkeypatch.setattr(batch, "write_atomic", failing)
        with pytest.raises(KeyboardInterrupt):
            generate_manifest(tiny, manifest, out, batch_size=2, num_inference_steps=STEPS, progress=False,
                              limit=rows)
        monkeypatch.setattr(batch, "write_atomic", real)
        generate_manifest(tiny, manifest, out, batch_size=2, num_inference_steps=STEPS, progress=False, limit=rows)
        assert snapshot(out) == expected, f"interrupted before write {stop}"
        assert _records(out) == expected_records


def test_two_processes_under_accelerate_launch_give_the_same_files_as_one(tiny_folder, whole, tmp_path):
    manifest, reference = whole
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "melfusion.cli"]
    two = cli([*_args(manifest, tiny_folder), "--out-dir", str(tmp_path / "two")], launch=launch)
    assert two.returncode == 0, two.stderr[-3000:]
    assert snapshot(tmp_path / "two") == snapshot(reference) and len(snapshot(reference)) == 8
    assert _records(tmp_path / "two") == _records(reference)


def test_each_process_takes_whole_batches_exactly_once(tiny, tmp_path):
    manifest = write_set(tmp_path / "data", rows=7, bad=False)
    out = tmp_path / "gen"
    reports = [generate_manifest(tiny, manifest, out, batch_size=2, num_inference_steps=STEPS, progress=False,
                                 process_index=i, num_processes=3) for i in range(3)]
    written = [p.name for r in reports for p in r.written]
    assert sorted(written) == sorted(set(written)) and len(written) == 7
    assert [len(r.written) for r in reports] == [3, 2, 2]  # batches {0, 3}, {1}, {2} of sizes 2, 2, 2, 1


# -- row ids and seeds -----------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from(["a", "a b", "x/../y", "..", "", "é", "clip"]),
                          st.sampled_from(["p", "q", None]), st.booleans()), min_size=1, max_size=12))
def test_row_ids_are_unique_and_safe_file_names(items):
    triplets = [Triplet(i + 1, "c", (Path("/d") / f"{stem}.wav") if has_audio and stem else None,
                        Path(f"/i/{image}.png") if image else None)
                for i, (stem, image, has_audio) in enumerate(items)]
    ids = [r.row_id for r in plan_rows(triplets)]
    assert len(set(ids)) == len(ids)
    assert all(i and "/" not in i and not i.startswith(".") and i == Path(i).name for i in ids)
    assert ids == [r.row_id for r in plan_rows(triplets)]  # stable


@given(st.integers(-(2**63), 2**63), st.text(max_size=20), st.integers(0, 100))
def test_row_seeds_are_valid_and_depend_on_every_input(seed, rid, sample):
    s = row_seed(seed, rid, sample)
    assert 0 <= s < 2**63
    assert torch.Generator().manual_seed(s) is not None
    assert s != row_seed(seed, rid, sample + 1) and s != row_seed(seed, rid + "x", sample)


# -- evaluate reads the provenance ----------------------------------------------------------------------


def test_evaluate_pairs_by_generations_jsonl_and_refuses_mixed_settings(tiny, tmp_path):
    from melfusion.metrics.evaluate import generation_records, pair_by_records

    manifest = write_set(tmp_path / "data", rows=3, bad=False)
    out = tmp_path / "gen"
    generate_manifest(tiny, manifest, out, num_samples=2, num_inference_steps=STEPS, progress=False)
    files = sorted(out.glob("*.wav"))
    records = generation_records(out, files)
    refs = sorted((tmp_path / "data" / "audio").glob("*.wav"))
    pairs = pair_by_records(files, refs, records)
    # clip0_0 and clip0_1 both pair with clip0.wav; the row without a reference is named
    assert [(g.name, r.name) for _, g, r in pairs[:2]] == [("clip0_0.wav", "clip0.wav"), ("clip0_1.wav", "clip0.wav")]
    # mixed settings in one folder
    lines = (out / GENERATIONS).read_text().splitlines()
    changed = json.loads(lines[0])
    changed["settings"]["guidance_scale"] = 9.0
    (out / GENERATIONS).write_text("\n".join([json.dumps(changed)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="different settings"):
        generation_records(out, files)
    assert generation_records(out, files, allow_mixed_settings=True)
    # a file with no record
    (out / GENERATIONS).write_text("\n".join(lines) + "\n")
    sf.write(out / "stray.wav", np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="stray.wav is not in"):
        generation_records(out, files + [out / "stray.wav"])
