"""``melfusion benchmark``: the Table 4-shaped ablation on the synthetic world with the shipped mini model (its
numbers against docs/mini.md), and with real metrics (tiny saved embedders) on the tiny model; evaluate's
protocol record."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import melfusion as mf
from melfusion.cli import main
from melfusion.datasets.synthetic import ATTRIBUTES, write_synthetic_manifest
from melfusion.metrics.evaluate import evaluate, protocol_differences
from test_metrics_embedders import save_tiny_embedders

ROOT = Path(__file__).resolve().parent.parent
ROWS = 32  # the first 32 of the 96 held-out rows docs/mini.md's benchmark table was made from
LABELS = {"text + image": "both", "text only (alpha 0)": "text", "image only (no caption)": "image"}


def docs_table(marker: str = "<!-- benchmark table, first 32 rows -->") -> dict[str, dict[str, float]]:
    """A benchmark table of docs/mini.md (made by ``melfusion benchmark``): accuracy per condition."""
    text = (ROOT / "docs" / "mini.md").read_text()
    section = text.split(marker, 2)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in LABELS:
            rows[cells[0]] = {"n": int(cells[1]),
                              **{a: float(cells[2 + i].split("±")[0]) / 100 for i, a in enumerate(ATTRIBUTES)}}
    return rows


@pytest.fixture(scope="module")
def mini_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    manifest = write_synthetic_manifest(root / "heldout", n=96, seed=1000, start=100_000)
    out = root / "run"
    code = main(["benchmark", "--manifest", str(manifest), "--out", str(out), "--rows", str(ROWS), "--steps", "10",
                 "--batch-size", "16", "--no-progress"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_the_benchmark_prints_the_table_4_shape(mini_benchmark):
    out, results = mini_benchmark
    table = (out / "table.md").read_text()
    assert table.startswith("| condition | n | register % (chance 50) | tempo % (chance 50)")
    for label in LABELS:
        assert f"| {label} | {ROWS} |" in table
        assert len(list((out / re.sub(r"[^a-z0-9]+", "-", label).strip("-")).glob("*.wav"))) == ROWS
    assert results["synthetic"] and set(results["conditions"]) == set(LABELS)


def test_the_benchmark_numbers_match_docs_mini_md(mini_benchmark):
    # docs/mini.md's 32-row table comes from this very command (another thread count may flip a clip or two):
    # each accuracy must lie within one of its stated standard errors (at least one clip)
    _, results = mini_benchmark
    documented = docs_table()
    assert set(documented) == set(LABELS) and all(row["n"] == ROWS for row in documented.values())
    for label, row in documented.items():
        got = results["conditions"][label]["synthetic"]["accuracy"]
        for a in ATTRIBUTES:
            p = row[a]
            se = max((p * (1 - p) / ROWS) ** 0.5, 1 / ROWS)
            assert abs(got[a] - p) <= se + 0.005, (label, a, got[a], p)
    # and the full 96-row table documents the same command on the whole held-out set
    full = docs_table("<!-- benchmark table -->")
    assert set(full) == set(LABELS) and all(row["n"] == 96 for row in full.values())
    for a in ("register", "tempo"):
        assert full["text + image"][a] > full["text only (alpha 0)"][a] + 0.1


def test_the_image_is_what_carries_register_and_tempo(mini_benchmark):
    _, results = mini_benchmark
    acc = {label: results["conditions"][label]["synthetic"]["accuracy"] for label in LABELS}
    for a in ("register", "tempo"):
        assert acc["text + image"][a] > acc["text only (alpha 0)"][a]
        assert acc["image only (no caption)"][a] > acc["text only (alpha 0)"][a]
    assert acc["text + image"]["instrument"] > 0.9 and acc["image only (no caption)"]["instrument"] < 0.6


def test_a_second_benchmark_run_reuses_every_file(mini_benchmark, capsys):
    out, results = mini_benchmark
    manifest = results["manifest"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    assert main(["benchmark", "--manifest", manifest, "--out", str(out), "--rows", str(ROWS), "--steps", "10",
                 "--batch-size", "16", "--no-progress", "--conditions", "text"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")} == before
    again = json.loads((out / "results.json").read_text())
    assert again["conditions"]["text only (alpha 0)"]["written"] == 0


# -- real metrics (tiny embedders) on the tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinybench")
    embedders = save_tiny_embedders(root)
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "audio").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(data / "images" / f"p{i}.png")
        sf.write(data / "audio" / f"clip{i}.wav", 0.3 * np.sin(np.arange(32000) * 0.05 * (i + 1)), 16000)
        rows.append({"captions": f"a tune number {i}", "location": f"audio/clip{i}.wav", "img_path": f"images/p{i}.png"})
    manifest = data / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    folder = mf.MelFusion.from_config("tiny").save_pretrained(root / "tiny")
    return {"root": root, "manifest": manifest, "reference": data / "audio", "model": folder, **embedders}


def test_the_benchmark_fills_real_metrics_with_embedder_weights(tiny_world, tmp_path, capsys):
    w = tiny_world
    out = tmp_path / "run"
    code = main(["benchmark", "--model", str(w["model"]), "--manifest", str(w["manifest"]), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--reference", str(w["reference"]),
                 "--metrics", "fad,fd,kl,imsm,clap", "--vggish", str(w["vggish"]), "--panns", str(w["panns"]),
                 "--clap", w["clap"], "--clip", w["clip"], "--no-progress", "--extra", f"same again={w['model']}"])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "| FAD | FD | KL | CLAP | IMSM |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == {"text + image", "text only (alpha 0)", "image only (no caption)",
                                          "same again"}
    for entry in results["conditions"].values():
        m = entry["evaluate"]["metrics"]
        assert all(np.isfinite(m[k]["value"]) for k in ("fad", "fd", "kl", "imsm", "clap"))
        assert m["kl"]["pairs"] == 4
    # the extra model is the same model: the same files as text + image, so the same numbers
    a, b = results["conditions"]["text + image"], results["conditions"]["same again"]
    assert a["evaluate"]["metrics"]["fad"]["value"] == pytest.approx(b["evaluate"]["metrics"]["fad"]["value"])


def test_evaluate_writes_a_protocol_record_that_tells_results_apart(tiny_world, tmp_path, capsys):
    w = tiny_world
    gen = tmp_path / "gen"
    assert main(["generate", "--manifest", str(w["manifest"]), "--out-dir", str(gen), "--model", str(w["model"]),
                 "--steps", "2", "--no-progress"]) == 0
    common = ["evaluate", "--generated", str(gen), "--reference", str(w["reference"]), "--metrics", "fad,kl,clap",
              "--vggish", str(w["vggish"]), "--panns", str(w["panns"]), "--clap", w["clap"], "--no-cache",
              "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a.json")]) == 0  # no --manifest: captions from the records
    protocol = json.loads((tmp_path / "a.protocol.json").read_text())
    assert protocol["embedders"]["vggish"]["weight_files"] == {
        "vggish.safetensors": __import__("hashlib").sha256(w["vggish"].read_bytes()).hexdigest()}
    assert protocol["audio"]["resampler"] and protocol["audio"]["crop_or_pad"].startswith("none")
    assert protocol["metrics"]["kl"]["variant"] == "softmax" and protocol["metrics"]["kl"]["direction"]
    assert protocol["files"] == {"generated": 4, "reference": 4}
    assert protocol["generation"]["settings"]["num_inference_steps"] == 2
    capsys.readouterr()
    assert main(common + ["--kl-variant", "sigmoid", "--out", str(tmp_path / "b.json"), "--compare-protocol",
                          str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert "protocol: 1 differences" in printed or "protocol: 2 differences" in printed
    assert "variant: 'softmax' -> 'sigmoid'" in printed
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert protocol_differences(a, a) == []
    assert any("kl_variant" in d for d in protocol_differences(a, b))


def test_evaluate_refuses_two_generated_sets_made_differently(tiny_world, tmp_path):
    w = tiny_world
    for name, steps in (("x", "2"), ("y", "3")):
        assert main(["generate", "--manifest", str(w["manifest"]), "--out-dir", str(tmp_path / name), "--model",
                     str(w["model"]), "--steps", steps, "--no-progress"]) == 0
    with pytest.raises(ValueError, match="other settings"):
        evaluate(tmp_path / "x", tmp_path / "y", metrics="fad", vggish=w["vggish"], cache=False, progress=False)
    result = evaluate(tmp_path / "x", tmp_path / "y", metrics="fad", vggish=w["vggish"], cache=False,
                      progress=False, allow_mixed_settings=True)
    assert np.isfinite(result["metrics"]["fad"]["value"])
