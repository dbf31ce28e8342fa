"""Triplet manifests (caption, audio, image): reading JSONL / CSV / folder datasets and validating every row.

Row numbers (``Triplet.row`` and every error message) point at the place a person would look:

- JSONL: the 1-based line number in the file (blank lines are skipped but still counted). A ``.json`` file
  holding one JSON array instead is numbered by 1-based position in the array.
- CSV: the 1-based line number in the file, the header being line 1, so the first record is row 2 (a record
  whose quoted fields span lines is numbered by its first line).
- folder: the 1-based index of the audio file in sorted file-name order.

``read_manifest`` never stops at a bad row: a line that is not UTF-8, not JSON, not an object, or lacks the
audio field becomes a *problem* (row, reason) carried on the returned :class:`ManifestRows`, and
``validate_manifest`` reports those together with the rows whose files are missing or broken and the
exact duplicates of earlier rows. A manifest with no rows at all is a :class:`ManifestError`.

The caption field (``captions``, as in the MeLFusion/Tango manifests) is a string, or a non-empty list of
strings of which the **first** is used (docs/evaluation.md); anything else is a bad row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..files import OutputExistsError, check_output, write_atomic
from ..images import open_image
from .audio import check_audio, file_problem

__all__ = [
    "Triplet",
    "ManifestError",
    "ManifestRows",
    "ValidationReport",
    "read_manifest",
    "validate_manifest",
    "row_problems",
    "AUDIO_SUFFIXES",
    "IMAGE_SUFFIXES",
]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_COLUMNS = {"caption": "captions", "audio": "location", "image": "img_path"}
FORMATS = ("jsonl", "csv", "folder")
POLICIES = ("error", "skip")
MAX_LISTED = 50


@dataclass(frozen=True)
class Triplet:
    """One training example. ``row`` is its manifest row number (see the module docstring)."""

    row: int
    caption: str
    audio: Path | None  # None only in a manifest read with require_audio=False (a test set to generate)
    image: Path | None


class ManifestError(ValueError):
    """A manifest that cannot be read, or (policy="error") that has bad rows; ``bad`` lists them."""

    def __init__(self, message: str, bad: Sequence[tuple[int, str]] = ()):
        super().__init__(message)
        self.bad: list[tuple[int, str]] = list(bad)


class ManifestRows(list):
    """The rows of a manifest (a ``list[Triplet]``), plus the rows that could not be parsed.

    ``problems`` holds ``(row, reason)`` for lines that gave no Triplet (not JSON, no audio field, ...);
    ``source`` is the manifest path.
    """

    def __init__(self, rows: Iterable[Triplet] = (), problems: Iterable[tuple[int, str]] = (),
                 source: Path | None = None):
        super().__init__(rows)
        self.problems: list[tuple[int, str]] = list(problems)
        self.source = source


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path, *, format: str | None = None,
                  columns: dict[str, str] | None = None, require_audio: bool = True) -> ManifestRows:
    """The triplets of a manifest, with paths made absolute against the manifest's folder.

    ``format`` is "jsonl", "csv" or "folder"; None infers it (.jsonl/.json, .csv, a directory).
    ``columns`` renames the fields (keys "caption", "audio", "image"; defaults captions/location/img_path).
    Unparseable rows are kept as ``problems`` on the result (see :class:`ManifestRows`), not raised.
    ``require_audio=False`` reads a test set to generate from: the audio field (the reference) may be
    absent (``Triplet.audio`` None), and a folder without audio files gives one row per image that has a
    ``name.txt`` caption beside it.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest: no such file or folder {str(path)!r}")
    if not path.is_dir() and not path.is_file():  # a pipe would block the read forever
        raise ManifestError(f"manifest: {str(path)!r} is not a regular file or a folder")
    fmt = _infer_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)} or None, got {format!r}")
    names = _columns(columns, fmt)
    if fmt == "folder":
        if not path.is_dir():
            raise ManifestError(f"manifest: format 'folder' needs a directory, {str(path)!r} is a file")
        try:
            rows, problems = _read_folder(path, require_audio)
        except OSError as exc:
            raise ManifestError(f"manifest: cannot list the folder {str(path)!r} ({exc.strerror or exc})") from None
    else:
        if path.is_dir():
            raise ManifestError(f"manifest: format {fmt!r} needs a file, {str(path)!r} is a directory")
        data = _read_bytes(path)
        base = _absolute(path).parent
        if fmt == "jsonl":
            rows, problems = _read_jsonl(data, base, names, path, require_audio)
        else:
            rows, problems = _read_csv(_decode(data, path), base, names, path, require_audio)
    if not rows and not problems:
        what = ("holds no audio files (" + ", ".join(AUDIO_SUFFIXES) + ")" if require_audio
                else "holds no image files with captions") if fmt == "folder" else "has no rows"
        raise ManifestError(f"manifest: {str(path)!r} {what}; nothing to read")
    return ManifestRows(rows, problems, source=path)


