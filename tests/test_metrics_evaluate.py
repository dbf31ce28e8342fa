"""``evaluate`` and the ``melfusion evaluate`` hooks on folders of audio, with tiny saved embedders."""

import argparse
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from melfusion.metrics import (
    ClapEmbedder,
    ClipEmbedder,
    EmbeddingCache,
    NearSingularWarning,
    PANNsEmbedder,
    VGGishEmbedder,
    add_evaluate_arguments,
    clap_score,
    evaluate,
    frechet_distance,
    imsm,
    kl_divergence,
    run_evaluate,
)
from melfusion.metrics.audio import load_audio
from melfusion.metrics.similarity import cosine_similarity
from test_metrics_embedders import (
    save_tiny_embedders,
    tone,
)

STEMS = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    embedders = save_tiny_embedders(root)
    gen, ref, images = root / "gen", root / "ref", root / "images"
    for d in (gen, ref, images):
        d.mkdir()
    rates = (22_050, 16_000, 32_000, 48_000)
    rng = np.random.default_rng(0)
    rows = []
    for i, (stem, sr) in enumerate(zip(STEMS, rates, strict=True)):
        x = tone(3.1, sr, freq=220.0 * (i + 1), seed=i)
        stereo = np.stack([x, 0.5 * x], axis=1)  # stereo: averaged to mono
        sf.write(gen / f"{stem}.{'flac' if i == 1 else 'wav'}", stereo if i == 0 else x, sr)
        sf.write(ref / f"{stem}.wav", tone(3.1, 44_100, freq=300.0 * (i + 1), seed=10 + i), 44_100)
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(images / f"{stem}.png")
        rows.append({"captions": f"a song number {stem}", "location": f"audio/{stem}.wav",
                     "img_path": f"images/{stem}.png"})
    manifest = root / "manifest.json"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"root": root, "gen": gen, "ref": ref, "manifest": manifest, **embedders}


def _run(world, tmp_path, metrics, **kwargs):
    options = {"vggish": world["vggish"], "panns": world["panns"], "clap": world["clap"], "clip": world["clip"],
               "cache_dir": tmp_path / "cache", "progress": False, **kwargs}
    return evaluate(world["gen"], world["ref"], metrics=metrics, manifest=world["manifest"], **options)


def _files(folder):
    return sorted(p for p in folder.iterdir())


def test_evaluate_all_metrics_match_direct_computation(world, tmp_path):
    with pytest.warns(UserWarning, match="samples for 16 dimensions"):  # 4 clips for CNN14's 16-d tiny embedding
        result = _run(world, tmp_path, "fad,fd,kl,imsm,clap")
    m = result["metrics"]
    assert set(m) == {"fad", "fd", "kl", "imsm", "clap"}
    gen, ref = _files(world["gen"]), _files(world["ref"])

    vggish = VGGishEmbedder.from_pretrained(world["vggish"])
    g = np.concatenate([vggish.embed(load_audio(p, 16_000)) for p in gen])
    r = np.concatenate([vggish.embed(load_audio(p, 16_000)) for p in ref])
    assert g.shape == (12, 8)  # 3.1 s -> three 0.96 s frames per file
    assert m["fad"]["value"] == pytest.approx(frechet_distance(g, r), rel=1e-6)
    assert (m["fad"]["n_generated"], m["fad"]["n_reference"]) == (12, 12)

    panns = PANNsEmbedder.from_pretrained(world["panns"])
    g_out = [panns.embed_outputs(load_audio(p, 32_000)) for p in gen]
    r_out = [panns.embed_outputs(load_audio(p, 32_000)) for p in ref]
    with pytest.warns(UserWarning):
        fd = frechet_distance(np.concatenate([o["embedding"] for o in g_out]),
                              np.concatenate([o["embedding"] for o in r_out]))
    assert m["fd"]["value"] == pytest.approx(fd, rel=1e-6)
    kl = kl_divergence(np.concatenate([o["logits"] for o in g_out]), np.concatenate([o["logits"] for o in r_out]))
    assert m["kl"]["value"] == pytest.approx(kl, rel=1e-6)
    assert m["kl"]["direction"] == "KL(reference || generated)" and m["kl"]["pairs"] == 4

    clap = ClapEmbedder.from_pretrained(world["clap"])
    clip = ClipEmbedder.from_pretrained(world["clip"])
    texts = [f"a song number {s}" for s in STEMS]
    audio = np.concatenate([clap.embed(load_audio(p, 48_000)) for p in gen])
    assert m["clap"]["value"] == pytest.approx(clap_score(audio, clap.embed_text(texts)), rel=1e-5)
    images = clip.embed_images([world["root"] / "images" / f"{s}.png" for s in STEMS])
    expected = imsm(cosine_similarity(images, clip.embed_text(texts)), cosine_similarity(audio, clap.embed_text(texts)))
    assert m["imsm"]["value"] == pytest.approx(expected, rel=1e-5)
    assert result["embedders"]["vggish"]["identity"] == vggish.identity()
    assert any("16 dimensions" in w for w in result["warnings"])
    json.dumps(result)  # JSON-ready


