"""Docs that run: every command and Python block of README.md and docs/*.md runs, exactly as written.

What runs. The fenced code blocks of each file, in file order:

- ```bash, ```sh, ```shell: run with ``bash -euo pipefail -c BLOCK``;
- ```console: the lines starting with ``$ `` (and their ``\\`` continuation lines) run as one bash block; the
  other lines are what they must print (as for an ``output`` block, below);
- ```python, ```py: run in one Python session per file, like a notebook: the blocks of a file share one
  interpreter (the venv's python), each block sees the variables of the ones before it.

Any other fence (```text, ```yaml, ```json, ```toml, a plain ```) is shown, not run, unless a marker says
otherwise (``file``, ``output``).

Where. Each file runs in a fresh temporary folder that looks like the repository root to its blocks: a copy
of ``examples/``, ``benchmarks/`` and ``scripts/`` and a symlink ``.venv`` to this checkout's virtual
environment, so ``.venv/bin/melfusion`` works as the docs say. The environment has HF_HUB_OFFLINE=1,
OMP_NUM_THREADS=1 and no virtual environment on PATH (a bare ``python`` or ``melfusion`` is not this
project's). Each block has a timeout (120 s unless its marker says otherwise). A failure names the file and
the block's line number (that of its opening fence); Python tracebacks point at the Markdown lines
themselves, and a failing shell command is named by its line.

A file's Python session is a child forked from a warm interpreter that has imported torch, diffusers,
transformers and melfusion's pipeline and metrics once per pytest process (10-20 s each time otherwise): its
own namespace, working folder, environment and process group, only the module cache is warm.
``DOCS_TEST_FRESH=1`` starts a new ``.venv/bin/python`` per file instead.

Markers. An HTML comment on the line just before an opening fence (Markdown shows nothing of it):

    <!-- docs-test: skip (REASON) -->       never run: needs published weights, a GPU, the network, hours of
                                            CPU, a file the docs cannot make, or starts a server
    <!-- docs-test: slow (REASON) -->       run only by `make test-slow` (``pytest -m slow``): REASON says how
                                            long it takes. A block that needs what a slow block made is slow too
    <!-- docs-test: file PATH -->           not run: the block's text is written to PATH (relative to the work
                                            folder) when the run reaches it; if PATH is a file of the
                                            repository, the block must equal it
    <!-- docs-test: output -->              the block is what the run block just before it prints (a shell
                                            block's stdout; a Python block's stdout and stderr): its lines must
                                            appear in that output, in order and consecutively (trailing spaces
                                            ignored); a line starting with ``...`` stands for any number of
                                            lines. Not checked when that block did not run (skip, slow)
    <!-- docs-test: timeout=SECONDS -->     run, with another timeout (also after slow: ``slow (about 3
                                            minutes) timeout=600``; a slow block's default is 1800 s)

Skipped and slow blocks are listed, with file, line and reason, in pytest's short summary (``-ra``, on by
default in pyproject.toml, so plain ``make test`` prints them): each is a skipped test
``test_docs_block_not_run[FILE:LINE]``. With ``make test-slow`` the files that hold slow blocks run again,
whole, in ``test_docs_run_with_slow_blocks``.

Run the docs alone:

    .venv/bin/python -m pytest -q tests/test_docs.py -m "not slow"            # as make test runs them
    .venv/bin/python -m pytest -q tests/test_docs.py -m slow                  # the files with slow blocks
    .venv/bin/python -m pytest -q tests/test_docs.py -m "not slow" -k mini -s # one file, each block's time
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
# what the docs' blocks may use from the repository, copied into each file's work folder
COPIED = ("examples", "benchmarks", "scripts")
DEFAULT_TIMEOUT = 120.0
SLOW_TIMEOUT = 1800.0

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell"}
CONSOLE_LANGS = {"console"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_TIMEOUT = re.compile(r"(?:^|\s)timeout=(?P<seconds>\d+(?:\.\d+)?)\s*$")


class DocsMarkupError(ValueError):
    """A fence or a docs-test marker the extractor cannot read (named by file and line)."""


@dataclass(frozen=True)
class Block:
    doc: str          # the file, relative to the repository root
    line: int         # the line of the opening fence (1-based)
    lang: str         # the fence's language, lower case ("" for a plain fence)
    code: str         # the block's text, its fence's indentation removed
    action: str       # "run", "skip", "slow", "file", "output" or "show" (a fence that is not run)
    reason: str = ""  # skip / slow: why
    path: str = ""    # file: where the text is written
    timeout: float | None = None

    @property
    def kind(self) -> str:
        if self.lang in PYTHON_LANGS:
            return "python"
        if self.lang in SHELL_LANGS:
            return "shell"
        if self.lang in CONSOLE_LANGS:
            return "console"
        return "text"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first_code_line(self) -> int:
        return self.line + 1


def _parse_marker(body: str, where: str) -> dict:
    """``skip (why)``, ``slow (why) timeout=600``, ``file PATH``, ``output`` or ``timeout=300``."""
    timeout = None
    m = _TIMEOUT.search(body)
    if m:
        timeout = float(m["seconds"])
        body = body[: m.start()].strip()
    if not body:
        if timeout is None:
            raise DocsMarkupError(f"{where}: empty docs-test marker")
        return {"action": "run", "timeout": timeout}
    word, _, rest = body.partition(" ")
    rest = rest.strip()
    if word in ("skip", "slow"):
        if not (rest.startswith("(") and rest.endswith(")") and rest[1:-1].strip()):
            raise DocsMarkupError(f"{where}: expected '{word} (REASON)', got {body!r}")
        return {"action": word, "reason": rest[1:-1].strip(), "timeout": timeout}
    if word == "file":
        if not rest or " " in rest or rest.startswith("/") or ".." in Path(rest).parts:
            raise DocsMarkupError(f"{where}: expected 'file RELATIVE/PATH', got {body!r}")
        return {"action": "file", "path": rest}
    if word == "output" and not rest:
        return {"action": "output"}
    raise DocsMarkupError(f"{where}: unknown docs-test marker {body!r} (skip (why), slow (why), file PATH, "
                          f"output, timeout=SECONDS)")


def extract_blocks(text: str, doc: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order, with the docs-test marker of the line before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: tuple[int, dict] | None = None   # a marker waiting for its fence on the next line
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            if pending:
                raise DocsMarkupError(f"{doc}:{pending[0]}: docs-test marker not followed by a fence")
            pending = (i + 1, _parse_marker(marker["body"], f"{doc}:{i + 1}"))
            i += 1
            continue
        if line.lstrip().startswith("<!--") and "docs-test" in line:
            raise DocsMarkupError(f"{doc}:{i + 1}: a docs-test marker must be a whole line: <!-- docs-test: ... -->")
        fence = _FENCE.match(line)
        if not fence:
            if pending:
                raise DocsMarkupError(f"{doc}:{pending[0]}: docs-test marker not followed by a fence on the "
                                      f"next line")
            i += 1
            continue
        if pending and pending[0] != i:
            raise DocsMarkupError(f"{doc}:{pending[0]}: docs-test marker not followed by a fence on the next line")
        indent, mark = fence["indent"], fence["fence"]
        if mark[0] == "`" and "`" in fence["info"]:
            raise DocsMarkupError(f"{doc}:{i + 1}: a backtick fence's info string holds a backtick")
        info = fence["info"].strip()
        lang = info.split()[0].lower() if info else ""
        start = i
        body: list[str] = []
        i += 1
        close = re.compile(r"^[ \t]*" + re.escape(mark[0]) + "{" + str(len(mark)) + r",}[ \t]*$")
        while i < len(lines) and not close.match(lines[i]):
            text_line = lines[i]
            if text_line.startswith(indent):
                text_line = text_line[len(indent):]
            else:  # a line indented less than its fence: remove what indentation it has
                text_line = text_line.lstrip(" \t")
            body.append(text_line)
            i += 1
        if i >= len(lines):
            raise DocsMarkupError(f"{doc}:{start + 1}: fence not closed")
        i += 1  # the closing fence
        opts = pending[1] if pending else {}
        pending = None
        action = opts.get("action", "run")
        block = Block(doc=doc, line=start + 1, lang=lang, code="\n".join(body) + ("\n" if body else ""),
                      action=action, reason=opts.get("reason", ""), path=opts.get("path", ""),
                      timeout=opts.get("timeout"))
        if block.kind == "text" and action in ("run", "skip", "slow") and opts:
            raise DocsMarkupError(f"{block.where}: a ```{lang} block is not run; its marker {action!r} means "
                                  f"nothing (use 'file PATH' or 'output')")
        if block.kind == "text" and action == "run":
            block = replace(block, action="show")
        if action == "output":
            runnable = [b for b in blocks if b.action in ("run", "skip", "slow")]
            if not runnable or blocks[-1] is not runnable[-1]:
                raise DocsMarkupError(f"{block.where}: an 'output' block must follow the run block whose output "
                                      f"it shows")
        blocks.append(block)
    if pending:
        raise DocsMarkupError(f"{doc}:{pending[0]}: docs-test marker not followed by a fence")
    return blocks


def console_parts(code: str) -> tuple[str, str]:
    """A console block's commands (``$ `` lines and their continuations) and the output lines it shows."""
    commands: list[str] = []
    output: list[str] = []
    continuing = False
    for line in code.splitlines():
        if continuing:
            commands.append(line)
            continuing = line.rstrip().endswith("\\")
        elif line.startswith("$ ") or line == "$":
            commands.append(line[2:])
            continuing = line.rstrip().endswith("\\")
        else:
            commands.append("")   # keep line numbers
            output.append(line)
    return "\n".join(commands) + "\n", "\n".join(output).strip("\n")


