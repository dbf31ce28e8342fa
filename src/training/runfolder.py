"""The run folder (``TrainConfig.output``): what a training run may find there, and its lock.

A run folder holds only what the trainer writes (:data:`RUN_ENTRIES`, and the temporary names of its
atomic writes). A fresh run starts only in a missing or empty folder, or one holding nothing but
content it can reuse (the image-latent ``cache/``, the ``skipped_rows.json`` report it rewrites, the
lock file); a folder holding anything else is refused with the entries named, and one holding a
previous run is refused with a pointer to ``--resume``. Nothing is deleted to make room.

While a run trains, it holds an exclusive ``flock`` on ``.melfusion-train.lock`` inside the folder,
so a second training into the same folder fails at once. The kernel drops the lock when the process
dies, so a killed run never blocks its own ``--resume``; the lock file itself stays (deleting a lock
file that others may have opened would let two runs hold "the" lock).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in docs/training.md)
    fcntl = None

from ..files import OutputExistsError

__all__ = ["RUN_ENTRIES", "LOCK_NAME", "RunFolderLockedError", "RunLock", "foreign_entries", "previous_run",
           "check_fresh_run"]

LOCK_NAME = ".melfusion-train.lock"

#: the entries a trainer writes in its run folder: name -> is a folder
RUN_ENTRIES = {
    "train_config.yaml": False,
    "train_log.csv": False,
    "training.png": False,
    "skipped_rows.json": False,
    LOCK_NAME: False,
    "checkpoints": True,
    "model": True,
    "tensorboard": True,
    "cache": True,
}
#: entries a fresh run reuses or rewrites (they do not make the folder a previous run)
REUSABLE = {"skipped_rows.json", LOCK_NAME, "cache"}
# temporary names of interrupted atomic writes: files (files.atomic_path) and folders (files.replace_folder)
_TEMPORARY = re.compile(r"^\.(?:(?:train_config\.yaml|train_log\.csv|training\.png|skipped_rows\.json)\..+\.tmp"
                        r"|model\.melfusion-tmp-.+)$")


class RunFolderLockedError(OSError):
    """Another training holds the run folder."""


def _is_ours(entry: Path) -> bool:
    if _TEMPORARY.match(entry.name):
        return True
    folder = RUN_ENTRIES.get(entry.name)
    if folder is None or entry.is_symlink():
        return False
    return entry.is_dir() if folder else entry.is_file()


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_not_file(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output: {str(folder)!r} is a file; give a folder for the run (it is never replaced)")


def foreign_entries(folder: str | Path) -> list[str]:
    """The names in ``folder`` that a trainer does not write (sorted); ``[]`` for a missing folder."""
    folder = Path(folder)
    _check_not_file(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not _is_ours(p))


def _non_empty(entry: Path) -> bool:
    if entry.is_dir():
        return any(entry.iterdir())
    return entry.stat().st_size > 0


def previous_run(folder: str | Path) -> list[str]:
    """The entries in ``folder`` that a previous run left (its log, config, checkpoints, model...); sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in RUN_ENTRIES and p.name not in REUSABLE and _is_ours(p) and _non_empty(p))


def check_run_folder(folder: str | Path) -> None:
    """Refuse, before anything is written, an output that is a file, or a folder that is not a run folder.

    A folder with entries a trainer does not write is accepted only when it also holds a run (then
    those entries are the user's additions to a run folder, which a resume leaves alone).
    """
    folder = Path(folder)
    foreign = foreign_entries(folder)
    if foreign and not previous_run(folder):
        raise ValueError(f"output: {str(folder)!r} holds files melfusion did not write ({_listing(foreign)}); "
                         "nothing was changed: choose an empty or new folder for the run")


def check_fresh_run(folder: str | Path) -> None:
    """Refuse a fresh run in a folder holding a previous run or files melfusion did not write."""
    folder = Path(folder)
    foreign = foreign_entries(folder)
    if foreign:
        raise ValueError(f"output: {str(folder)!r} holds files melfusion did not write ({_listing(foreign)}); "
                         "nothing was changed: choose an empty or new folder for the run")
    found = previous_run(folder)
    if found:
        raise OutputExistsError(f"output: {str(folder)!r} already holds a training run ({_listing(found)}); pass "
                                "--resume (resume=True) to continue it, or choose another output folder")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.melfusion-train.lock`` (see the module doc)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file = None
        self._created_folder = False

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunLock:
        """Take the lock, creating the folder if needed; :class:`RunFolderLockedError` if another run has it."""
        if self._file is not None:
            return self
        _check_not_file(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise ValueError(f"output: the lock {str(self.path)!r} is a link or not a regular file; melfusion "
                             "never writes through it (remove it if it is not yours)")
        # O_NOFOLLOW: a link planted between the check and the open is refused too, never written through
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        f = os.fdopen(fd, "a+", encoding="utf-8")  # noqa: SIM115 (held open while the run trains)
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip()
                f.close()
                who = f" (process {holder})" if holder else ""
                raise RunFolderLockedError(
                    f"output: {str(self.folder)!r} is in use by another training{who}; wait for it to finish, "
                    "or choose another output folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self, *, remove_created: bool = False) -> None:
        """Drop the lock; ``remove_created``: also remove the folder if this lock created it and it holds nothing else."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            if remove_created and self._created_folder and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                self.path.unlink(missing_ok=True)  # still locked: no other run can be using this file
                f.close()
                try:
                    self.folder.rmdir()
                except OSError:
                    pass
                return
        finally:
            if not f.closed:
                f.close()  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
