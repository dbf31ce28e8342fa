"""Writing files and folders so that nothing a user owns is lost and a reader never sees half of one.

The rules every writer in melfusion follows (README, "Output policy"):

- a file is written beside its target and renamed onto it (:func:`atomic_path`), so a reader sees the old
  file or the new one, and an interrupted write leaves the old one in place;
- a folder (a saved model, a checkpoint) is written beside its target and swapped in
  (:func:`replace_folder`), so at every instant the target holds a complete old or new folder; a target
  holding files the writer does not own is refused with their names, never deleted;
- an existing output file is replaced only when the caller says so, and an input is never an output
  (:func:`check_output`);
- files and folders get the modes the user's umask gives (``mkstemp``/``mkdtemp`` would give 0600/0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

__all__ = ["check_input_file", "atomic_path", "write_atomic", "check_output", "replace_folder", "clean_leftovers", "same_file",
           "apply_umask", "pid_alive", "OutputExistsError", "AUDIO_SUFFIXES", "output_paths"]


class OutputExistsError(FileExistsError):
    """An output path exists and the caller did not allow replacing it."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: str | os.PathLike, *, folder: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (0666 or 0777 less the umask)."""
    path = Path(path)
    is_dir = path.is_dir() if folder is None else folder
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (the same inode, or the same resolved path when one is missing)."""
    a, b = Path(a), Path(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_input_file(path: str | os.PathLike, name: str, what: str = "file",
                     missing: type[Exception] = ValueError) -> Path:
    """``path`` as a readable regular file for argument ``name``, or one error naming it: a folder, a broken
    or looping link, a device or pipe (which would block a read) or a missing file (``missing`` is raised)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{name}: expected a {what} path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder, not a {what}")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{name}: {str(path)!r} is a broken or looping symbolic link")
    if path.exists() and not path.is_file():
        raise ValueError(f"{name}: {str(path)!r} is not a regular file (a device, a pipe or a socket)")
    if not path.is_file():
        raise missing(f"{name}: no such file {str(path)!r}")
    return path


def check_output(path: str | os.PathLike, name: str, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), suffixes: Iterable[str] | None = None) -> Path:
    """``path`` as a safe output file for argument ``name``, or a clear error before any work is done.

    Refused: a folder; a suffix not in ``suffixes`` (lower case, with the dot); one of ``inputs`` (never,
    even with ``overwrite``); an existing file unless ``overwrite``; a parent that is a file.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{name}: expected a file path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise ValueError(f"{name}: {str(path)!r} is not a regular file (a device, a pipe or a socket)")
    if suffixes is not None:
        allowed = sorted(suffixes)
        if path.suffix.lower() not in allowed:
            got = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
            raise ValueError(f"{name}: {str(path)!r} has {got}; expected one of {', '.join(allowed)}")
    for source in inputs:
        if source is not None and same_file(path, source):
            raise ValueError(f"{name}: {str(path)!r} is an input of this call; an input is never overwritten")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}: {str(parent)!r} is a file, so {str(path)!r} cannot be written")
            break
    if os.path.lexists(path) and not overwrite:  # a dangling link exists too: it is the user's
        raise OutputExistsError(f"{name}: {str(path)!r} already exists; choose another path or allow "
                                "overwriting (--overwrite, or overwrite=True)")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path in ``path``'s folder; moved onto ``path`` when the block ends, removed if it fails.

    ``os.replace`` is atomic on one filesystem: readers see the old file or the new one, and an interrupted
    write leaves the old file in place. The new file gets the user's umask, not ``mkstemp``'s 0600. With
    ``overwrite=False`` the file is linked into place only if ``path`` still does not exist (so a file that
    appeared while this one was written, e.g. by another process, is kept: ``OutputExistsError``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp, folder=False)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        raise OutputExistsError(f"path: {str(path)!r} appeared while it was being written; it was kept") from None
    except OSError:  # a filesystem without hard links: check, then rename (a small window remains)
        if os.path.lexists(path):
            raise OutputExistsError(f"path: {str(path)!r} appeared while it was being written; it was kept") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False, overwrite: bool = True) -> Path:
    """Write text or bytes to ``path`` atomically (see :func:`atomic_path`); ``fsync`` flushes to disk first."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "w" if isinstance(data, str) else "wb",
                                        **({"encoding": "utf-8"} if isinstance(data, str) else {})) as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