def output_pattern(expected: str) -> re.Pattern:
    """Expected lines as a regex over an output's lines: consecutive, trailing spaces ignored, ``...`` lines
    standing for any number of lines."""
    parts = []
    for line in expected.strip("\n").splitlines():
        if line.strip().startswith("..."):
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(re.escape(line.rstrip()) + r"[ \t]*\n")
    return re.compile("(?:^|\n)" + "".join(parts))


def check_output(expected: str, got: str, where: str) -> None:
    got = clean_output(got) + "\n"
    if not output_pattern(expected).search(got):
        raise AssertionError(f"{where}: the output shown in the docs is not what the block printed.\n"
                             f"--- shown ---\n{expected.rstrip()}\n--- printed ---\n{got.rstrip()}")


def clean_output(text: str) -> str:
    """Terminal output as a reader sees it: a progress bar's carriage returns keep only the last state."""
    return "\n".join(line.split("\r")[-1].rstrip() for line in text.split("\n"))


def tail(text: str, n: int = 60) -> str:
    lines = clean_output(text).strip("\n").splitlines()
    return "\n".join((["..."] if len(lines) > n else []) + lines[-n:])


# ---------------------------------------------------------------------------------------------- running


def venv_dir() -> Path:
    """This checkout's virtual environment (.venv beside tests/), else the one running pytest."""
    local = ROOT / ".venv"
    if (local / "bin" / "python").exists():
        return local.resolve()
    return Path(sys.prefix).resolve()


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    venv_bins = {str(venv_dir() / "bin")}
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "MELFUSION_TRACEBACK"):
        value = env.pop(key, None)
        if key == "VIRTUAL_ENV" and value:
            venv_bins.add(str(Path(value).resolve() / "bin"))

    def on_path(p: str) -> bool:
        try:
            return bool(p) and str(Path(p).resolve()) not in venv_bins
        except OSError:
            return bool(p)

    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if on_path(p))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def make_workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (path / ".venv").symlink_to(venv_dir(), target_is_directory=True)
    return path


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# the Python session: reads one JSON request a line, runs it in one namespace, ends its output with a token line
_DRIVER = r"""
import json, sys, traceback
token = sys.argv[1]
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
for request in sys.stdin:
    request = json.loads(request)
    source = "\n" * (request["line"] - 1) + request["code"]
    status = "ok"
    try:
        exec(compile(source, request["file"], "exec"), namespace)
    except BaseException as error:
        status = "error"
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    print("\n" + token + " " + status, flush=True)
"""