def _infer_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise ManifestError(f"manifest: cannot tell the format of {str(path)!r} from its suffix {suffix!r} "
                        f"(expected .jsonl, .json, .csv or a folder); pass format='jsonl', 'csv' or 'folder'")


def _columns(columns: dict[str, str] | None, fmt: str) -> dict[str, str]:
    if columns is None:
        return dict(DEFAULT_COLUMNS)
    if fmt == "folder":
        raise ValueError("columns: a folder dataset has no columns (name.wav + name.txt + name.png); "
                         "pass columns only with format 'jsonl' or 'csv'")
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"columns: unknown keys {unknown}; expected some of {sorted(DEFAULT_COLUMNS)}")
    for key, value in columns.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"columns[{key!r}]: expected a non-empty column name, got {value!r}")
    return {**DEFAULT_COLUMNS, **columns}


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"manifest: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte-order mark


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(f"manifest: {str(path)!r} is not UTF-8 text (line {line}: byte "
                            f"0x{data[exc.start]:02x} {exc.reason})") from None


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _a(value: Any) -> str:
    """``"an int"``, ``"a list"``: the type of ``value`` with its article."""
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def caption_text(value: Any, field: str = "captions") -> tuple[str | None, str | None]:
    """The caption of a field value, ``(text, None)``, or ``(None, why it is not one)``.

    A string is the caption; a non-empty list of strings gives its first item (the MeLFusion/Tango
    manifests' ``captions`` list, docs/evaluation.md); anything else (a number, null, an empty list, a
    list holding a non-string) is a problem.
    """
    if isinstance(value, list):
        if not value:
            return None, f"caption field {field!r} is an empty list"
        odd = [v for v in value if not isinstance(v, str)]
        if odd:
            return None, f"caption field {field!r} is a list holding {_a(odd[0])}, not only strings"
        value = value[0]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud800": no text encoder can take it
            return None, f"caption field {field!r} holds an unpaired surrogate ({value[exc.start]!r})"
        return value, None
    kind = "null" if value is None else _a(value)
    return None, f"caption field {field!r} is {kind}, not a string or a list of strings"


def _path_field(record: dict, field: str, what: str, required: bool) -> tuple[str | None, str | None]:
    if field not in record:
        return None, (f"no {what} field {field!r}" if required else None)
    value = record[field]
    if value is None:
        return None, (f"{what} field {field!r} is null" if required else None)
    if not isinstance(value, str):
        return None, f"{what} field {field!r} is {_a(value)}, not a string"
    if "\x00" in value:
        return None, f"{what} field {field!r} holds a NUL character"
    if required and not value.strip():
        return None, f"{what} field {field!r} is empty"
    return value.strip() or None, None


def _triplet(row: int, record: dict, base: Path, names: dict[str, str], require_audio: bool = True
             ) -> tuple[Triplet | None, str | None]:
    """A Triplet from one parsed record, or the reason it cannot be one (every problem, joined by '; ')."""
    problems = []
    caption = None
    if names["caption"] not in record:
        problems.append(f"no caption field {names['caption']!r}")
    else:
        caption, why = caption_text(record[names["caption"]], names["caption"])
        if why:
            problems.append(why)
    audio, why = _path_field(record, names["audio"], "audio", required=require_audio)
    if why:
        problems.append(why)
    image, why = _path_field(record, names["image"], "image", required=False)
    if why:
        problems.append(why)
    if problems:
        if isinstance(caption, str) and not caption.strip():
            problems.insert(0, "caption is empty")
        return None, "; ".join(problems)
    image_path = _resolve(image, base) if image else None
    return Triplet(row, caption, _resolve(audio, base) if audio else None, image_path), None


