"""Command-line manners: --version, help with defaults and examples, where outputs went, no silent overwrite,
--quiet (and the progress bars from Python), the exit codes the README documents. (Start-up without torch:
test_startup.py.)"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLUE = ROOT / "examples" / "images" / "blue-bright.png"
MELFUSION = Path(sys.executable).with_name("melfusion")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def run(*args, cwd=None, env=ENV, timeout=300):
    return subprocess.run([str(MELFUSION), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_version():
    import melfusion

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"melfusion {melfusion.__version__}"


COMMANDS = ["generate", "train", "evaluate", "benchmark", "inspect", "data", "app", "data check", "data split"]


def _options(help_text: str) -> list[tuple[str, str]]:
    """(flag, its help text) for each option of an argparse help page."""
    body = help_text.split("options:", 1)[1].split("\n\n", 1)[0]
    entries, current = [], None
    for line in body.splitlines():
        m = re.match(r"^  (-\S+(?:, --\S+)?)(.*)$", line)
        if m:
            current = [m.group(1).split(", ")[-1], m.group(2)]
            entries.append(current)
        elif current is not None:
            current[1] += " " + line.strip()
    return [(flag, " ".join(text.split())) for flag, text in entries]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_examples(command):
    out = run(*command.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert "--quiet" in out.stdout
    assert "examples:" in out.stdout or "exit status:" in out.stdout
    parser_defaults = _parser_defaults(command)
    for flag, text in _options(out.stdout):
        default = parser_defaults.get(flag)
        if default not in (None, False, True) and flag != "--help":
            # every option with a value of its own shows it
            assert "default" in text, f"{command} {flag}: help does not show its default {default!r}: {text!r}"


def _parser_defaults(command: str) -> dict[str, object]:
    from melfusion.cli import build_parser

    parser = build_parser()
    names = command.split()
    sub = next(a for a in parser._actions if a.dest == "command").choices[names[0]]
    sub.format_help()  # populates the lazy subcommands
    for name in names[1:]:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return {a.option_strings[-1]: a.default for a in sub._actions if a.option_strings}


def test_generate_help_names_the_models_own_settings():
    text = " ".join(run("generate", "--help").stdout.split())
    for flag, value in (("--steps", "25"), ("--guidance", "3.0"), ("--image-guidance", "5.0"), ("--seconds", "2.56")):
        assert re.search(re.escape(flag) + r" \S+ .{0,60}?\(default: the model's own; the shipped mini's is "
                         + re.escape(value), text), flag
    assert "--seed SEED random seed: the same seed gives the same music (default: 0)" in text


def test_generate_prints_its_outputs_and_refuses_to_overwrite(tmp_path):
    first = run("generate", "--image", BLUE, "--text", "a calm flute melody", "--out", "song.wav", "--steps", 3,
                cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "melfusion" in first.stderr  # the sampling progress bar (which --quiet removes: the test below)
    assert re.search(r"^wrote song\.wav \(2\.56 s at 16000 Hz\)$", first.stdout, re.M)
    assert re.search(r"^wrote song\.png ", first.stdout, re.M)
    before = (tmp_path / "song.wav").read_bytes()
    again = run("generate", "--image", BLUE, "--text", "a lively trumpet tune", "--out", "song.wav", "--steps", 3,
                cwd=tmp_path)
    assert again.returncode == 2
    assert "--out: 'song.wav' already exists" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (tmp_path / "song.wav").read_bytes() == before  # untouched
    forced = run("generate", "--image", BLUE, "--text", "a lively trumpet tune", "--out", "song.wav", "--steps", 3,
                 "--overwrite", "--quiet", cwd=tmp_path)
    assert forced.returncode == 0
    assert forced.stdout == "" and forced.stderr == ""  # --quiet: no bar, no "wrote" lines
    assert (tmp_path / "song.wav").read_bytes() != before


def test_quiet_still_reports_failures(tmp_path):
    (tmp_path / "q.wav").write_bytes(b"mine")
    bad = run("generate", "--image", BLUE, "--text", "a calm flute melody", "--out", "q.wav", "--quiet",
              cwd=tmp_path)
    assert bad.returncode == 2 and "already exists" in bad.stderr  # errors still speak
    # a failing command's report (data check's bad rows go to stdout) reaches stderr under --quiet
    (tmp_path / "m.jsonl").write_text('{"captions": "x", "location": "missing.wav", "img_path": "missing.png"}\n')
    check = run("data", "check", "m.jsonl", "-q", cwd=tmp_path)
    assert check.returncode == 2 and check.stdout == "" and "missing" in check.stderr


def test_progress_bars_from_python():
    code = """
import melfusion, transformers, diffusers, huggingface_hub.utils as hub
from melfusion import MelFusion
m = MelFusion.from_pretrained("mini")
import sys; print("===", file=sys.stderr, flush=True)
melfusion.disable_progress_bars()
assert not melfusion.progress_bars_enabled()
assert not transformers.utils.logging.is_progress_bar_enabled()
assert not diffusers.utils.logging.is_progress_bar_enabled()
assert hub.are_progress_bars_disabled()
m.generate(image=IMAGE, text="a calm flute melody", num_inference_steps=3)
import sys; print("---", file=sys.stderr, flush=True)
melfusion.enable_progress_bars()
assert transformers.utils.logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
m.generate(image=IMAGE, text="a calm flute melody", num_inference_steps=3)
""".replace("IMAGE", repr(str(BLUE)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    quiet, loud = out.stderr.split("===\n", 1)[1].split("---\n")
    assert quiet.strip() == "" and "melfusion: " in loud and "/3 [" in loud


def test_readme_documents_the_exit_codes():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Exit status of every `melfusion` command:", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^\| (\d+) \|", section, re.M)
    assert codes == ["0", "1", "2", "130"]
    from melfusion.cli import main

    for code in codes:  # the CLI's own docstring says the same
        assert code in main.__doc__


def test_exit_codes_as_documented(tmp_path):
    assert run("--version").returncode == 0
    assert run("generate", "--image", tmp_path / "missing.png", "--text", "x", "--out", tmp_path / "o.wav"
               ).returncode == 2
    assert run("generate", "--steps", "many").returncode == 2  # argparse's usage errors too
    # 1: an internal error (a bug) is one line that says so; simulated by a part that raises a plain RuntimeError
    code = ("import sys, melfusion.cli as c\n"
            "def boom(args): raise RuntimeError('simulated bug')\n"
            "c._inspect = boom\n"
            "sys.exit(c.main(['inspect']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 1 and "internal error: RuntimeError: simulated bug (this is a bug" in out.stderr
    assert "Traceback" not in out.stderr
