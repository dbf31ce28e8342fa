"""The captions and images of generated clips, from a MeLFusion/Tango manifest.

Rows come from :func:`melfusion.datasets.read_manifest` (``captions``,
``location`` (the audio path) and, for IMSM, ``img_path``; relative paths
are relative to the manifest's folder). Generated files are
matched to rows by the stem of ``location`` (``out/gen/abc.wav`` <-> a row
whose ``location`` is ``audio/abc.flac``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..datasets.audio import file_problem

__all__ = ["ManifestRow", "read_manifest", "match_manifest"]


@dataclass(frozen=True)
class ManifestRow:
    stem: str
    caption: str
    location: Path
    image: Path | None


def read_manifest(path: str | os.PathLike) -> dict[str, ManifestRow]:
    """Rows by the stem of their audio path; a ``ValueError`` naming the manifest and row on bad input.

    Any manifest that :func:`melfusion.datasets.read_manifest` reads works
    (JSON lines, CSV, a folder of matching files). ``captions`` may be a string or a list of strings, of
    which the first is used (docs/evaluation.md); an empty or whitespace caption, an empty manifest and
    two rows with the same audio stem are errors.
    """
    from ..datasets import read_manifest as read_rows

    path = Path(path)
    triplets = read_rows(path)
    if triplets.problems:
        listed = "; ".join(f"row {row}: {why}" for row, why in triplets.problems[:10])
        raise ValueError(f"manifest {str(path)!r}: {listed}")
    rows: dict[str, ManifestRow] = {}
    for t in triplets:
        where = f"manifest {str(path)!r} row {t.row}"
        if not t.caption.strip():
            raise ValueError(f"{where}: the caption is empty")
        stem = t.audio.stem
        if stem in rows:
            raise ValueError(f"{where}: the audio stem {stem!r} appears twice (rows are matched by stem)")
        rows[stem] = ManifestRow(stem, t.caption, t.audio, t.image)
    if not rows:
        raise ValueError(f"manifest: {str(path)!r} has no rows")
    return rows


def match_manifest(files: list[Path], rows: dict[str, ManifestRow], need_images: bool = False) -> list[ManifestRow]:
    """The row of each file (same order); a ``ValueError`` lists files with no row or rows with no image."""
    missing = [f.name for f in files if f.stem not in rows]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"manifest: no row whose 'location' has the stem of these generated files: {shown}")
    matched = [rows[f.stem] for f in files]
    if need_images:
        no_image = [r.stem for r in matched if r.image is None]
        if no_image:
            raise ValueError(f"manifest: IMSM needs an 'img_path' for every generated file; missing for "
                             f"{', '.join(no_image[:10])}" + (f" ... ({len(no_image)} in all)" if len(no_image) > 10 else ""))
        absent = [f"{str(r.image)!r} {why}" for r in matched if (why := file_problem(r.image, "image file"))]
        if absent:
            raise ValueError(f"manifest: image files not usable: {'; '.join(absent[:10])}"
                             + (f" ... ({len(absent)} in all)" if len(absent) > 10 else ""))
    return matched