def _records(numbered: list[tuple[int, Any]], base: Path, names: dict[str, str], problems: list,
             require_audio: bool = True):
    """Triplets from ``(row, parsed record)`` pairs (JSON objects, CSV rows as dicts); rows that are not
    objects or lack fields go to ``problems``."""
    rows = []
    for number, record in numbered:
        if not isinstance(record, dict):
            problems.append((number, f"expected a JSON object, got {_a(record)}"))
            continue
        triplet, problem = _triplet(number, record, base, names, require_audio)
        if triplet is None:
            problems.append((number, problem))
        else:
            rows.append(triplet)
    return rows, problems


def _read_jsonl(data: bytes, base: Path, names: dict[str, str], path: Path, require_audio: bool = True):
    """JSON lines, one record a line (split on ``\\n`` only: a JSON string may hold U+2028); a line that is
    not UTF-8 or not JSON is a problem of its row. A file starting with ``[`` is one JSON array."""
    if data.lstrip().startswith(b"["):
        return _read_json_array(_decode(data, path), base, names, path, require_audio)
    numbered, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
            continue
        try:
            numbered.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
        except RecursionError:
            problems.append((number, "not valid JSON (nested too deeply)"))
    return _records(numbered, base, names, problems, require_audio)


def _read_json_array(text: str, base: Path, names: dict[str, str], path: Path, require_audio: bool = True):
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest: {str(path)!r} starts with '[' but is not valid JSON "
                            f"({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ManifestError(f"manifest: {str(path)!r} is not valid JSON (nested too deeply)") from None
    if not isinstance(records, list):
        raise ManifestError(f"manifest: {str(path)!r} starts with '[' but is not one JSON array")
    return _records(list(enumerate(records, start=1)), base, names, [], require_audio)


