"""The command line: inspect on the meta device, generate's error handling."""

import subprocess
import sys

from melfusion.cli import main


def test_inspect_paper(capsys):
    assert main(["inspect", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "865,910,724" in out and "865,933,768" in out
    rows = [line for line in out.splitlines() if line.startswith("up_blocks.")]
    assert len(rows) == 9
    assert rows[0].split()[:6] == ["up_blocks.1.attentions.0", "up_blocks.1.attentions.0", "20", "64", "576", "s"]
    assert rows[-1].split()[2:5] == ["5", "64", "9216"]
    assert "9 layer pairs; parameters added by the synapse: 9" in out


def test_generate_missing_or_corrupt_image_exits_2(tmp_path, capsys):
    assert main(["generate", "--image", str(tmp_path / "none.png"), "--text", "x", "--out", "o.wav"]) == 2
    err = capsys.readouterr().err
    assert "--image: no such file" in err and "Traceback" not in err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    assert main(["generate", "--image", str(bad), "--text", "x", "--out", "o.wav"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_generate_writes_wav_and_png(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "song.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "melfusion.cli", "generate", "--image", str(root / "examples/images/sunset.png"),
         "--text", "calm piano", "--out", str(out), "--steps", "2", "--preset", "tiny"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000 and out.with_suffix(".png").stat().st_size > 100
    assert "random" in proc.stderr  # a preset builds from its config: the note says so
