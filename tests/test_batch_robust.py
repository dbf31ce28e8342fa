"""Adversarial input to ``melfusion generate --manifest`` (melfusion.batch), evaluate's reading of
generations.jsonl and its protocol record, and ``melfusion benchmark``: one regression test per class of
violation found (a traceback or internal error, a user's file overwritten, work done and then lost to a late
error, or a silent wrong result)."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import melfusion as mf
from melfusion.batch import (
    GENERATIONS,
    MAX_ID,
    collect_generations,
    generate_manifest,
    plan_rows,
    read_generations,
)
from melfusion.cli import main
from melfusion.datasets.manifest import Triplet
from melfusion.metrics.evaluate import _read_results, generation_records, protocol_differences

STEPS = 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    return mf.MelFusion.from_config("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return mf.MelFusion.from_pretrained(tiny_folder)


@pytest.fixture
def no_work(tiny):
    """Fails the test if the model is asked to generate anything (the refusal must come before any work)."""
    def refuse(*args, **kwargs):
        raise AssertionError("generate was called: the input should have been refused before any work")

    tiny.generate = refuse
    yield tiny
    del tiny.generate


def write_set(folder: Path, rows: int = 2, seconds: float = 0.1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    (folder / "audio").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / "images" / f"p{i}.png")
        sf.write(folder / "audio" / f"clip{i}.wav", np.zeros(int(16000 * seconds), np.float32), 16000)
        lines.append({"captions": f"a calm tune {i}", "img_path": f"images/p{i}.png", "location": f"audio/clip{i}.wav"})
    manifest = folder / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return manifest


def run(model, manifest, out, **kw):
    return generate_manifest(model, manifest, out, num_inference_steps=STEPS, progress=False, **kw)


def err_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


def gen_cli(tiny_folder, manifest, out, *extra) -> list[str]:
    return ["generate", "--manifest", str(manifest), "--out-dir", str(out), "--model", str(tiny_folder), "--steps",
            str(STEPS), "--no-progress", *extra]


# -- argument values ------------------------------------------------------------------------------------


def test_cli_batch_size_0_num_samples_0_and_an_empty_manifest_are_refused(tmp_path, capsys):
    # --batch-size 0 was taken as 1, --num-samples 0 / -1 made no file at all with exit 0, and --manifest ''
    # read the current folder as a folder manifest
    manifest = write_set(tmp_path / "data")
    for flags, expected in ((["--batch-size", "0"], "--batch-size: expected a positive int, got 0"),
                            (["--num-samples", "0"], "--num-samples: expected a positive int, got 0"),
                            (["--num-samples", "-1"], "--num-samples: expected a positive int, got -1")):
        assert main(gen_cli("mini", manifest, tmp_path / "gen", *flags)) == 2
        assert expected in err_of(capsys)
    assert main(["generate", "--manifest", "", "--out-dir", str(tmp_path / "gen")]) == 2
    assert "--manifest: expected a file or folder, got an empty string" in err_of(capsys)
    assert not (tmp_path / "gen").exists()


def test_python_arguments_of_the_wrong_kind_name_themselves(no_work, tmp_path):
    manifest = write_set(tmp_path / "data")
    for kw, match in ((dict(num_samples=0), "num_samples: expected a positive int"),
                      (dict(num_samples=True), "num_samples: expected a positive int"),
                      (dict(seed=1.5), "seed: expected an int, got 1.5"),  # was silently truncated to 1
                      (dict(seed="x"), "seed: expected an int"),
                      (dict(alpha="x"), "alpha: expected a finite number"),  # was a TypeError (internal error)
                      (dict(alpha=float("nan")), "alpha: expected a finite number"),
                      (dict(alpha=2.0), r"alpha: ConvexMixer weights lie in \[0, 1\]"),  # was "value: ..."
                      (dict(out_dir=""), "out_dir: expected a path")):
        kw = {"out_dir": tmp_path / "gen", **kw}
        with pytest.raises(ValueError, match=match):
            generate_manifest(no_work, manifest, num_inference_steps=STEPS, progress=False, **kw)
    assert not (tmp_path / "gen").exists()


def test_a_number_given_as_int_or_float_is_one_setting(tiny, tmp_path):
    # alpha=0 and alpha=0.0 (image_guidance_scale 2 / 2.0) were recorded differently, so the second run refused
    # the first run's files as "made with other settings" while listing no difference
    manifest = write_set(tmp_path / "data", rows=1)
    out = tmp_path / "gen"
    run(tiny, manifest, out, alpha=0, image_guidance_scale=2)
    again = run(tiny, manifest, out, alpha=0.0, image_guidance_scale=2.0)
    assert again.written == [] and len(again.skipped) == 1


# -- paths: links, odd names, inputs that would be outputs ------------------------------------------------


def test_a_looping_link_is_a_bad_row_not_an_internal_error(tiny_folder, tmp_path, capsys):
    # Path.resolve() raised RuntimeError("Symlink loop") on the looping image: exit 1 "internal error"
    manifest = write_set(tmp_path / "data")
    os.symlink("loop.png", tmp_path / "data" / "images" / "loop.png")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["img_path"] = "images/loop.png"
    rows.append({"captions": "a looping reference", "img_path": "images/p0.png", "location": "audio/rloop.wav"})
    os.symlink("rloop.wav", tmp_path / "data" / "audio" / "rloop.wav")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gen"
    assert main(gen_cli(tiny_folder, manifest, out)) == 2
    err = err_of(capsys)
    assert "row 2:" in err and "loop.png" in err and "looping" in err
    assert sorted(p.name for p in out.glob("*.wav")) == ["clip0.wav", "rloop.wav"]


def test_row_ids_never_collide(tmp_path):
    # an id that an earlier row took in its suffixed form ("row-2__row-3") was given twice, so two rows wrote
    # one file; ids differing only in letter case collide on macOS and Windows
    t = [Triplet(1, "c", Path("/a/row-2__row-3.wav"), None), Triplet(2, "c", None, None),
         Triplet(3, "c", Path("/a/row-2.wav"), None), Triplet(4, "c", Path("/a/Clip.wav"), None),
         Triplet(5, "c", Path("/b/clip.wav"), None)]
    ids = [r.row_id for r in plan_rows(t)]
    assert len({i.casefold() for i in ids}) == len(ids), ids
    assert ids[:2] == ["row-2__row-3", "row-2"] and ids[3] == "Clip"  # ids that were unique are unchanged


def test_very_long_names_fit_the_filesystem_and_stay_distinct(tiny, tmp_path):
    # a 200-character clip shared by two rows with a 200-character image gave a 250-character id: the record's
    # temporary file name went over 255 bytes, an OSError after the batch had been generated
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (24, 24), (10, 200, 10)).save(data / "images" / ("G" * 200 + ".png"))
    rows = [{"captions": "a tune", "img_path": "images/" + "G" * 200 + ".png", "location": "a/" + "L" * 200 + ".wav"}
            ] * 2 + [{"captions": "a tune", "img_path": "images/" + "G" * 200 + ".png",
                      "location": "a/" + "L" * 130 + suffix + ".wav"} for suffix in ("x", "y")]
    manifest = data / "long.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run(tiny, manifest, tmp_path / "gen", num_samples=2)
    names = sorted(p.name for p in (tmp_path / "gen").glob("*.wav"))
    assert report.ok and len(names) == 8 and len(set(names)) == 8
    assert all(len(Path(n).stem) <= MAX_ID + len("_1") for n in names)
    assert len(read_generations(tmp_path / "gen")) == 8


def test_file_names_do_not_depend_on_limit(tiny, tmp_path):
    # ids were planned over the first `limit` rows only: with --limit 1 the row sharing clip0 with row 3 was
    # clip0.wav, without it clip0__p0.wav, so the resumed run regenerated it and left clip0.wav behind
    data = tmp_path / "data"
    write_set(data)
    manifest = data / "shared.csv"
    manifest.write_text("captions,img_path,location\nx,images/p0.png,audio/clip0.wav\n"
                        "y,images/p1.png,audio/clip0.wav\n")
    out = tmp_path / "gen"
    first = run(tiny, manifest, out, limit=1)
    whole = run(tiny, manifest, out)
    assert [p.name for p in first.written] == ["clip0__p0.wav"] and [p.name for p in whole.skipped] == ["clip0__p0.wav"]
    assert sorted(p.name for p in out.glob("*.wav")) == ["clip0__p0.wav", "clip0__p1.wav"]


def test_a_manifest_named_generations_jsonl_in_the_out_dir_is_never_written_over(no_work, tmp_path):
    # the manifest data/generations.jsonl with --out-dir data was rewritten with the provenance records
    data = tmp_path / "data"
    write_set(data)
    manifest = data / GENERATIONS
    (data / "test.jsonl").rename(manifest)
    before = manifest.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is an input of this run"):
            run(no_work, manifest, data, overwrite=overwrite)
    assert manifest.read_bytes() == before


def test_a_generations_jsonl_this_command_did_not_write_is_kept(tiny, tmp_path):
    # a user's generations.jsonl in the out-dir was silently replaced at the end of the run
    manifest = write_set(tmp_path / "data")
    out = tmp_path / "gen"
    out.mkdir()
    (out / GENERATIONS).write_text("my own notes\n")
    with pytest.raises(FileExistsError, match="not a provenance file this command wrote"):
        run(tiny, manifest, out)
    assert (out / GENERATIONS).read_text() == "my own notes\n" and not list(out.glob("*.wav"))
    run(tiny, manifest, out, overwrite=True)  # replaced only when asked
    assert len(read_generations(out)) == 2


def test_outputs_that_cannot_be_written_are_refused_before_any_work(no_work, tmp_path):
    # each of these failed with an OSError only when its file was written: after the batch (or, for
    # generations.jsonl, the whole set) had been generated
    manifest = write_set(tmp_path / "data")
    (tmp_path / "a_file").write_text("x")
    cases = {"under a file": (tmp_path / "a_file" / "gen", None),
             "generations.jsonl a folder": (tmp_path / "g1", GENERATIONS),
             ".melfusion a file": (tmp_path / "g2", ".melfusion"),
             "a record a folder": (tmp_path / "g3", ".melfusion/records/clip0.json"),
             "an audio file a folder": (tmp_path / "g4", "clip1.wav")}
    for what, (out, blocker) in cases.items():
        if blocker == ".melfusion":
            out.mkdir()
            (out / blocker).write_text("x")
        elif blocker is not None:
            (out / blocker).mkdir(parents=True)
        for overwrite in (False, True):
            with pytest.raises((ValueError, FileExistsError), match="out_dir: ") as caught:
                run(no_work, manifest, out, overwrite=overwrite)
            assert "Errno" not in str(caught.value), what
    assert (tmp_path / "a_file").read_text() == "x" and (tmp_path / "g2" / ".melfusion").read_text() == "x"


def test_cli_names_the_out_dir_flag_in_a_refusal(tiny_folder, tmp_path, capsys):
    manifest = write_set(tmp_path / "data")
    out = tmp_path / "gen"
    out.mkdir()
    (out / "clip0.wav").write_bytes(b"the user's own file")
    assert main(gen_cli(tiny_folder, manifest, out)) == 2
    assert "error: --out-dir: " in err_of(capsys)  # was "out_dir: ", the Python name
    assert (out / "clip0.wav").read_bytes() == b"the user's own file"


# -- resuming: hand-edited records, a manifest edited between runs ----------------------------------------


def test_hand_edited_records_are_refused_not_an_internal_error(tiny, tmp_path):
    # a record whose "settings" is a list, or "model" a string, raised TypeError / AttributeError
    manifest = write_set(tmp_path / "data", rows=1)
    out = tmp_path / "gen"
    run(tiny, manifest, out)
    record_path = out / ".melfusion" / "records" / "clip0.json"
    record = json.loads(record_path.read_text())
    for edit in ({"settings": [1, 2]}, {"model": "x"}, {"settings": None}):
        record_path.write_text(json.dumps({**record, **edit}))
        with pytest.raises(FileExistsError, match="edited by hand"):
            run(tiny, manifest, out)


def test_a_row_whose_caption_or_image_changed_is_not_kept_as_complete(tiny, tmp_path):
    # the file of a row whose caption or image had been edited since was skipped as "complete": the set then
    # held audio of the old caption, recorded under the new manifest (and a row inserted above a row without
    # a reference shifts every row-N id onto another row's caption)
    data = tmp_path / "data"
    manifest = write_set(data)
    out = tmp_path / "gen"
    run(tiny, manifest, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.wav")}
    manifest.write_text(manifest.read_text().replace("a calm tune 0", "a lively tune"))
    with pytest.raises(FileExistsError, match="another version of manifest row 1 .its caption"):
        run(tiny, manifest, out)
    manifest.write_text(manifest.read_text().replace("a lively tune", "a calm tune 0"))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(data / "images" / "p1.png")
    with pytest.raises(FileExistsError, match="another version of manifest row 2 .its image"):
        run(tiny, manifest, out)
    assert {p.name: p.read_bytes() for p in out.glob("*.wav")} == before
    report = run(tiny, manifest, out, overwrite=True)
    assert [p.name for p in report.written] == ["clip1.wav"]
    new_image = hashlib.sha256((data / "images" / "p1.png").read_bytes()).hexdigest()
    assert read_generations(out)[1]["image_sha256"] == new_image


def test_generations_jsonl_lists_only_files_of_the_folder(tiny, tmp_path):
    # a record naming a file outside the folder ("../x.wav") was listed in generations.jsonl
    manifest = write_set(tmp_path / "data", rows=1)
    out = tmp_path / "gen"
    run(tiny, manifest, out)
    (tmp_path / "x.wav").write_bytes(b"elsewhere")
    stray = json.loads((out / ".melfusion" / "records" / "clip0.json").read_text())
    (out / ".melfusion" / "records" / "x.json").write_text(json.dumps({**stray, "file": "../x.wav"}))
    (out / f".{GENERATIONS}.abcd1234.tmp").write_text("a killed rewrite")
    collect_generations(out)
    assert [r["file"] for r in read_generations(out)] == ["clip0.wav"]
    assert not list(out.glob(".*.tmp"))


# -- generations.jsonl as evaluate reads it ---------------------------------------------------------------


def test_a_corrupt_or_hand_edited_generations_jsonl_is_one_clear_error(tiny, tmp_path):
    manifest = write_set(tmp_path / "data")
    out = tmp_path / "gen"
    run(tiny, manifest, out)
    files = sorted(out.glob("*.wav"))
    path = out / GENERATIONS
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    cases = [(b"\xff\xfe\n", "not UTF-8 text"),  # was the codec's message, naming no file
             (b"[" * 100_000 + b"\n", "line 1: not valid JSON"),  # was a RecursionError (internal error)
             (b"[1]\n", "line 1: not a JSON object")]
    for key, value in (("file", 5), ("file", None), ("file", "../data/audio/clip0.wav"), ("reference", 5),
                       ("image", [1]), ("caption", 7), ("settings", [1]), ("model", "m"), ("sample_rate", "x")):
        cases.append(((json.dumps({**first, key: value}) + "\n" + "\n".join(lines[1:]) + "\n").encode(),
                      f"line 1: '{key}' is"))  # were TypeError / AttributeError (internal errors)
    cases.append(((path.read_text() + lines[0] + "\n").encode(), "'clip0.wav' is listed twice"))
    original = path.read_bytes()
    for data, match in cases:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=match) as caught:
            generation_records(out, files)
        assert "generations.jsonl" in str(caught.value)
    path.write_bytes(original)
    assert len(generation_records(out, files)) == 2


def test_a_caption_with_a_unicode_line_separator_reads_back(tiny, tmp_path):
    # generations.jsonl keeps U+2028 unescaped (ensure_ascii=False); reading it with str.splitlines() split
    # the record in two: "not valid JSON"
    data = tmp_path / "data"
    write_set(data, rows=1)
    manifest = data / "u.jsonl"
    manifest.write_text(json.dumps({"captions": "first line\u2028second line \u97f3\u697d \U0001f3b5",
                                    "img_path": "images/p0.png"}) + "\n")
    run(tiny, manifest, tmp_path / "gen")
    (record,) = read_generations(tmp_path / "gen")
    assert record["caption"] == "first line\u2028second line \u97f3\u697d \U0001f3b5"


# -- --compare-protocol ---------------------------------------------------------------------------------


def test_compare_protocol_refuses_a_pipe_and_a_protocol_that_is_not_an_object(tmp_path):
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="--compare-protocol: .* not a regular file"):  # the read blocked forever
        _read_results(fifo)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"protocol": 5}))
    with pytest.raises(ValueError, match="'protocol' that is not a JSON object"):  # was a TypeError
        _read_results(odd)
    assert protocol_differences({"protocol": 5}, {"protocol": {"a": 1}}) == ["protocol: 5 -> {'a': 1}"]
    assert protocol_differences({"protocol": [1]}, {"protocol": [1]}) == []


# -- melfusion benchmark ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from melfusion.datasets.synthetic import write_synthetic_manifest

    return write_synthetic_manifest(tmp_path_factory.mktemp("syn") / "heldout", n=3, seed=1, start=0)


def bench(tiny_folder, manifest, out, *extra) -> list[str]:
    return ["benchmark", "--model", str(tiny_folder), "--manifest", str(manifest), "--out", str(out), "--steps",
            str(STEPS), "--conditions", "both", "--batch-size", "2", "--no-progress", *extra]


def test_benchmark_refusals_name_its_flags_and_come_before_any_work(tiny_folder, synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    for flags, expected in ((["--rows", "0"], "--rows: expected a positive int"),  # was "limit: ..."
                            (["--batch-size", "0"], "--batch-size: expected a positive int"),  # "batch_size"
                            (["--metrics", "fad"], "--reference: the metrics fad need"),  # after generating
                            (["--metrics", "fd", "--reference", str(tmp_path)], "--panns: the metric fd needs"),
                            (["--extra", "x=/nowhere"], "--extra: x=/nowhere: "),  # was "model: ..."
                            (["--conditions", "both,both"], "--conditions: each condition once")):
        args = bench(tiny_folder, synthetic, out, *flags)
        if "--conditions" in flags:
            i = args.index("--conditions")
            del args[i:i + 2]
        assert main(args) == 2
        assert expected in err_of(capsys)
        assert not (out / "text-image").exists()


def test_benchmark_reruns_are_scored_over_their_own_rows_only(tiny_folder, synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(bench(tiny_folder, synthetic, out, "--rows", "1")) == 0  # one row: FD (mel) n/a, was a crash
    results = json.loads((out / "results.json").read_text())
    assert results["conditions"]["text + image"]["synthetic"]["fd_mel"] is None
    assert "| n/a |" in (out / "table.md").read_text()
    assert main(bench(tiny_folder, synthetic, out, "--rows", "3")) == 0
    capsys.readouterr()
    # --rows 2 after --rows 3: the folder's third file was scored with the two (n = 3 printed)
    assert main(bench(tiny_folder, synthetic, out, "--rows", "2")) == 2
    assert "--out: " in (err := err_of(capsys)) and "earlier run over other rows" in err
    # other settings: the advice was generate's (--out-dir, --overwrite), which this command does not have
    assert main(bench(tiny_folder, synthetic, out, "--rows", "3", "--steps", "3")) == 2
    err = err_of(capsys)
    assert "--out: the condition folder" in err and "num_inference_steps 2 -> 3" in err and "--out-dir" not in err


def test_benchmark_with_bad_rows_says_so_and_exits_2(tiny_folder, synthetic, tmp_path, capsys):
    # the table was printed over the good rows only, with exit 0 and no word of the skipped rows
    rows = [json.loads(line) for line in synthetic.read_text().splitlines()]
    rows[1]["img_path"] = "nowhere.png"
    manifest = synthetic.parent / "bad.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(bench(tiny_folder, manifest, out)) == 2
    err = err_of(capsys)
    assert "1 bad rows" in err and "row 2:" in err and "nowhere.png" in err
    assert json.loads((out / "results.json").read_text())["conditions"]["text + image"]["synthetic"]["n"] == 2
