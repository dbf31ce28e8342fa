"""Writing a generated dataset folder (the toy and synthetic worlds) without losing anything already there.

A writer names every file it will write (``planned``, paths relative to the folder) and yields their bytes
from a deterministic generator. :func:`write_dataset_folder` then, before writing anything:

- refuses a folder that holds other files (a different manifest, someone's own data), naming them;
- compares each planned file that already exists with the bytes this call would write, and refuses if
  any differs (the same arguments write the same bytes, so writing a dataset again is a no-op);

``overwrite=True`` skips both checks: the planned files are replaced and every other file is left alone.
Each file is written atomically (a temporary sibling, then ``os.replace``) with the modes the umask gives,
and the manifest is the last file written, so a reader never sees a manifest whose files are not there.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..files import OutputExistsError, write_atomic

__all__ = ["write_dataset_folder", "wav_bytes", "png_bytes"]

_SHOWN = 5


def wav_bytes(wave, sample_rate: int) -> bytes:
    """A PCM_16 WAV file's bytes."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image, quality: int) -> bytes:
    """A PIL image as baseline JPEG bytes at ``quality`` (1-95)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _is_leftover(path: Path, planned_names: set[str]) -> bool:
    """A temporary file an interrupted :func:`~melfusion.files.atomic_path` write of a planned file left."""
    name = path.name
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{p}.") for p in planned_names)


def _foreign(folder: Path, planned: set[str]) -> list[str]:
    """Up to a few entries of ``folder`` that are not planned files (the planned files' folders are looked
    inside; nothing else is walked, so a big folder given by mistake is refused quickly)."""
    inside = {parent for p in planned for parent in Path(p).parents} - {Path(".")}
    names = {Path(p).name for p in planned}
    found: list[str] = []

    def scan(rel: Path) -> None:
        for entry in sorted((folder / rel).iterdir()):
            if len(found) > _SHOWN:
                return
            sub = rel / entry.name
            if sub in inside and entry.is_dir() and not entry.is_symlink():
                scan(sub)
            elif sub.as_posix() not in planned and not _is_leftover(entry, names):
                found.append(sub.as_posix() + ("/" if entry.is_dir() else ""))

    scan(Path("."))
    return found


def write_dataset_folder(folder: str | Path, planned: Iterable[str], files: Callable[[], Iterator[tuple[str, bytes]]],
                         *, overwrite: bool = False, name: str = "folder") -> Path:
    """Write the ``(relative path, bytes)`` that ``files()`` yields under ``folder`` (see the module doc).

    ``planned`` lists every path ``files()`` yields; ``files`` is called once more for the comparison when
    planned files exist already. Raises :class:`~melfusion.files.OutputExistsError` (a ``FileExistsError``)
    naming ``name`` and the files, before writing anything, when the folder holds other or different files
    and ``overwrite`` is False; ``ValueError`` when ``folder`` or a planned path is not a folder or file.
    """
    folder = Path(folder)
    planned = {Path(p).as_posix() for p in planned}
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}: {str(folder)!r} is a file; give a folder to write the dataset into")
    blocked = sorted(p for p in planned if (folder / p).is_dir())
    if blocked:
        raise ValueError(f"{name}: {str(folder)!r} holds folders where files go ({_shown(blocked)}); nothing was written")
    clash = sorted(p for p in planned if (folder / p).exists())
    if folder.is_dir() and not overwrite:
        foreign = _foreign(folder, planned)
        if foreign:
            raise OutputExistsError(
                f"{name}: {str(folder)!r} holds files this call does not write ({_shown(foreign)}); nothing was "
                "written: choose an empty or new folder, or pass overwrite=True (it replaces only the dataset's "
                "own files and keeps the others)")
        if clash:
            wanted = set(clash)
            differ = [rel for rel, data in files() if rel in wanted and (folder / rel).read_bytes() != data]
            if differ:
                raise OutputExistsError(
                    f"{name}: {str(folder)!r} already holds a different dataset ({_shown(differ)} differ from what "
                    "these arguments write); nothing was written: choose an empty or new folder, or pass "
                    "overwrite=True")
            if len(clash) == len(planned):
                return folder  # the very same dataset is there already
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in files():
        if rel not in planned:  # a writer bug: every file must be announced, or the checks above mean nothing
            raise RuntimeError(f"{name}: {rel!r} was not among the planned files")
        write_atomic(folder / rel, data)
    return folder
