"""``melfusion data check | split``: what a manifest holds, and a reproducible train/val/test split of it.

:func:`check_manifest` reads a manifest with :func:`~melfusion.datasets.manifest.read_manifest`, checks every
row with :func:`~melfusion.datasets.manifest.validate_manifest` (the checks training runs), and summarises
the good rows: audio durations, sample rates and channels (from the file headers, ``soundfile.info``),
image sizes and modes (from the image headers), caption lengths, and how many images each clip has.

:func:`split_manifest` splits a manifest into two or three JSON-lines manifests. Rows are grouped (by the
audio file by default, so the several images of one Extended MusicCaps clip stay in one split), the groups
are sorted by a seeded hash of their path relative to the manifest's folder, and the sorted list is cut
into runs whose sizes are the ratios times the number of groups, rounded by largest remainder (so each
split is within one group of its share). The split depends only on the seed and the set of groups: not on
the row order, the folder the dataset lives in, or the machine. Each output row is the input row's
original record (every field), with its audio and image paths rewritten to resolve from the new file's
folder (a relative path stays relative, an absolute one is kept).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import statistics
import warnings
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

from ..files import check_output, write_atomic
from .manifest import DEFAULT_COLUMNS, MAX_LISTED, ManifestError, Triplet, read_manifest, validate_manifest

__all__ = [
    "check_manifest",
    "format_check",
    "split_manifest",
    "split_rows",
    "assign_groups",
    "split_paths",
    "parse_ratios",
    "check_ratios",
    "SplitResult",
    "SkippedRowsWarning",
    "add_data_parser",
    "GROUP_BY",
]

GROUP_BY = ("audio", "image", "row")
DEFAULT_NAMES = {2: ("train", "test"), 3: ("train", "val", "test")}
RATIO_TOLERANCE = 1e-3  # ratios summing to within this of 1 are normalised to sum to exactly 1
MAX_SYNTHETIC_ROWS = 1_000_000  # about 80 GB of clips and pictures: more is a typo, not a test set
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHOWN_COUNTS = 6  # distinct sizes / rates listed in the text report, then "and N more"
_SHOWN_SKIPPED = 10  # skipped rows named in split's warning line
_VALIDATION_WARNING = r"skipping \d+ bad rows"  # validate_manifest's own warning: this module reports instead
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (open_image applies them)


class SkippedRowsWarning(UserWarning):
    """:func:`split_manifest` left bad rows out of every split (they are listed on ``SplitResult.skipped``)."""


# ------------------------------------------------------------------------------------------------- check


def check_manifest(path: str | Path, *, format: str | None = None, columns: dict[str, str] | None = None,
                   require_image: bool = True, require_audio: bool = True, progress: bool = True) -> dict:
    """Validate every row of a manifest and summarise the good ones; a JSON-ready dict.

    Keys: ``manifest``, ``format``, ``rows`` ({total, good, bad}), ``bad`` ([{row, reason}], every bad row,
    by row number), ``audio`` (over distinct audio files: ``clips``, ``rows_without_audio``, ``seconds``
    {min, median, max, total}, ``sample_rates`` and ``channels`` {value: clips}, ``unknown`` (files whose
    header soundfile cannot read: decodable through librosa only), ``images_per_clip`` {max, mean}),
    ``images`` (over distinct image files: ``distinct``, ``rows_without_image``, ``sizes`` {"WxH": images},
    ``min_side``, ``max_side``, ``modes`` {mode: images}) and ``captions`` (over good rows: ``words`` and
    ``characters``, each {min, median, max}). A statistic over no values is None.

    ``require_audio=False`` checks a test set without references (rows may lack the audio field);
    ``require_image=False`` accepts rows without an image. An unreadable manifest raises
    :class:`~melfusion.datasets.manifest.ManifestError` naming it.
    """
    rows = _read_manifest(path, format=format, columns=columns, require_audio=require_audio)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_VALIDATION_WARNING)
        report = validate_manifest(rows, policy="skip", require_image=require_image, progress=progress)
    good = report.good
    return {
        "manifest": str(path),
        "format": _format_of(Path(path), format),
        "rows": {"total": report.total, "good": len(good), "bad": len(report.bad)},
        "bad": [{"row": row, "reason": reason} for row, reason in report.bad],
        "audio": _audio_summary(good),
        "images": _image_summary(good),
        "captions": {"words": _spread([len(t.caption.split()) for t in good]),
                     "characters": _spread([len(t.caption) for t in good])},
    }


def _read_manifest(path: str | Path, **kwargs) -> list[Triplet]:
    """:func:`read_manifest`, with any other ``ValueError`` it lets through (e.g. a JSON integer over
    Python's 4300-digit limit) as a :class:`ManifestError` naming the manifest."""
    _check_source(path)
    try:
        return read_manifest(path, **kwargs)
    except ManifestError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest: cannot read {str(path)!r} ({' '.join(str(exc).split())})") from None


def _check_source(path: str | Path) -> None:
    """A manifest path that names nothing (or a looping link) as a :class:`ManifestError` naming it."""
    if not str(path).strip():
        raise ManifestError(f"manifest: expected a file or folder path, got {str(path)!r}")
    if os.path.islink(path) and not os.path.exists(path):
        raise ManifestError(f"manifest: {str(path)!r} is a broken or looping symbolic link")


def _format_of(path: Path, format: str | None) -> str:
    """The format ``read_manifest`` used (it has already refused a suffix it cannot read)."""
    if format is not None:
        return format
    if path.is_dir():
        return "folder"
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def _spread(values: Sequence[float], total: bool = False) -> dict | None:
    """``{min, median, max}`` (and ``total``) of ``values``, or None when there are none."""
    if not values:
        return None
    out = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return {**out, "total": sum(values)} if total else out


def _counts(values) -> dict[str, int]:
    """``{str(value): count}``, most common first (ties in sorted order)."""
    counter = Counter(str(v) for v in values)
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _audio_summary(good: Sequence[Triplet]) -> dict:
    clips: dict[Path, set] = {}
    for t in good:
        if t.audio is not None:
            clips.setdefault(t.audio, set()).add(t.image)
    headers = [_audio_header(p) for p in clips]
    known = [h for h in headers if h is not None]
    per_clip = [len({i for i in images if i is not None}) for images in clips.values()]
    return {
        "clips": len(clips),
        "rows_without_audio": sum(t.audio is None for t in good),
        "seconds": _spread([h[0] for h in known], total=True),
        "sample_rates": _counts(h[1] for h in known),
        "channels": _counts(h[2] for h in known),
        "unknown": len(headers) - len(known),
        "images_per_clip": {"max": max(per_clip), "mean": sum(per_clip) / len(per_clip)} if per_clip else None,
    }


def _audio_header(path: Path) -> tuple[float, int, int] | None:
    """``(seconds, sample rate, channels)`` from the file's header, or None where soundfile cannot read it."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError, OSError):
        return None
    return info.frames / info.samplerate, int(info.samplerate), int(info.channels)


def _image_summary(good: Sequence[Triplet]) -> dict:
    images = list(dict.fromkeys(t.image for t in good if t.image is not None))
    headers = [h for h in (_image_header(p) for p in images) if h is not None]
    sides = [side for w, h, _ in headers for side in (w, h)]
    return {
        "distinct": len(images),
        "rows_without_image": sum(t.image is None for t in good),
        "sizes": _counts(f"{w}x{h}" for w, h, _ in headers),
        "min_side": min(sides) if sides else None,
        "max_side": max(sides) if sides else None,
        "modes": _counts(mode for _, _, mode in headers),
    }


def _image_header(path: Path) -> tuple[int, int, str] | None:
    """``(width, height, mode)`` as the image is used (EXIF rotation applied), read from its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                    w, h = h, w
                return w, h, im.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # validate_manifest has already opened it whole; a race with a deletion is not a bug


def format_check(report: dict) -> str:
    """The text ``melfusion data check`` prints for a :func:`check_manifest` report; its last line says
    whether every row is good."""
    rows, audio, images, captions = report["rows"], report["audio"], report["images"], report["captions"]
    lines = [f"manifest: {report['manifest']} ({report['format']})",
             f"rows: {rows['total']} total, {rows['good']} good, {rows['bad']} bad"]
    per_clip = audio["images_per_clip"]
    clips = f"clips: {audio['clips']} distinct audio files"
    if per_clip:
        clips += f", {per_clip['max']} images per clip at most ({per_clip['mean']:.2f} on average)"
    if audio["rows_without_audio"]:
        clips += f"; {audio['rows_without_audio']} rows without audio"
    lines.append(clips)
    images_line = f"images: {images['distinct']} distinct files"
    if images["rows_without_image"]:
        images_line += f"; {images['rows_without_image']} rows without an image"
    lines += [images_line, ""]
    table = [("", "min", "median", "max", "total"),
             _table_row("audio seconds", audio["seconds"], "{:.2f}"),
             _table_row("caption words", captions["words"], "{:g}"),
             _table_row("caption chars", captions["characters"], "{:g}")]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.append("")
    lines.append("sample rates: " + _shown_counts(audio["sample_rates"], " Hz"))
    lines.append("channels: " + _shown_counts(audio["channels"]))
    if audio["unknown"]:
        lines.append(f"  ({audio['unknown']} audio files have a header soundfile cannot read: not counted above)")
    sides = f"; sides {images['min_side']}..{images['max_side']} px" if images["min_side"] is not None else ""
    lines.append("image sizes: " + _shown_counts(images["sizes"]) + sides)
    lines.append("image modes: " + _shown_counts(images["modes"]))
    bad = report["bad"]
    if bad:
        lines += ["", "bad rows:"]
        lines.append(_listing([(b["row"], b["reason"]) for b in bad]))
        lines.append(f"{len(bad)} of {rows['total']} rows are bad: fix or remove them (exit status 2)")
    else:
        lines.append(f"all {rows['total']} rows are good")
    return "\n".join(lines)


def _table_row(label: str, spread: dict | None, fmt: str) -> tuple[str, ...]:
    if spread is None:
        return (label, "-", "-", "-", "")
    cells = [fmt.format(spread[k]) for k in ("min", "median", "max")]
    return (label, *cells, fmt.format(spread["total"]) if "total" in spread else "")


def _shown_counts(counts: dict[str, int], unit: str = "") -> str:
    if not counts:
        return "-"
    items = list(counts.items())
    text = ", ".join(f"{value}{unit} ({n})" for value, n in items[:_SHOWN_COUNTS])
    return text + (f" and {len(items) - _SHOWN_COUNTS} more" if len(items) > _SHOWN_COUNTS else "")


# ------------------------------------------------------------------------------------------------- split


def parse_ratios(text: str, name: str = "--ratios") -> tuple[float, ...]:
    """``"0.6,0.2,0.2"`` as a tuple of floats, checked by :func:`check_ratios` (errors name ``name``)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name}: expected 2 or 3 comma-separated numbers summing to 1, "
                         f"e.g. 0.6,0.2,0.2; got {text!r}") from None
    check_ratios(values, name)
    return values


def check_ratios(ratios: Sequence[float], name: str = "ratios") -> tuple[Fraction, ...]:
    """The ratios as exact fractions summing to 1, or a ValueError naming ``name``.

    Two or three finite, non-negative numbers whose sum is within :data:`RATIO_TOLERANCE` of 1 (so
    ``0.333,0.333,0.333`` is accepted); they are then divided by their sum, exactly.
    """
    expected = "2 or 3 finite non-negative numbers summing to 1, e.g. 0.6,0.2,0.2"
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not 2 <= len(ratios) <= 3:
        raise ValueError(f"{name}: expected {expected}; got {ratios!r}")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise ValueError(f"{name}: expected {expected}; got {list(ratios)!r} ({r!r} is not one)")
    total = math.fsum(ratios)
    if abs(total - 1.0) > RATIO_TOLERANCE:
        raise ValueError(f"{name}: expected {expected}; got {list(ratios)!r}, which sums to {total:g}")
    exact = [Fraction(repr(float(r))) for r in ratios]
    return tuple(f / sum(exact) for f in exact)


def _check_names(names: Sequence[str] | None, count: int, name: str = "names") -> tuple[str, ...]:
    if names is None:
        return DEFAULT_NAMES[count]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = tuple(names)
    if len(names) != count:
        raise ValueError(f"{name}: expected {count} split names, one per ratio; got {list(names)!r}")
    for n in names:
        if not isinstance(n, str) or not _NAME.match(n):
            raise ValueError(f"{name}: {n!r} is not a usable split name (letters, digits, '_' and '-')")
    if len({n.casefold() for n in names}) != len(names):  # one file on a case-insensitive disk
        raise ValueError(f"{name}: the split names must differ (ignoring case); got {list(names)!r}")
    return names


def _seeded_hash(label: str, seed: int) -> int:
    data = f"{seed}\x00{label}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _share(count: int, ratios: Sequence[Fraction]) -> list[int]:
    """``count`` split by ``ratios`` (exact, summing to 1) by largest remainder: each within one of its share."""
    quotas = [r * count for r in ratios]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[: count - sum(sizes)]:
        sizes[i] += 1
    return sizes


def assign_groups(labels, ratios: Sequence[float], seed: int = 0) -> dict[str, int]:
    """``{label: split index}`` for the distinct ``labels``: sorted by a seeded hash, then cut by ratio.

    The hash is BLAKE2b of the seed and the label, so the result depends only on the seed and the set of
    labels (not their order). Split ``i`` gets ``ratios[i] * len(labels)`` labels, rounded by largest
    remainder (ties to the earlier split).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    exact = check_ratios(ratios)
    order = sorted(set(labels), key=lambda s: (_seeded_hash(s, seed), s))
    out: dict[str, int] = {}
    start = 0
    for split, size in enumerate(_share(len(order), exact)):
        for label in order[start:start + size]:
            out[label] = split
        start += size
    return out


def _relative_label(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form (absolute where it cannot be relative)."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.as_posix()


def _group_label(t: Triplet, group_by: str, base: Path) -> str:
    """What ties rows together: the audio file (else the image), the image (else the audio), or the row."""
    order = {"audio": ("audio", "image"), "image": ("image", "audio"), "row": ()}[group_by]
    for kind in order:
        path = getattr(t, kind)
        if path is not None:
            return f"{kind}:{_relative_label(path, base)}"
    return f"row:{t.row}"


def split_rows(rows: Sequence[Triplet], ratios: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0, *,
               names: Sequence[str] | None = None, group_by: str = "audio", base: str | Path = ".",
               ) -> dict[str, list[Triplet]]:
    """``{name: rows}``: the rows split by :func:`assign_groups` over their groups, each split in row order.

    ``group_by`` "audio" keeps all rows of one audio file together (rows without audio are grouped by
    image), "image" keeps the rows of one image together (rows without one by audio), "row" does not
    group. Groups are labelled by their path relative to ``base`` (the manifest's folder), so the split
    does not depend on where the dataset lies. ``names`` defaults to train/val/test (train/test for 2).
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by: expected one of {', '.join(GROUP_BY)}, got {group_by!r}")
    names = _check_names(names, len(check_ratios(ratios)))
    base = Path(os.path.abspath(base))
    labels = [_group_label(t, group_by, base) for t in rows]
    where = assign_groups(labels, ratios, seed)
    out: dict[str, list[Triplet]] = {n: [] for n in names}
    for t, label in sorted(zip(rows, labels, strict=True), key=lambda pair: pair[0].row):
        out[names[where[label]]].append(t)
    return out


def split_paths(manifest: str | Path, names: Sequence[str], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Where :func:`split_manifest` writes each split: ``out_dir/NAME.jsonl``, or without ``out_dir``
    ``STEM.NAME.jsonl`` beside the manifest (for a folder manifest, beside the folder, named after it)."""
    if out_dir is not None:
        return {n: Path(out_dir) / f"{n}.jsonl" for n in names}
    manifest = Path(manifest)
    absolute = Path(os.path.abspath(manifest))
    stem = absolute.name if absolute.is_dir() else absolute.stem
    folder = absolute.parent if manifest.name in ("", "..") else manifest.parent  # "." and ".." name no file
    return {n: folder / f"{stem}.{n}.jsonl" for n in names}


class SplitResult(dict):
    """``{split name: list[Triplet]}`` from :func:`split_manifest`, in row order, plus what was done.

    ``paths``: the file written for each split (None for an empty split: nothing is written for it);
    ``groups``: the number of groups (clips) in each split; ``skipped``: ``(row, reason)`` of the bad
    rows left out; ``total``: the manifest's rows, good and bad; ``source``, ``seed``, ``ratios`` (as
    normalised floats) and ``group_by``.
    """

    def __init__(self, splits: dict[str, list[Triplet]], *, paths: dict[str, Path | None],
                 groups: dict[str, int], skipped: list[tuple[int, str]], total: int, source: Path, seed: int,
                 ratios: tuple[float, ...], group_by: str):
        super().__init__(splits)
        self.paths, self.groups, self.skipped, self.total = paths, groups, skipped, total
        self.source, self.seed, self.ratios, self.group_by = source, seed, ratios, group_by

    def summary(self) -> str:
        """One line per split: its rows, its groups and its file."""
        unit = "clip" if self.group_by == "audio" else "group"
        lines = []
        for name, rows in self.items():
            where = f"-> {self.paths[name]}" if self.paths[name] is not None else "(empty: no file written)"
            lines.append(f"{name}: {_plural(len(rows), 'row')}, {_plural(self.groups[name], unit)} {where}")
        return "\n".join(lines)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def split_manifest(path: str | Path, ratios: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                   names: Sequence[str] | None = None, out_dir: str | Path | None = None,
                   group_by: str = "audio", *, format: str | None = None, columns: dict[str, str] | None = None,
                   require_audio: bool = True, overwrite: bool = False) -> SplitResult:
    """Split a manifest into JSON-lines manifests, one per split (see the module docstring for how).

    Outputs go to :func:`split_paths` and are checked before anything is read: a file there is refused
    unless ``overwrite``, and the manifest itself is refused always. Each output row is the input row's
    original record (all its fields; CSV cells as strings) with the audio and image fields rewritten to
    resolve from the output's folder; a folder manifest gives ``{captions, location, img_path}`` records.
    An empty split gets no file. Rows that cannot be used (unparseable, an empty caption, an exact
    duplicate: what ``validate_manifest`` finds without opening files) are left out of every split with
    a :class:`SkippedRowsWarning`; the audio and image files are not opened (``check_manifest`` does that).
    """
    exact = check_ratios(ratios)
    names = _check_names(names, len(exact))
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by: expected one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    _check_source(path)
    source = Path(path)
    outputs = _check_outputs(source, names, exact, out_dir, overwrite, "out_dir")
    rows = _read_manifest(source, format=format, columns=columns, require_audio=require_audio)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_VALIDATION_WARNING)
        report = validate_manifest(rows, policy="skip", require_image=False, check_audio=False,
                                   check_images=False)
    if not report.good:
        shown = "; ".join(f"row {row} ({reason})" for row, reason in report.bad[:_SHOWN_SKIPPED])
        raise ManifestError(f"manifest: {str(source)!r} has no usable rows, nothing to split: {shown}"
                            + (" ..." if len(report.bad) > _SHOWN_SKIPPED else ""), report.bad)
    base = Path(os.path.abspath(source)) if source.is_dir() else Path(os.path.abspath(source)).parent
    splits = split_rows(report.good, ratios, seed, names=names, group_by=group_by, base=base)
    fmt = _format_of(source, format)
    fields = {**DEFAULT_COLUMNS, **(columns or {})}
    originals = None if fmt == "folder" else _original_records(source, fmt)
    paths: dict[str, Path | None] = {}
    for n, split in splits.items():
        if not split:
            paths[n] = None
            continue
        new_base = Path(os.path.abspath(outputs[n])).parent
        records = [_record(t, originals, fields, base, new_base, source) for t in split]
        write_atomic(outputs[n], "".join(_json_line(r) for r in records), overwrite=overwrite)
        paths[n] = outputs[n]
    groups = {n: len({_group_label(t, group_by, base) for t in split}) for n, split in splits.items()}
    if report.bad:
        warnings.warn(_skipped_line(report.bad, report.total, source), SkippedRowsWarning, stacklevel=2)
    return SplitResult(splits, paths=paths, groups=groups, skipped=list(report.bad), total=report.total,
                       source=source, seed=seed, ratios=tuple(float(r) for r in exact), group_by=group_by)


def _check_outputs(source: Path, names: Sequence[str], exact: Sequence[Fraction], out_dir: str | Path | None,
                   overwrite: bool, name: str) -> dict[str, Path]:
    """The split files, each checked by :func:`~melfusion.files.check_output` (a split with ratio 0 is
    never written, so its path is not checked)."""
    _check_source(source)
    if out_dir is not None and not str(out_dir).strip():
        raise ValueError(f"{name}: expected a folder path, got {str(out_dir)!r}")
    outputs = split_paths(source, names, out_dir)
    for n, r in zip(names, exact, strict=True):
        if r > 0:
            try:
                check_output(outputs[n], name, overwrite=overwrite, inputs=[source], suffixes=(".jsonl",))
            except RuntimeError as exc:  # Path.resolve on a looping link (Python < 3.13)
                raise ValueError(f"{name}: cannot write {str(outputs[n])!r} ({exc})") from None
    return outputs


def _listing(bad: Sequence[tuple[int, str]]) -> str:
    lines = [f"  row {row}: {reason}" for row, reason in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more bad rows")
    return "\n".join(lines)


def _skipped_line(bad: Sequence[tuple[int, str]], total: int, source: Path) -> str:
    shown = "; ".join(f"row {row} ({reason})" for row, reason in bad[:_SHOWN_SKIPPED])
    more = f"; and {len(bad) - _SHOWN_SKIPPED} more" if len(bad) > _SHOWN_SKIPPED else ""
    return f"skipped {_plural(len(bad), 'bad row')} of {total} in {str(source)!r}: {shown}{more}"


def _json_line(record: dict) -> str:
    try:
        line = json.dumps(record, ensure_ascii=False)
        line.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate somewhere in the record: escape everything
        line = json.dumps(record)
    return line + "\n"


def _read_text(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"manifest: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _original_records(path: Path, fmt: str) -> dict[int, dict]:
    """``{row number: original record}`` of a JSONL or CSV manifest, numbered as ``read_manifest`` numbers
    its rows (lines that do not parse are left out: they are bad rows, never written)."""
    data = _read_text(path)
    if fmt == "jsonl":
        if data.lstrip().startswith(b"["):
            records = json.loads(data.decode("utf-8"))
            return {i: r for i, r in enumerate(records, start=1) if isinstance(r, dict)}
        out = {}
        for number, raw in enumerate(data.split(b"\n"), start=1):
            try:
                record = json.loads(raw.rstrip(b"\r").decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                out[number] = record
        return out
    return _original_csv(data.decode("utf-8"))


def _original_csv(text: str) -> dict[int, dict]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader)]
    out, start = {}, reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return out
        except csv.Error:
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if len(record) == len(header):
            out[number] = dict(zip(header, record, strict=True))


def _record(t: Triplet, originals: dict[int, dict] | None, fields: dict[str, str], base: Path,
            new_base: Path, source: Path) -> dict:
    """Row ``t``'s original record with its audio and image fields made to resolve from ``new_base``."""
    if originals is None:  # a folder: the record is built from the files
        record: dict[str, Any] = {fields["caption"]: t.caption}
        for kind in ("audio", "image"):
            if getattr(t, kind) is not None:
                record[fields[kind]] = _relative_label(getattr(t, kind), base)
    else:
        record = dict(originals.get(t.row) or {})
    needed = [fields["caption"]] + [fields[k] for k in ("audio", "image") if getattr(t, k) is not None]
    if any(key not in record for key in needed):
        raise ManifestError(f"manifest: {str(source)!r} changed while it was being split (row {t.row} "
                            "is no longer the row it was); run the split again")
    for kind in ("audio", "image"):
        path, key = getattr(t, kind), fields[kind]
        if path is not None:
            record[key] = _rebased(str(record[key]).strip(), path, base, new_base)
    return record


def _rebased(value: str, resolved: Path, base: Path, new_base: Path) -> str:
    """``value`` (which resolves to ``resolved`` from ``base``) as a path that resolves from ``new_base``:
    an absolute or ``~`` path as it was, a relative one relative to ``new_base``."""
    if Path(value).expanduser().is_absolute():
        return value
    if new_base == base:
        return value
    return _relative_label(resolved, new_base)


# --------------------------------------------------------------------------------------------------- CLI


def add_data_parser(sub) -> None:
    """Add ``melfusion data check``, ``split`` and ``synthetic`` to the CLI's subparsers ``sub``."""
    add_data_arguments(sub.add_parser("data", help="check a manifest, or split it into train/val/test "
                                                   "(docs/datasets.md)"))


def add_data_arguments(d) -> None:
    """Add ``check``, ``split`` and ``synthetic`` to the ``melfusion data`` parser ``d``."""
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="{check,split,synthetic}")
    formats = ["jsonl", "csv", "folder"]

    c = dsub.add_parser("check", help="validate every row; print counts, durations, rates, sizes, bad rows")
    c.add_argument("manifest", help="JSON lines (.jsonl/.json), CSV, or a folder of name.wav/.png/.txt")
    c.add_argument("--format", choices=formats, default=None, help="default: from the suffix")
    c.add_argument("--no-audio", action="store_true", help="a test set: rows may have no audio (reference)")
    c.add_argument("--no-image-required", action="store_true", help="accept rows without an image")
    c.add_argument("--json", default=None, metavar="OUT.json", help="also write the report as JSON here")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    c.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    c.set_defaults(func=_run_check)

    s = dsub.add_parser("split", help="split into train/val/test manifests, keeping each clip's rows together")
    s.add_argument("manifest", help="JSON lines (.jsonl/.json), CSV, or a folder of name.wav/.png/.txt")
    s.add_argument("--ratios", default="0.6,0.2,0.2", help="2 or 3 comma-separated shares summing to 1")
    s.add_argument("--seed", type=int, default=0, help="the split's seed (the same seed, the same split)")
    s.add_argument("--names", default=None, help="split names (default train,val,test; train,test for 2)")
    s.add_argument("--out-dir", default=None,
                   help="write NAME.jsonl here (default: STEM.NAME.jsonl beside the manifest)")
    s.add_argument("--group-by", choices=list(GROUP_BY), default="audio",
                   help="rows sharing this file stay in one split (default audio: one clip, all its images)")
    s.add_argument("--format", choices=formats, default=None, help="default: from the suffix")
    s.add_argument("--no-audio", action="store_true", help="a test set: rows may have no audio")
    s.add_argument("--overwrite", action="store_true", help="replace existing split files (never the input)")
    s.set_defaults(func=_run_split)

    y = dsub.add_parser("synthetic", help="write a synthetic-world test set (docs/mini.md): pictures, captions, clips")
    y.add_argument("folder", help="a new or empty folder for manifest.jsonl, images/ and audio/")
    y.add_argument("--rows", type=int, default=96, help="rows (default 96: each attribute combination twice)")
    y.add_argument("--seed", type=int, default=1000, help="default 1000: the mini recipe's held-out seed")
    y.add_argument("--start", type=int, default=100_000, help="first item number (default: the held-out items)")
    y.add_argument("--families", default=None,
                   help="picture families, comma-separated, cycled in blocks of 8 rows (e.g. triangle,photo; "
                        "'heldout' for the generalisation test's five; default: the classic discs)")
    y.add_argument("--sizes", default=None,
                   help="picture sizes WxH, comma-separated, cycled after the families (e.g. 160x120,40x90; "
                        "'heldout' for the generalisation test's three; default: 64x64)")
    y.add_argument("--jpeg", type=int, default=None, help="save every picture as a JPEG of this quality (1-95)")
    y.add_argument("--augment", action="store_true",
                   help="training pictures: random families, sizes, saturations and JPEG compression")
    y.set_defaults(func=_run_synthetic)


def _synthetic_families(text: str | None) -> list[str] | None:
    from .synthetic import HELDOUT_FAMILIES, PICTURE_FAMILIES

    if text is None:
        return None
    if text.strip() == "heldout":
        return list(HELDOUT_FAMILIES)
    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in PICTURE_FAMILIES]
    if bad:
        raise ValueError(f"--families: unknown family {bad[0]!r}; expected some of "
                         f"{', '.join(PICTURE_FAMILIES)} or 'heldout'")
    return names