# -- folders ---------------------------------------------------------------------------------------------
_TMP_TAG = "melfusion-tmp"


def _tmp_name(target: Path) -> Path:
    # the pid in the name tells a later save whether the writer is still alive (see clean_leftovers)
    return target.with_name(f".{target.name}.{_TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}")


def _leftovers(target: Path) -> list[Path]:
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{_TMP_TAG}-*"))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that killed writes of ``target`` left beside it; returns what was removed.

    Only folders named by :func:`replace_folder` for this target (``.NAME.melfusion-tmp-PID-XXXX``) whose
    writing process is gone are removed. Where a killed swap left no target at all (the two-rename
    fallback on systems without an atomic exchange), the newest complete leftover is put back first.
    """
    target = Path(target)
    removed = []
    for tmp in _leftovers(target):
        try:
            pid = int(tmp.name.rsplit(f"{_TMP_TAG}-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid_alive(pid):
            continue
        if not target.exists() and (tmp / _COMPLETE).is_file():
            os.replace(tmp, target)
            (target / _COMPLETE).unlink(missing_ok=True)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


_COMPLETE = ".melfusion-complete"  # only in a fallback swap's folders, and only for an instant


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def replace_folder(target: str | os.PathLike, name: str, *,
                   owned: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Write a folder in a temporary sibling, then swap it in as ``target``.

    Yields the temporary folder to fill. At every instant ``target`` is either the complete old folder or
    the complete new one (an atomic exchange on Linux; elsewhere two renames, which a later call repairs).
    ``target`` may be missing, an empty folder, or a folder whose every entry ``owned(entry)`` accepts;
    a file, or a folder holding anything else, is refused (``ValueError`` naming ``name`` and the entries)
    before anything is written. Leftovers of killed writes are removed first (:func:`clean_leftovers`).
    """
    if not isinstance(target, (str, os.PathLike)) or not str(target).strip():
        raise ValueError(f"{name}: expected a folder path, got {target!r}")
    shown_as = str(target)
    if Path(target).is_symlink():
        if not Path(target).exists():
            raise ValueError(f"{name}: {shown_as!r} is a broken symbolic link; give a folder path")
        target = os.path.realpath(target)  # write through the link: the user's link stays as it is
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{name}: {shown_as!r} is a file; give a folder path (it is never replaced)")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}: {str(parent)!r} is a file, so {shown_as!r} cannot be a folder")
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    if target.is_dir():
        foreign = [p.name for p in sorted(target.iterdir()) if owned is None or not owned(p)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"{name}: {str(target)!r} holds files melfusion did not write ({shown}); "
                             "nothing was changed: choose an empty or new folder")
    tmp, old = _tmp_name(target), _tmp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        _set_modes(tmp)
        if target.exists():
            if _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
                return
            (tmp / _COMPLETE).touch()
            target.rename(old)
            tmp.rename(target)
            (target / _COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        if not target.exists() and old.is_dir():
            old.rename(target)  # a failed fallback swap: the old folder goes back
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _set_modes(folder: Path) -> None:
    apply_umask(folder, folder=True)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            apply_umask(Path(root) / d, folder=True)
        for f in files:
            apply_umask(Path(root) / f, folder=False)


#: the audio formats generated clips are written in (by their suffix)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def output_paths(path: str | os.PathLike, count: int) -> list[Path]:
    """The files :meth:`~melfusion.pipeline.GenerationOutput.save` writes for ``count`` samples: ``path``, or
    ``stem_i.suffix``. Here, beside the output checks, so that the CLI refuses an output before importing the
    models."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.wav'}") for i in range(count)]