# A warm interpreter: imports the heavy libraries once (10-20 s on a 2-core machine), then forks one child per
# file's session. A child is a new session as far as the blocks can tell (its own namespace, working folder,
# environment and process group); only the module cache is warm. DOCS_TEST_FRESH=1 starts a new interpreter
# per file instead.
_FORK_SERVER = r"""
import importlib, json, os, signal, socket, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children are reaped at once
parent = os.getppid()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen()
listener.settimeout(2.0)
import torch, diffusers, transformers          # what every session's first model or metric imports
import melfusion.pipeline, melfusion.metrics
print("ready", flush=True)
while True:
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        if os.getppid() != parent:   # pytest is gone: so is this
            sys.exit(0)
        continue
    conn.settimeout(None)
    setup = json.loads(conn.makefile("r").readline())
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        conn.close()
        continue
    listener.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    os.chdir(setup["cwd"])
    sys.path_importer_cache.pop("", None)
    importlib.invalidate_caches()
    os.environ.clear()
    os.environ.update(setup["env"])
    for fd in (0, 1, 2):
        os.dup2(conn.fileno(), fd)
    conn.close()
    sys.stdin = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.stderr = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.argv = ["-c", setup["token"]]
    print(setup["token"] + " pid " + str(os.getpid()), flush=True)
    try:
        exec(compile(setup["driver"], "<string>", "exec"), {"__name__": "__main__"})
    finally:
        sys.stdout.flush()
        os._exit(0)
"""