def _read_csv(text: str, base: Path, names: dict[str, str], path: Path, require_audio: bool = True):
    reader = csv.reader(io.StringIO(text, newline=""))  # lines end at \n, \r\n or \r only, as CSV's do
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError(f"manifest: {str(path)!r} is empty (a CSV manifest needs a header row)") from None
    except csv.Error as exc:
        raise ManifestError(f"manifest: cannot parse the header of {str(path)!r} ({exc})") from None
    header = [h.strip() for h in header]
    missing = [names[k] for k in (("caption", "audio") if require_audio else ("caption",)) if names[k] not in header]
    if missing:
        raise ManifestError(f"manifest: {str(path)!r} has no column {' or '.join(map(repr, missing))} "
                            f"(its header is {header}); pass columns={{'caption': ..., 'audio': ...}}")
    numbered, problems = [], []
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append((start, f"cannot parse the CSV record ({exc})"))
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if not record or all(not cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            problems.append((number, f"has {len(record)} fields, the header has {len(header)}"))
            continue
        values = dict(zip(header, record, strict=True))
        for key in ("image",) if require_audio else ("image", "audio"):
            if names[key] in values and not values[names[key]].strip():
                values[names[key]] = None
        numbered.append((number, values))
    return _records(numbered, base, names, problems, require_audio)


def _read_folder(folder: Path, require_audio: bool = True):
    """``name.wav`` (or .flac/.ogg/.mp3) + ``name.txt`` + ``name.jpg/.jpeg/.png``, not recursive.

    A folder with no image files at all is an audio-text dataset (every ``image`` is None); otherwise an
    audio file without its caption or image file is a bad row. With ``require_audio=False``, a folder
    holding no audio file at all is a test set: one row per image file (``name.png`` + ``name.txt``).
    """
    base = _absolute(folder)
    files = sorted(p for p in base.iterdir() if p.is_file())
    by_stem: dict[str, dict[str, Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, {})[p.suffix.lower()] = p
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in files)
    audio_files = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    if not audio_files and not require_audio:
        return _read_image_folder(files, by_stem)
    rows, problems = [], []
    for number, audio in enumerate(audio_files, start=1):
        siblings = by_stem[audio.stem]
        reasons = []
        caption = None
        text_file = siblings.get(".txt")
        if text_file is None:
            reasons.append(f"no caption file {audio.stem + '.txt'!r} for {audio.name!r}")
        else:
            try:
                caption = text_file.read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reasons.append(f"cannot read caption file {str(text_file)!r} ({exc})")
        image = next((siblings[s] for s in IMAGE_SUFFIXES if s in siblings), None)
        if image is None and has_images:
            reasons.append(f"no image file {audio.stem!r} + .jpg/.jpeg/.png for {audio.name!r}")
        if reasons:
            problems.append((number, "; ".join(reasons)))
        else:
            rows.append(Triplet(number, caption, audio, image))
    return rows, problems


def _read_image_folder(files: list[Path], by_stem: dict[str, dict[str, Path]]):
    """Rows of a folder of ``name.png`` + ``name.txt`` (no audio): numbered by sorted image-file name."""
    rows, problems = [], []
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    seen: set[str] = set()
    for number, image in enumerate(images, start=1):
        if image.stem in seen:  # a.png and a.jpg: one row, its first image by IMAGE_SUFFIXES order
            continue
        seen.add(image.stem)
        image = next(by_stem[image.stem][s] for s in IMAGE_SUFFIXES if s in by_stem[image.stem])
        text_file = by_stem[image.stem].get(".txt")
        if text_file is None:
            problems.append((number, f"no caption file {image.stem + '.txt'!r} for {image.name!r}"))
            continue
        try:
            caption = text_file.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append((number, f"cannot read caption file {str(text_file)!r} ({exc})"))
            continue
        rows.append(Triplet(number, caption, None, image))
    return rows, problems


# -------------------------------------------------------------------------------------------- validation


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_manifest`: usable rows and ``(row, reason)`` for the rest, by row."""

    good: list[Triplet]
    bad: list[tuple[int, str]]
    source: Path | None = None
    total: int = field(default=0)

    def summary(self) -> str:
        where = f"{str(self.source)!r}: " if self.source is not None else ""
        total = self.total or len(self.good) + len(self.bad)
        head = f"{where}{len(self.good)} of {total} rows are good, {len(self.bad)} bad"
        return head if not self.bad else head + ":\n" + _listing(self.bad)


def _listing(bad: Sequence[tuple[int, str]], limit: int = MAX_LISTED) -> str:
    lines = [f"  row {row}: {reason}" for row, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more bad rows")
    return "\n".join(lines)


def validate_manifest(path_or_rows: str | Path | Sequence[Triplet], *, policy: str = "error",
                      report: str | Path | None = None, require_image: bool = True, check_audio: bool = True,
                      check_images: bool = True, progress: bool = False, max_seconds: float | None = None,
                      overwrite: bool = False) -> ValidationReport:
    """Check every row and collect every problem (one ``bad`` entry per row, its problems joined by '; ').

    Checks: empty or whitespace-only caption; an exact duplicate (same caption, audio and image) of an
    earlier row; audio missing, a folder, empty (0 bytes), undecodable, truncated, zero-length, with an
    implausible header or with non-finite samples, or longer than ``max_seconds`` (``check_audio``); image
    absent (``require_image``), missing, a folder, unreadable or a decompression bomb (``check_images``).
    Rows ``read_manifest`` could not parse are bad too. A path is read with ``read_manifest``'s defaults;
    to pass ``format`` or ``columns``, read it first and pass the rows. No rows at all is an error.

    policy="error" raises :class:`ManifestError` listing every bad row (the first 50, then a count);
    policy="skip" warns with the count and returns the good rows. Either way, ``report`` (a ``.json``
    path) gets a JSON file ``{"manifest", "total", "good", "bad": [{"row", "reason", "caption", "audio",
    "image"}]}``, written atomically. ``report`` is checked before any row is: it must not be the
    manifest, and an existing file there is replaced only if it is an earlier report of this function
    or ``overwrite=True`` (else :class:`~melfusion.files.OutputExistsError`).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected 'error' or 'skip', got {policy!r}")
    if isinstance(path_or_rows, (str, Path)):
        rows = read_manifest(path_or_rows)
    elif isinstance(path_or_rows, Sequence):
        rows = path_or_rows
    else:
        raise ValueError(f"path_or_rows: expected a manifest path or a list of Triplets, "
                         f"got {type(path_or_rows).__name__}")
    source = getattr(rows, "source", None)
    problems = list(getattr(rows, "problems", []))
    if not rows and not problems:
        raise ManifestError("path_or_rows: no rows to validate" if source is None
                            else f"manifest: {str(source)!r} has no rows")
    if report is not None:
        report = check_output(report, "report", overwrite=overwrite or _is_report(Path(report)),
                              inputs=[source], suffixes=(".json",))
    bad: list[tuple[int, str]] = problems
    good: list[Triplet] = []
    by_row: dict[int, Triplet] = {}
    seen: dict[tuple, int] = {}
    iterator = rows
    if progress:
        from tqdm.auto import tqdm

        from ..progress import show_progress

        iterator = tqdm(rows, desc="validating", unit="row", disable=not show_progress())
    for triplet in iterator:
        if not isinstance(triplet, Triplet):
            raise ValueError(f"path_or_rows: expected Triplets, got a {type(triplet).__name__}")
        key = (repr(triplet.caption), str(triplet.audio), str(triplet.image))
        if key in seen:
            reasons = [f"duplicates row {seen[key]} (the same caption, audio and image)"]
        else:
            seen[key] = triplet.row
            reasons = row_problems(triplet, require_image, check_audio, check_images, max_seconds)
        if reasons:
            bad.append((triplet.row, "; ".join(reasons)))
            by_row[triplet.row] = triplet
        else:
            good.append(triplet)
    bad.sort(key=lambda item: item[0])
    result = ValidationReport(good=good, bad=bad, source=source, total=len(good) + len(bad))
    if report is not None:
        _write_report(report, result, by_row, overwrite)
    if bad and policy == "error":
        raise ManifestError(result.summary(), bad)
    if bad:
        where = f" in {str(source)!r}" if source is not None else ""
        saved = f"; see {str(report)!r}" if report is not None else ""
        warnings.warn(f"skipping {len(bad)} bad rows of {result.total}{where}{saved}", stacklevel=2)
    return result


#: what reading one row's files may raise; anything else is a bug, not a bad row
_ROW_ERRORS = (ValueError, OSError, RuntimeError, EOFError, Image.DecompressionBombError)


def row_problems(t: Triplet, require_image: bool, check_audio_files: bool, check_images: bool,
                 max_seconds: float | None = None) -> list[str]:
    """Every problem of one row's caption and files (empty when it is good); see :func:`validate_manifest`."""
    reasons = []
    if not isinstance(t.caption, str):
        reasons.append(f"caption is {_a(t.caption)}, not a string")
    elif not t.caption.strip():
        reasons.append("caption is empty")
    if check_audio_files and t.audio is not None:  # None: a test-set row without a reference
        try:
            problem = check_audio(t.audio, max_seconds=max_seconds)
        except _ROW_ERRORS as exc:
            problem = f"cannot be checked ({type(exc).__name__}: {_one_line(exc)})"
        if problem:
            reasons.append(f"audio {str(t.audio)!r} {problem}")
    if t.image is None:
        if require_image:
            reasons.append("no image given")
    elif check_images:
        problem = file_problem(t.image, "image file")
        if problem:
            reasons.append(f"image {str(t.image)!r} {problem}")
        else:
            try:
                open_image(t.image, "image")
            except Image.DecompressionBombError as exc:
                reasons.append(f"image: {str(t.image)!r} is too large to decode safely ({_one_line(exc)})")
            except _ROW_ERRORS as exc:
                reasons.append(_one_line(exc))
    return reasons


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


_REPORT_KEYS = {"manifest", "total", "good", "bad"}


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a report an earlier :func:`validate_manifest` wrote (so it may be replaced)."""
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and set(data) == _REPORT_KEYS and isinstance(data["bad"], list)


def _write_report(path: Path, result: ValidationReport, by_row: dict[int, Triplet], overwrite: bool) -> None:
    entries = []
    for row, reason in result.bad:
        t = by_row.get(row)
        entries.append({"row": row, "reason": reason,
                        "caption": t.caption if t else None,
                        "audio": str(t.audio) if t else None,
                        "image": str(t.image) if t and t.image else None})
    payload = {"manifest": str(result.source) if result.source is not None else None,
               "total": result.total, "good": len(result.good), "bad": entries}
    if path.exists() and not (overwrite or _is_report(path)):  # appeared while the rows were checked
        raise OutputExistsError(f"report: {str(path)!r} already exists; choose another path or pass "
                                "overwrite=True")
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate in a path: escape everything instead
        text = json.dumps(payload, indent=2)
    write_atomic(path, text + "\n", fsync=True)