def _synthetic_sizes(text: str | None) -> list[tuple[int, int]] | None:
    from .synthetic import HELDOUT_SIZES

    if text is None:
        return None
    if text.strip() == "heldout":
        return list(HELDOUT_SIZES)
    sizes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d{1,4})\s*x\s*(\d{1,4})\s*", part)
        if not match or not all(8 <= int(g) <= 4096 for g in match.groups()):
            raise ValueError(f"--sizes: expected WxH pairs of 8-4096 pixels such as 160x120, got {part.strip()!r}")
        sizes.append((int(match.group(1)), int(match.group(2))))
    return sizes


def _run_synthetic(args) -> int:
    from .synthetic import write_synthetic_manifest

    if not args.folder.strip():
        raise ValueError(f"folder: expected a folder path, got {args.folder!r}")
    folder = Path(args.folder)
    if os.path.lexists(folder) and (not folder.is_dir() or any(folder.iterdir())):  # a link pointing nowhere too
        raise ValueError(f"folder: {str(folder)!r} exists and is not an empty folder; give a new one")
    for parent in folder.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ValueError(f"folder: {str(parent)!r} is not a folder, so {str(folder)!r} cannot be made")
            break
    if not 1 <= args.rows <= MAX_SYNTHETIC_ROWS:
        raise ValueError(f"--rows: expected a number from 1 to {MAX_SYNTHETIC_ROWS}, got {args.rows}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {args.seed}")
    if args.start < 0:
        raise ValueError(f"--start: expected a non-negative integer, got {args.start}")
    if args.jpeg is not None and not 1 <= args.jpeg <= 95:
        raise ValueError(f"--jpeg: expected a quality from 1 to 95, got {args.jpeg}")
    families, sizes = _synthetic_families(args.families), _synthetic_sizes(args.sizes)
    try:
        path = write_synthetic_manifest(folder, n=args.rows, seed=args.seed, start=args.start, families=families,
                                        sizes=sizes, jpeg_quality=args.jpeg, augment=args.augment)
    except OSError as exc:
        if not exc.strerror:
            raise
        raise OSError(f"folder: cannot write {str(folder)!r} ({exc.strerror}: {exc.filename})") from None
    print(f"wrote {path} ({args.rows} rows)")
    return 0