class _ForkServer:
    """The warm interpreter of this pytest process, started on first use."""

    instance: _ForkServer | None = None

    def __init__(self, env: dict[str, str]):
        import atexit
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="docs-test-")
        self.path = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen([str(venv_dir() / "bin" / "python"), "-u", "-c", _FORK_SERVER, self.path],
                                     cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready = queue.Queue()
        threading.Thread(target=lambda: ready.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = ready.get(timeout=300)
        except queue.Empty:
            line = ""
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"the docs tests' warm interpreter did not start: {line!r}")
        atexit.register(self.close)

    @classmethod
    def get(cls, env: dict[str, str]) -> _ForkServer:
        if cls.instance is None or cls.instance.proc.poll() is not None:
            cls.instance = cls(env)
        return cls.instance

    def close(self) -> None:
        if self.proc.poll() is None:
            _kill(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


class PythonSession:
    """One Python process for a file's Python blocks, fed block by block: a child of the warm interpreter (the
    venv's python), or with DOCS_TEST_FRESH=1 a new ``.venv/bin/python``."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.token = f"docs-test-{uuid.uuid4().hex}"
        self.lines: queue.Queue = queue.Queue()
        self.proc = self.sock = None
        if os.environ.get("DOCS_TEST_FRESH") == "1" or not hasattr(os, "fork"):
            self.proc = subprocess.Popen(
                [str(workdir / ".venv" / "bin" / "python"), "-u", "-c", _DRIVER, self.token], cwd=workdir,
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True, bufsize=1)
            self.pid = self.proc.pid
            self._in, self._out = self.proc.stdin, self.proc.stdout
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(_ForkServer.get(env).path)
            self._in = self.sock.makefile("w", encoding="utf-8")
            self._out = self.sock.makefile("r", encoding="utf-8")
            self._in.write(json.dumps({"cwd": str(workdir), "env": env, "token": self.token, "driver": _DRIVER})
                           + "\n")
            self._in.flush()
            self.pid = int(self._out.readline().split()[-1])
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._out:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block, timeout: float) -> tuple[bool, str]:
        request = {"file": str(ROOT / block.doc), "line": block.first_code_line, "code": block.code}
        self._in.write(json.dumps(request) + "\n")
        self._in.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"timed out after {timeout:.0f} s") from None
            if line is None:
                return False, "".join(out) + "\n(the Python session ended)"
            if line.startswith(self.token):
                text = "".join(out)
                return line.split()[-1] == "ok", text[:-1] if text.endswith("\n") else text
            out.append(line)

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.close()

    def close(self) -> None:
        """End of input: the session finishes its last block and exits; whatever it started is ended too."""
        try:
            self._in.close()
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(self.proc)
        else:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:   # a forked child is not ours to wait for: watch its pid go
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.sock.close()


def run_shell(code: str, block: Block, workdir: Path, env: dict[str, str], timeout: float) -> tuple[bool, str]:
    # blank lines first, so that bash's "line N" is the Markdown line; the ERR trap names the failing command
    pad = "\n" * (block.first_code_line - 2)
    script = ("trap 'echo \"docs-test: the command on line $LINENO failed (exit status $?)\" >&2' ERR\n"
              + pad + code)
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise TimeoutError(f"timed out after {timeout:.0f} s") from None
    text = out + (("\n--- stderr ---\n" + err) if err.strip() else "")
    return proc.returncode == 0, text if proc.returncode else out


def run_doc(doc: str, workdir: Path, include_slow: bool) -> list[tuple[Block, float]]:
    """Run one file's blocks in order in ``workdir``; raise AssertionError naming the first block that fails."""
    blocks = extract_blocks((ROOT / doc).read_text(encoding="utf-8"), doc)
    make_workdir(workdir)
    env = block_env()
    session: PythonSession | None = None
    timings: list[tuple[Block, float]] = []
    last_output: tuple[Block, str] | None = None
    try:
        for index, block in enumerate(blocks):
            if block.action == "file":
                target = workdir / block.path
                original = ROOT / block.path
                if original.is_file() and original.read_text(encoding="utf-8") != block.code:
                    raise AssertionError(f"{block.where}: the block says it is {block.path}, but differs from "
                                         f"that file")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
                continue
            if block.action == "output":
                if last_output is not None and last_output[0] is blocks[index - 1]:
                    check_output(block.code, last_output[1], f"{block.where} (output of {last_output[0].where})")
                continue
            if block.action in ("show", "skip") or (block.action == "slow" and not include_slow):
                continue
            timeout = block.timeout or (SLOW_TIMEOUT if block.action == "slow" else DEFAULT_TIMEOUT)
            started = time.monotonic()
            try:
                if block.kind == "python":
                    if session is None:
                        session = PythonSession(workdir, env)
                    ok, output = session.run(block, timeout)
                else:
                    code, shown = (console_parts(block.code) if block.kind == "console" else (block.code, ""))
                    ok, output = run_shell(code, block, workdir, env, timeout)
                    if ok and shown:
                        check_output(shown, output, f"{block.where} (console output)")
            except TimeoutError as error:
                if block.kind == "python":
                    session = None
                raise AssertionError(f"{block.where}: {block.lang} block {error}\n--- block ---\n"
                                     f"{block.code.rstrip()}") from None
            elapsed = time.monotonic() - started
            timings.append((block, elapsed))
            print(f"{block.where} {block.lang} block: {'ok' if ok else 'FAILED'} in {elapsed:.1f} s", flush=True)
            if not ok:
                raise AssertionError(f"{block.where}: {block.lang} block failed\n--- block ---\n"
                                     f"{block.code.rstrip()}\n--- output (work folder {workdir}) ---\n"
                                     f"{tail(output)}")
            last_output = (block, output)
    finally:
        if session is not None:
            session.close()
    return timings


# ---------------------------------------------------------------------------------------------- tests


def _blocks_or_none(doc: str) -> list[Block] | None:
    try:
        return extract_blocks((ROOT / doc).read_text(encoding="utf-8"), doc)
    except DocsMarkupError:
        return None   # test_docs_run reports it


def _not_run() -> list[Block]:
    return [b for doc in DOC_FILES for b in (_blocks_or_none(doc) or []) if b.action in ("skip", "slow")]


def _with_slow() -> list[str]:
    return [doc for doc in DOC_FILES if any(b.action == "slow" for b in (_blocks_or_none(doc) or []))]


@pytest.mark.parametrize("doc", DOC_FILES)
def test_docs_run(doc, tmp_path):
    """Every block of the file that is neither skip nor slow runs, in order, in one fresh work folder."""
    run_doc(doc, tmp_path / "work", include_slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("doc", _with_slow())
def test_docs_run_with_slow_blocks(doc, tmp_path):
    """The files that hold slow blocks, run whole (everything but the skipped blocks)."""
    run_doc(doc, tmp_path / "work", include_slow=True)


@pytest.mark.parametrize("block", _not_run(), ids=lambda b: b.where)
def test_docs_block_not_run(block):
    """One skipped test per block that make test does not run, so that -ra lists them with their reasons."""
    if block.action == "slow":
        pytest.skip(f"{block.where}: slow, run by `make test-slow`: {block.reason}")
    pytest.skip(f"{block.where}: {block.reason}")


SAMPLE = """\
# Title

```bash
echo one
```

<!-- docs-test: skip (needs a GPU) -->
```python
import torch; torch.zeros(1, device="cuda")
```

Text, then an indented fence in a list item:

1. Step:

   ```python
   x = 1
   if x:
       y = 2
   ```
<!-- docs-test: output -->
```text
...
done
```

~~~sh
echo "~~~ and ``` inside"
```
~~~

<!-- docs-test: slow (takes 3 minutes) timeout=600 -->
```console
$ echo a \\
    b
a b
```

<!-- docs-test: file examples/x.yaml -->
```yaml
model: tiny
```

```yaml
synapse: {injection: context}
```

```
plain text
```

<!-- docs-test: timeout=300 -->
```Python title="x"
print(1)
```
"""


def test_extractor_reads_languages_markers_lines_and_indentation():
    blocks = extract_blocks(SAMPLE, "sample.md")
    assert [(b.line, b.lang, b.kind, b.action) for b in blocks] == [
        (3, "bash", "shell", "run"),
        (8, "python", "python", "skip"),
        (16, "python", "python", "run"),
        (22, "text", "text", "output"),
        (27, "sh", "shell", "run"),
        (33, "console", "console", "slow"),
        (40, "yaml", "text", "file"),
        (44, "yaml", "text", "show"),
        (48, "", "text", "show"),
        (53, "python", "python", "run"),
    ]
    by_line = {b.line: b for b in blocks}
    assert by_line[3].code == "echo one\n"
    assert by_line[8].reason == "needs a GPU"
    assert by_line[16].code == "x = 1\nif x:\n    y = 2\n"        # the list item's 3 spaces removed, no more
    assert by_line[16].first_code_line == 17
    assert by_line[27].code == 'echo "~~~ and ``` inside"\n```\n'  # a ``` line does not close a ~~~ fence
    assert (by_line[33].reason, by_line[33].timeout) == ("takes 3 minutes", 600.0)
    assert console_parts(by_line[33].code) == ("echo a \\\n    b\n\n", "a b")
    assert by_line[40].path == "examples/x.yaml" and by_line[40].code == "model: tiny\n"
    assert by_line[53].timeout == 300.0 and by_line[53].action == "run"


@pytest.mark.parametrize("bad, message", [
    ("<!-- docs-test: skip -->\n```bash\nls\n```\n", "skip (REASON)"),
    ("<!-- docs-test: slow () -->\n```bash\nls\n```\n", "slow (REASON)"),
    ("<!-- docs-test: skipp (x) -->\n```bash\nls\n```\n", "unknown docs-test marker"),
    ("<!-- docs-test: skip (x) -->\n\n```bash\nls\n```\n", "not followed by a fence"),
    ("<!-- docs-test: skip (x) -->\n```text\nls\n```\n", "is not run"),
    ("<!-- docs-test: file /etc/x -->\n```yaml\na: 1\n```\n", "RELATIVE/PATH"),
    ("<!-- docs-test: output -->\n```text\nx\n```\n", "must follow the run block"),
    ("```bash\nls\n", "fence not closed"),
    ("<!-- docs-test: skip (y) --> and more\n```bash\nls\n```\n", "whole line"),
])
def test_extractor_refuses_bad_markup_naming_the_line(bad, message):
    with pytest.raises(DocsMarkupError, match=re.escape(message)) as error:
        extract_blocks(bad, "bad.md")
    assert str(error.value).startswith("bad.md:")


def test_output_check_matches_lines_in_order_with_ellipsis():
    printed = "loading\r100%\nheader   \nrow 1\nrow 2\nrow 3\n3 rows\n"
    check_output("header\nrow 1\n... (more rows)\n3 rows\n", printed, "x")
    check_output("100%\nheader", printed, "x")                 # a progress bar's last state
    with pytest.raises(AssertionError, match="not what the block printed"):
        check_output("header\nrow 2\n", printed, "x")          # not consecutive
    with pytest.raises(AssertionError):
        check_output("4 rows\n", printed, "x")


def test_runner_names_the_file_and_the_markdown_line(tmp_path, monkeypatch):
    """A failing Python block's traceback points at its Markdown line; a failing command is named by line."""
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n\n```python\nvalue = 41\n```\n\n```python\nvalue += 1\nprint(value)\nraise ValueError('boom')\n"
                   "```\n\n```bash\ntrue\nfalse\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "COPIED", ())
    monkeypatch.setattr(sys.modules[__name__], "venv_dir", lambda: Path(sys.prefix).resolve())
    with pytest.raises(AssertionError) as error:
        run_doc("doc.md", tmp_path / "work", include_slow=False)
    message = str(error.value)
    assert message.startswith("doc.md:7: python block failed"), message
    assert "42" in message                                         # the first block's variable was kept
    assert f'File "{tmp_path / "doc.md"}", line 10' in message and "ValueError: boom" in message
    doc.write_text("```bash\ntrue\nfalse\necho never\n```\n")
    with pytest.raises(AssertionError) as error:
        run_doc("doc.md", tmp_path / "work2", include_slow=False)
    assert str(error.value).startswith("doc.md:1: bash block failed")
    assert "the command on line 3 failed (exit status 1)" in str(error.value)
    # a file block is written where it says; an output block is checked against what the block before printed
    doc.write_text("<!-- docs-test: file conf/x.txt -->\n```yaml\na: 1\n```\n\n```bash\ncat conf/x.txt\n```\n\n"
                   "<!-- docs-test: output -->\n```text\na: 1\n```\n\n```python\nprint('b: 2')\n```\n\n"
                   "<!-- docs-test: output -->\n```text\nb: 3\n```\n")
    with pytest.raises(AssertionError) as error:
        run_doc("doc.md", tmp_path / "work3", include_slow=False)
    assert str(error.value).startswith("doc.md:20 (output of doc.md:15): the output shown in the docs is not what")
    assert (tmp_path / "work3" / "conf" / "x.txt").read_text() == "a: 1\n"