def test_cache_is_reused_and_survives_corruption(world, tmp_path):
    first = _run(world, tmp_path, "fad")
    assert first["cache"]["hits"] == 0 and first["cache"]["misses"] == 8
    second = _run(world, tmp_path, "fad")
    assert second["cache"] == {"dir": str(tmp_path / "cache"), "hits": 8, "misses": 0}
    assert second["metrics"]["fad"]["value"] == first["metrics"]["fad"]["value"]
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 8 and not list((tmp_path / "cache").rglob("*.tmp"))
    entries[0].write_bytes(b"not a numpy file")
    third = _run(world, tmp_path, "fad")
    assert third["cache"]["misses"] == 1
    assert third["metrics"]["fad"]["value"] == pytest.approx(first["metrics"]["fad"]["value"], rel=1e-9)
    # other settings of the same weights do not share entries
    relu = VGGishEmbedder.from_pretrained(world["vggish"], final_relu=True)
    with pytest.warns(NearSingularWarning):  # the tiny model's ReLU zeroes whole columns
        fourth = _run(world, tmp_path, "fad", vggish=relu)
    assert fourth["cache"]["hits"] == 0


def test_cache_roundtrip(tmp_path):
    cache = EmbeddingCache(tmp_path)
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(cache.get("ab" * 32), np.arange(6).reshape(2, 3))


def test_fad_inf_and_released_imsm_and_sigmoid_kl(world, tmp_path):
    result = _run(world, tmp_path, ["fad", "kl", "imsm"], fad_inf=True, fad_inf_sizes=[6, 8, 10, 12],
                  imsm_mode="released", kl_variant="sigmoid")
    m = result["metrics"]
    assert m["fad_inf"]["sizes"] == [6, 8, 10, 12] and np.isfinite(m["fad_inf"]["value"])
    assert m["imsm"]["mode"] == "released" and 0 < m["imsm"]["value"] < 1
    assert m["imsm"]["image_logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)  # the tiny models' initial scale
    assert m["kl"]["variant"] == "sigmoid"


def _parser():
    parser = argparse.ArgumentParser(prog="melfusion evaluate")
    add_evaluate_arguments(parser)
    return parser


def test_run_evaluate_prints_table_and_writes_json(world, tmp_path, capsys):
    out = tmp_path / "results" / "r.json"
    args = _parser().parse_args([
        "--generated", str(world["gen"]), "--reference", str(world["ref"]), "--metrics", "fad,kl,clap",
        "--manifest", str(world["manifest"]), "--vggish", str(world["vggish"]), "--panns", str(world["panns"]),
        "--clap", world["clap"], "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress",
    ])
    assert args.clip == "openai/clip-vit-base-patch32" and args.kl_variant == "softmax"
    assert run_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "metric" in printed and "kl (softmax)" in printed and "12/12 frames" in printed
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"fad", "kl", "clap"}
    assert data["settings"]["kl_direction"] == "KL(reference || generated)"
    assert not list(out.parent.glob("*.tmp"))


def test_clear_errors(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no audio here")
    with pytest.raises(ValueError, match=f"generated: no audio files .* in '{empty}'"):
        evaluate(empty, world["ref"], metrics="fd", panns=world["panns"], cache=False, progress=False)
    with pytest.raises(ValueError, match="reference: the metrics fad need a reference directory"):
        evaluate(world["gen"], None, metrics="fad", cache=False)
    with pytest.raises(ValueError, match="metrics: expected a comma-separated subset .*unknown: fid"):
        evaluate(world["gen"], world["ref"], metrics="fad,fid")
    with pytest.raises(ValueError, match="vggish: FAD needs VGGish weights"):
        evaluate(world["gen"], world["ref"], metrics="fad", cache=False)
    with pytest.raises(ValueError, match="manifest: the metrics imsm need a manifest"):
        evaluate(world["gen"], None, metrics="imsm", cache=False)

    odd = tmp_path / "odd"
    odd.mkdir()
    for stem in ("a", "b", "x"):
        sf.write(odd / f"{stem}.wav", tone(1.0, 16_000), 16_000)
    with pytest.raises(ValueError, match=r"no generated file of the same stem: c, d \(2\).*reference file.*: x \(1\)"):
        evaluate(odd, world["ref"], metrics="kl", panns=world["panns"], cache=False)
    with pytest.raises(ValueError, match="manifest: no row .* generated files: x.wav"):
        evaluate(odd, None, metrics="clap", manifest=world["manifest"], clap=world["clap"], cache=False)

    broken = tmp_path / "broken"
    broken.mkdir()
    sf.write(broken / "a.wav", tone(1.0, 16_000), 16_000)
    (broken / "b.wav").write_bytes(b"RIFF garbage, not audio")
    with pytest.raises(ValueError, match="audio file: cannot decode .*b.wav"):
        evaluate(broken, world["ref"], metrics="fad", vggish=world["vggish"], cache=False, progress=False)
    with pytest.raises(OSError, match="vggish: no such file or folder"):
        evaluate(world["gen"], world["ref"], metrics="fad", vggish=str(tmp_path / "missing.pth"), cache=False)


def test_melfusion_evaluate_command(world, tmp_path, capsys):
    from melfusion.cli import main

    out = tmp_path / "r.json"
    code = main(["evaluate", "--generated", str(world["gen"]), "--reference", str(world["ref"]), "--metrics", "fd,kl",
                 "--panns", str(world["panns"]), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"])
    assert code == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"fd", "kl"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--generated", str(empty), "--reference", str(world["ref"]), "--metrics", "fd",
                 "--panns", str(world["panns"]), "--no-progress"]) == 2
    assert "no audio files" in capsys.readouterr().err