def _run_check(args) -> int:
    out = None
    _check_source(args.manifest)
    if args.json is not None:
        try:
            out = check_output(args.json, "--json", overwrite=args.overwrite, inputs=[args.manifest],
                               suffixes=(".json",))
        except RuntimeError as exc:  # Path.resolve on a looping link (Python < 3.13)
            raise ValueError(f"--json: cannot write {args.json!r} ({exc})") from None
    report = check_manifest(args.manifest, format=args.format, require_image=not args.no_image_required,
                            require_audio=not args.no_audio, progress=not args.no_progress)
    if out is not None:
        text = json.dumps(report, indent=2, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(report, indent=2)
        write_atomic(out, text + "\n", overwrite=args.overwrite)
    print(format_check(report))
    if out is not None:
        print(f"wrote {out}")
    return 2 if report["bad"] else 0


def _run_split(args) -> int:
    import sys

    _check_source(args.manifest)
    ratios = parse_ratios(args.ratios, "--ratios")
    names = _check_names(args.names, len(ratios), "--names")
    _check_outputs(Path(args.manifest), names, check_ratios(ratios), args.out_dir, args.overwrite, "--out-dir")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRowsWarning)  # printed below, with every reason
        result = split_manifest(args.manifest, ratios, args.seed, names, args.out_dir, args.group_by,
                                format=args.format, require_audio=not args.no_audio, overwrite=args.overwrite)
    if result.skipped:
        print(f"warning: skipped {_plural(len(result.skipped), 'bad row')} of {result.total} in {str(result.source)!r} "
              "(in no split; `melfusion data check` checks the files too):", file=sys.stderr)
        print(_listing(result.skipped), file=sys.stderr)
    print(f"split {str(result.source)!r} with seed {result.seed}, ratios "
          f"{','.join(f'{r:g}' for r in result.ratios)}, grouped by {result.group_by}:")
    print(result.summary())
    return 0
