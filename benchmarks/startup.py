"""Start-up time: ``import melfusion``, ``melfusion --help``/``--version`` and make demo's command, as whole
processes, for the working tree and (optionally) an earlier commit, alternating, median of several runs.

    .venv/bin/python benchmarks/startup.py --runs 5 --before 10cfa52

``--before REF`` checks REF out into a temporary git worktree and runs the same commands with that
checkout's ``src/`` as the ``melfusion`` package (through a ``PYTHONPATH`` link), in the same virtual
environment. Also prints which of torch, diffusers and transformers each command imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers")
PROBE = ("import sys, runpy; sys.argv = {argv!r}; "
         "exec({code!r}); "
         "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")

COMMANDS = {
    "import melfusion": ("import melfusion", ["python"]),
    "melfusion --help": ("from melfusion.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
                         ["melfusion", "--help"]),
    "melfusion --version": ("from melfusion.cli import main\nmain(['--version'])", ["melfusion", "--version"]),
    "make demo (generate)": (
        "from melfusion.cli import main\nmain(['generate', '--image', 'examples/images/blue-bright.png', "
        "'--text', 'a calm flute melody', '--out', {out!r}, '--overwrite'])", ["melfusion", "generate"]),
}


def run_once(code: str, argv: list[str], pythonpath: str | None) -> tuple[float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = PROBE.format(argv=argv, code=code, heavy=HEAVY)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return elapsed, heavy or "none"


def checkout(ref: str, folder: Path) -> str:
    """A worktree of ``ref`` under ``folder`` and a PYTHONPATH whose ``melfusion`` is its ``src/``."""
    tree = folder / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True,
                   capture_output=True)
    path = folder / "path"
    path.mkdir()
    (path / "melfusion").symlink_to(tree / "src")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", default=None, help="a git ref to compare against (e.g. HEAD~1)")
    parser.add_argument("--skip-demo", action="store_true", help="leave out make demo's command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"after": None}
        if args.before:
            trees = {"before": checkout(args.before, Path(tmp)), "after": None}
        times: dict[tuple[str, str], list[float]] = {}
        heavy: dict[tuple[str, str], str] = {}
        for name, (code, argv) in COMMANDS.items():
            if args.skip_demo and name.startswith("make demo"):
                continue
            for _ in range(args.runs):
                for tree, pythonpath in trees.items():  # alternate, so load drifts hit both alike
                    out = str(Path(tmp) / f"demo-{tree}.wav")
                    seconds, mods = run_once(code.format(out=out), argv, pythonpath)
                    times.setdefault((name, tree), []).append(seconds)
                    heavy[(name, tree)] = mods
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(Path(tmp) / "tree")], cwd=ROOT,
                           check=False, capture_output=True)
    print(f"| command | {' | '.join(f'{t} (median of {args.runs} s)' for t in trees)} | heavy modules imported |")
    print("|---|" + "---|" * len(trees) + "---|")
    for name in COMMANDS:
        if (name, "after") not in times:
            continue
        cells = " | ".join(f"{statistics.median(times[(name, t)]):.2f}" for t in trees)
        mods = " / ".join(heavy[(name, t)] for t in trees)
        print(f"| {name} | {cells} | {mods} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
