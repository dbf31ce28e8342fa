"""benchmarks/ablation.py's report: the markdown tables and the bar chart from a results dict."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

from melfusion.datasets.synthetic import ATTRIBUTES

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("ablation_benchmark", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _score(register, tempo, instrument=1.0, mood=1.0, fd=10.0, vs=None):
    score = {"n": 96, "accuracy": dict(zip(ATTRIBUTES, (register, tempo, instrument, mood), strict=True)), "fd": fd}
    if vs is not None:
        score["accuracy_vs_image"] = dict(zip(ATTRIBUTES, vs, strict=True))
    return score


def test_report_writes_both_tables_the_controls_and_a_chart(tmp_path):
    ablation = _load()
    results = {
        "decoder-per-layer": {"both": _score(0.73, 0.72, fd=80.0), "image_only": _score(0.78, 0.69, 0.35, 0.49, 210.7),
                              "alpha_0": _score(0.48, 0.47), "swapped": _score(0.43, 0.53, vs=(0.74, 0.68, 1, 1))},
        "decoder-shared": {"both": _score(0.61, 0.58)},
        "encoder-per-layer": {"both": _score(0.55, 0.52)},
        "text-only": {"both": _score(0.5, 0.49, fd=60.0)},
    }
    text = ablation.report(results, 1500, tmp_path)
    assert (tmp_path / "results.md").read_text() == text
    assert "96 clips), 1500 music training steps" in text
    assert "| text only (no synapse) | 50 | 49 | 100 | 100 | 60.00 |" in text
    assert "| image only (captions dropped) | 78 | 69 | 35 | 49 | 210.70 |" in text
    assert "| decoder taps, one shared alpha | 61 | 58 | 100 | 100 | 10.00 |" in text
    assert "| encoder taps, one alpha per layer | 55 | 52 |" in text
    assert "| alpha forced to 0 | 48 | 47 |" in text
    assert "74 % against the pictures' own register, tempo 68 %" in text
    with Image.open(tmp_path / "results.png") as im:
        assert im.format == "PNG" and im.width > 600
    assert not list(tmp_path.glob("*.tmp"))


def test_report_with_only_some_variants(tmp_path):
    ablation = _load()
    text = ablation.report({"decoder-shared": {"both": _score(0.6, 0.6)}}, 300, tmp_path)
    assert "Table 2" in text and "Table 4" not in text and "Controls" not in text
    assert (tmp_path / "results.png").is_file()
