"""Generating a whole test set: one audio file per manifest row and sample, resumable, on many processes.

:func:`generate_manifest` (``melfusion generate --manifest M --out-dir D``) reads a manifest in any format
training reads (JSONL, CSV, a folder; ``captions``, ``img_path`` and optionally ``location``, the reference
clip), and writes into ``D``:

- ``ROW_ID.wav`` (``ROW_ID_k.wav`` for ``num_samples > 1``) per row. The row id is the reference clip's file
  stem when the row has one (unique in the manifest), else ``row-N`` (N the manifest row number); rows that
  share one clip (several images per clip, as in Extended MusicCaps) get the image's stem appended; an id
  already taken (also in another letter case) gets ``__row-N``, and an id over :data:`MAX_ID` characters is
  cut, with a hash of the whole appended (so file names stay under the filesystem's limit).
- ``generations.jsonl``: one provenance record per file, in manifest order (:data:`RECORD_FIELDS`).
- ``.melfusion/records/FILE.json``: the same record per file, written (atomically) just *before* its audio
  file, so a killed run leaves complete files with a record, or records without their file (generated again),
  never a file without its record. ``generations.jsonl`` is rebuilt from them at the end of every run.

Determinism: every clip's starting noise comes from its own generator, seeded by :func:`row_seed` from the
run's seed, the row id and the sample index. Rows are grouped into fixed batches by manifest position
(batch ``k`` holds rows ``k*B .. k*B+B-1``, bad rows left out), and the processes take whole batches in turn
(``k % num_processes``), so the batch a row is generated in does not depend on the number of processes, on
which rows an earlier run finished, or on the order of work. The same manifest, model, settings, batch size,
machine and number of threads therefore give the same bytes, whether the set was made in one run, by a run
killed and started again, or by several processes. (A different batch size changes the floating-point
round-off of a batch, and the batch is part of the recorded settings.)

A second run skips every file that is complete (its record matches the run's settings, its row's caption
and image, and the file's hash); a file whose record was made with other settings, another model or another
version of its row (caption or image changed), or an audio file with no record (not written by this
function), is refused before any work unless ``overwrite=True``. So is, even with ``overwrite``, an output
path that is an input (``generations.jsonl`` as the manifest, an image or reference where a file would go)
or a folder, and a ``generations.jsonl`` this function did not write is refused unless ``overwrite``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import NonFiniteError, positive_int
from .files import OutputExistsError, same_file, write_atomic

__all__ = ["BatchRow", "BatchReport", "generate_manifest", "plan_rows", "row_seed", "model_digest",
           "read_generations", "collect_generations", "generation_settings", "RECORD_FIELDS", "GENERATIONS",
           "settings_key"]

GENERATIONS = "generations.jsonl"
RECORDS = Path(".melfusion") / "records"
#: the fields of every provenance record (generations.jsonl)
RECORD_FIELDS = ("file", "row_id", "row", "sample", "caption", "text", "image", "image_sha256", "reference",
                 "seed", "model", "settings", "melfusion_version", "audio_sha256", "sample_rate", "seconds")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class BatchRow:
    """One row to generate: its position, manifest row number, stable id, caption, image and reference."""

    index: int
    row: int
    row_id: str
    caption: str
    image: Path | None
    reference: Path | None


@dataclass
class BatchReport:
    """What :func:`generate_manifest` did. ``bad`` lists ``(row number, reason)`` of the rows skipped."""

    out_dir: Path
    rows: int
    files: list[Path] = field(default_factory=list)  # every file of the set this process is responsible for
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # complete already
    bad: list[tuple[int, str]] = field(default_factory=list)
    generations: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        head = (f"{len(self.written)} files written, {len(self.skipped)} complete already, "
                f"{len(self.bad)} bad rows skipped, of {self.rows} rows")
        if not self.bad:
            return head
        listed = [f"  row {row}: {why}" for row, why in self.bad[:50]]
        if len(self.bad) > 50:
            listed.append(f"  ... and {len(self.bad) - 50} more bad rows")
        return head + "\n" + "\n".join(listed)


def row_seed(seed: int, row_id: str, sample: int = 0) -> int:
    """The seed of one clip: a hash of the run's seed, the row id and the sample index (63 bits)."""
    digest = hashlib.sha256(f"melfusion-row-seed:{int(seed)}:{row_id}:{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def real_path(path: str | os.PathLike) -> Path:
    """``path`` with every link resolved; a looping link stays as it is (``Path.resolve`` raises on one)."""
    return Path(os.path.realpath(os.path.expanduser(path)))


#: the longest row id: its file names (``ID_4095.wav``, ``ID.json``) and their temporaries
#: (``.NAME.XXXXXXXX.tmp``) stay well under the 255-byte limit of common filesystems
MAX_ID = 160


def _shorten(text: str, limit: int) -> str:
    """``text`` itself when short enough, else its start and a hash of the whole (so long ids stay distinct)."""
    if len(text) <= limit:
        return text
    return text[:limit - 9].rstrip("._") + "-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _safe_id(text: str) -> str:
    cleaned = _SAFE.sub("_", text).strip("._") or "row"
    return _shorten(cleaned, 120)


def plan_rows(triplets: Sequence[Any]) -> list[BatchRow]:
    """Stable, unique, file-name-safe row ids for manifest rows (see the module docstring)."""
    stems: dict[str, int] = {}
    for t in triplets:
        if t.audio is not None:
            stems[_safe_id(t.audio.stem)] = stems.get(_safe_id(t.audio.stem), 0) + 1
    planned, taken = [], set()
    for index, t in enumerate(triplets):
        if t.audio is None:
            rid = f"row-{t.row}"
        else:
            rid = _safe_id(t.audio.stem)
            if stems[rid] > 1:  # one clip, several images: the image tells the rows apart
                rid = f"{rid}__{_safe_id(t.image.stem) if t.image is not None else f'row-{t.row}'}"
        rid = _shorten(rid, MAX_ID)
        # unique, also where file names are case-insensitive (macOS, Windows); the row number makes it so,
        # and the loop covers an id that an earlier row already took in its suffixed form
        base, n = rid, 0
        while rid.casefold() in taken:
            n += 1
            rid = _shorten(f"{base}__row-{t.row}" + (f"-{n}" if n > 1 else ""), MAX_ID)
        taken.add(rid.casefold())
        planned.append(BatchRow(index, t.row, rid, t.caption, t.image, t.audio))
    return planned


def _file_names(rid: str, samples: int) -> list[str]:
    return [f"{rid}.wav"] if samples == 1 else [f"{rid}_{k}.wav" for k in range(samples)]


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes (:func:`melfusion.metrics.audio.file_sha256`)."""
    from .metrics.audio import file_sha256

    return file_sha256(path)


def model_digest(model: Any) -> str:
    """sha256 over every tensor the model holds (parts and synapse, names sorted): which weights made a file."""
    import torch

    h = hashlib.sha256()
    parts = {name: getattr(model, name, None) for name in
             ("feature_source", "denoiser", "text_encoder", "codec", "vocoder", "synapse")}
    for name, part in parts.items():
        if not isinstance(part, torch.nn.Module):
            continue
        for key, tensor in sorted(part.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def generation_settings(model: Any, *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                        image_guidance_scale: float | None = None, scheduler: str | None = None,
                        seconds: float | None = None, num_samples: int | None = None, image_steps: int | None = None,
                        negative_text: str = "", alpha: float | None = None, text: str | None = None,
                        batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Every setting that shapes a generated file, with the model config's defaults filled in (JSON-ready)."""
    s = model.config.sampling
    use_image = model.synapse is not None
    return {
        "num_inference_steps": int(num_inference_steps if num_inference_steps is not None else s.num_inference_steps),
        "guidance_scale": float(guidance_scale if guidance_scale is not None else s.guidance_scale),
        "image_guidance_scale": (None if not use_image else _float_or_none(
            image_guidance_scale if image_guidance_scale is not None else s.image_guidance_scale)),
        "scheduler": scheduler if scheduler is not None else (s.scheduler or "default"),
        "seconds": float(seconds if seconds is not None else s.seconds),
        "num_samples": int(num_samples if num_samples is not None else s.num_samples),
        "image_steps": _int_or_none(image_steps if image_steps is not None else s.image_steps),
        "negative_text": negative_text,
        "alpha": _float_or_none(alpha),  # None: the trained synapse weights; a number: every weight forced to it
        "text": text,  # None: each row's caption; a string (e.g. "" for image only): every row's text
        "batch_size": int(batch_size),
        "seed": int(seed),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device_type": model.device.type,
        "peak_normalize": True,
    }


def _float_or_none(value: Any) -> Any:
    """A number as a float (``2`` and ``2.0`` are one setting); anything else as it is, for the checks."""
    is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    return float(value) if is_number else value


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value


def _mapping(value: Any) -> dict:
    """A record's ``settings`` or ``model`` as a dict (a hand-edited record may hold anything there)."""
    return dict(value) if isinstance(value, Mapping) else {}


def settings_key(record: Mapping[str, Any]) -> str:
    """What two files must share to be compared: the settings and the model weights (as one string)."""
    settings = record.get("settings")
    settings = dict(settings) if isinstance(settings, Mapping) else settings or {}
    return json.dumps({"settings": settings, "weights": _mapping(record.get("model")).get("weights_sha256")},
                      sort_keys=True, default=repr)


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if not isinstance(old.get("settings"), Mapping) or not isinstance(old.get("model"), Mapping):
        return "its record's settings or model is not an object: edited by hand?"
    a, b = _mapping(old.get("settings")), _mapping(new.get("settings"))
    diffs = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if _mapping(old.get("model")).get("weights_sha256") != _mapping(new.get("model")).get("weights_sha256"):
        diffs.append("other model weights")
    return ", ".join(diffs) or "other settings"


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    data = wave.T if wave.ndim == 2 else wave
    sf.write(buf, data, int(sample_rate), subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _read_json(path: Path) -> dict | None:
    if not path.is_file():  # a pipe would block the read; a folder is not a record
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _dist_state():
    """``(process index, number of processes, barrier)`` under ``accelerate launch`` / torchrun, else (0, 1, noop)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes, state.wait_for_everyone


def _check_rows(model: Any, planned: list[BatchRow]) -> dict[int, str]:
    """Bad rows by position: an empty caption, or (for a model with a synapse) a missing or unreadable image;
    the checks :func:`~melfusion.datasets.validate_manifest` makes, without the audio (a reference is optional)."""
    from .datasets.manifest import Triplet, row_problems

    bad = {}
    needs_image = model.synapse is not None
    for row in planned:
        reasons = row_problems(Triplet(row.row, row.caption, None, row.image), require_image=needs_image,
                               check_audio_files=False, check_images=needs_image)
        if reasons:
            bad[row.index] = "; ".join(reasons)
    return bad


def generate_manifest(
    model: Any,
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 1,
    seed: int = 0,
    num_samples: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    scheduler: str | None = None,
    seconds: float | None = None,
    image_steps: int | None = None,
    negative_text: str = "",
    alpha: float | None = None,
    text: str | None = None,
    format: str | None = None,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    process_index: int | None = None,
    num_processes: int | None = None,
) -> BatchReport:
    """Generate one WAV per row (and sample) of ``manifest`` into ``out_dir``; see the module docstring.

    ``alpha`` forces every synapse weight (0: the text-only path of the same weights); ``text`` replaces every
    row's caption (``""``: image only). ``limit`` takes the first rows only. ``process_index`` and
    ``num_processes`` default to the ``accelerate launch`` environment (1 process without it). Bad rows are
    reported in ``BatchReport.bad`` and skipped; the manifest itself unreadable, or an output that is an
    input, is a ``ValueError``.
    """
    import time

    from . import __version__
    from .datasets.manifest import ManifestError, read_manifest

    start_time = time.perf_counter()
    batch_size = positive_int(batch_size, "batch_size", high=4096)
    if limit is not None:
        limit = positive_int(limit, "limit")
    if num_samples is not None:
        num_samples = positive_int(num_samples, "num_samples", high=4096)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if alpha is not None and model.synapse is None:
        raise ValueError("alpha: this model has no synapse (no image path) to force")
    if alpha is not None:
        _check_alpha(model, alpha)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text: expected a string (every row's text) or None, got {type(text).__name__}")
    for name, value in (("out_dir", out_dir), ("manifest", manifest)):
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ValueError(f"{name}: expected a path, got {value!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} is a file; give a folder")
    manifest = Path(manifest)
    try:
        read = read_manifest(manifest, format=format, columns=columns, require_audio=False)
    except ManifestError as exc:
        raise ValueError(str(exc)) from None
    if manifest.is_dir() and out.exists() and same_file(manifest, out):
        raise ValueError("out_dir: the manifest folder itself; generated files must go to another folder")
    # ids are planned over the whole manifest, so that a row's file name does not depend on ``limit`` (a row
    # sharing its clip with a later row is CLIP__IMAGE whether or not that row is taken)
    planned = plan_rows(list(read))[:limit]
    last = planned[-1].row if planned else 0
    problems = [p for p in read.problems if limit is None or p[0] <= last]
    inputs = {str(real_path(p)) for r in planned for p in (r.image, r.reference) if p is not None}
    inputs.add(str(real_path(manifest)))
    settings = generation_settings(
        model, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale, scheduler=scheduler, seconds=seconds, num_samples=num_samples,
        image_steps=image_steps, negative_text=negative_text, alpha=alpha, text=text, batch_size=batch_size,
        seed=seed)
    samples = positive_int(settings["num_samples"], "num_samples", high=4096)  # the config's count too
    bad_by_index = _check_rows(model, planned)
    bad = sorted(list(problems) + [(planned[i].row, why) for i, why in bad_by_index.items()])
    good = [r for r in planned if r.index not in bad_by_index]
    names = {r.index: _file_names(r.row_id, samples) for r in good}
    for files in names.values():
        for name in files:
            if str(real_path(out / name)) in inputs:
                raise ValueError(f"out_dir: {str(out / name)!r} is an input of this run (an image, a reference or "
                                 "the manifest); choose another --out-dir")
    own = [real_path(out / GENERATIONS), real_path(out / RECORDS.parent)]  # generations.jsonl, the records folder
    for source in sorted(inputs):
        if Path(source) == own[0] or Path(source).is_relative_to(own[1]):
            raise ValueError(f"out_dir: {source!r} is an input of this run (the manifest, an image or a reference) "
                             f"that this run would write over ({GENERATIONS} or {RECORDS.parent}/); choose another "
                             "--out-dir")
    _check_out_dir(out, overwrite)
    rank, world, barrier = _dist_state()
    rank = rank if process_index is None else int(process_index)
    world = world if num_processes is None else positive_int(num_processes, "num_processes")
    if not 0 <= rank < world:
        raise ValueError(f"process_index: expected 0 <= index < {world}, got {rank}")

    # fixed batches by manifest position (bad rows left out), whole batches per process
    batches: list[list[BatchRow]] = []
    for k in range(0, len(planned), batch_size):
        chunk = [r for r in planned[k:k + batch_size] if r.index not in bad_by_index]
        if chunk:
            batches.append(chunk)
    mine = [b for j, b in enumerate(batches) if j % world == rank]

    weights = model_digest(model)
    model_info = {"name_or_path": model_name or model.config.name, "config_name": model.config.name,
                  "weights_sha256": weights}
    records_dir = out / RECORDS
    probe = {"settings": settings, "model": model_info}

    # decide, before any work, which of my files are done, missing, or refused
    todo: list[tuple[list[BatchRow], list[bool]]] = []
    report = BatchReport(out_dir=out, rows=len(planned) + len(problems), bad=bad)
    image_hashes: dict[int, str | None] = {}

    def image_hash(r: BatchRow) -> str | None:
        if r.index not in image_hashes:
            image_hashes[r.index] = sha256_file(r.image) if r.image is not None else None
        return image_hashes[r.index]

    for b in mine:
        need = []
        for r in b:
            for name in names[r.index]:
                path, rec_path = out / name, records_dir / (Path(name).stem + ".json")
                report.files.append(path)
                for target in (path, rec_path):
                    if os.path.lexists(target) and not target.is_symlink() and not target.is_file():
                        raise OutputExistsError(f"out_dir: {str(target)!r} is a folder or a special file, not one "
                                                "this command writes; it is kept: move it, or use another --out-dir")
                record = _read_json(rec_path) if rec_path.exists() else None
                if record is not None and settings_key(record) != settings_key(probe):
                    if not overwrite:
                        raise OutputExistsError(
                            f"out_dir: {str(path)!r} was made with other settings ({_describe_difference(record, probe)});"
                            " use another --out-dir, or --overwrite to replace it")
                    record = None
                if record is not None and (record.get("caption") != r.caption or
                                           record.get("image_sha256") != image_hash(r)):
                    if not overwrite:
                        what = "caption" if record.get("caption") != r.caption else "image"
                        raise OutputExistsError(
                            f"out_dir: {str(path)!r} was made from another version of manifest row {r.row} (its "
                            f"{what} has changed since); use another --out-dir, or --overwrite to replace it")
                    record = None
                if os.path.lexists(path):
                    if record is not None and path.is_file() and sha256_file(path) == record.get("audio_sha256"):
                        need.append(False)
                        report.skipped.append(path)
                        continue
                    if not overwrite:
                        why = "has no provenance record" if record is None else "differs from its provenance record"
                        raise OutputExistsError(f"out_dir: {str(path)!r} {why} (not written by an earlier run with "
                                                "these settings); it is kept: use another --out-dir, or --overwrite")
                need.append(True)
                _remove_own_temporaries(path, rec_path)
        if any(need):
            todo.append((b, need))

    from tqdm.auto import tqdm

    from .progress import show_progress

    total_rows = sum(len(b) for b, _ in todo)
    bar = tqdm(total=total_rows, desc="generate" if world == 1 else f"generate [{rank}/{world}]", unit="row",
               disable=not show_progress(progress), file=sys.stderr, dynamic_ncols=True, position=rank if world > 1 else None)
    forcing = model.synapse.mixer.forced(settings["alpha"]) if alpha is not None else nullcontext()
    try:
        with forcing:
            for b, need in todo:
                import torch

                generators = [torch.Generator(device="cpu").manual_seed(row_seed(seed, r.row_id, k))
                              for r in b for k in range(samples)]
                texts = [r.caption if text is None else text for r in b]
                output = model.generate(
                    image=[str(r.image) for r in b] if model.synapse is not None else None, text=texts,
                    num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                    image_guidance_scale=settings["image_guidance_scale"], scheduler=scheduler,
                    seconds=settings["seconds"], num_samples=samples, image_steps=image_steps,
                    negative_text=negative_text, generator=generators, progress=False)
                waves = output.waveforms
                j = 0
                for r, caption in zip(b, texts, strict=True):
                    for k, name in enumerate(names[r.index]):
                        if need[j]:
                            if not np.isfinite(waves[j]).all():
                                raise NonFiniteError(f"row {r.row}: the generated clip holds NaN or infinite samples;"
                                                     " nothing was written for it")
                            data = _wav_bytes(waves[j], output.sample_rate)
                            record = {
                                "file": name, "row_id": r.row_id, "row": r.row, "sample": k,
                                "caption": r.caption, "text": caption,
                                "image": str(r.image) if r.image is not None else None,
                                "image_sha256": image_hash(r),
                                "reference": str(r.reference) if r.reference is not None else None,
                                "manifest": str(real_path(manifest)),
                                "seed": row_seed(seed, r.row_id, k), "model": model_info, "settings": settings,
                                "melfusion_version": __version__, "audio_sha256": hashlib.sha256(data).hexdigest(),
                                "sample_rate": int(output.sample_rate),
                                "seconds": round(waves[j].shape[-1] / output.sample_rate, 6),
                            }
                            write_atomic(records_dir / (Path(name).stem + ".json"),
                                         json.dumps(record, ensure_ascii=False, indent=1) + "\n")
                            write_atomic(out / name, data)
                            report.written.append(out / name)
                        j += 1
                bar.update(len(b))
    finally:
        bar.close()
    barrier()
    if rank == 0:
        report.generations = collect_generations(out, [n for r in good for n in names[r.index]])
    report.seconds = time.perf_counter() - start_time
    return report


def _check_alpha(model: Any, alpha: Any) -> None:
    """``alpha`` as the model's mixer takes it (a finite number in its range), or a ValueError naming alpha."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not np.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
    try:
        with model.synapse.mixer.forced(float(alpha)):
            pass
    except ValueError as exc:
        raise ValueError(f"alpha: {str(exc).removeprefix('value: ')}") from None


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an out-dir this function could not write, or whose ``generations.jsonl`` it did
    not write (a user's file of that name, a folder, a link): that file is rewritten at the end of every run."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out_dir: {str(parent)!r} is a file, so {str(out)!r} cannot be a folder")
            break
    for folder in (out / RECORDS.parent, out / RECORDS):
        if os.path.lexists(folder) and not folder.is_dir():
            raise ValueError(f"out_dir: {str(folder)!r} is not a folder (this command keeps its records there); "
                             "it is kept: move it, or use another --out-dir")
    target = out / GENERATIONS
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_file():
        raise OutputExistsError(f"out_dir: {str(target)!r} is a link, a folder or a special file, not the file this "
                                "command writes; it is kept: move it, or use another --out-dir")
    try:
        read_generations(out)
    except (ValueError, OSError) as exc:
        if not overwrite:
            raise OutputExistsError(f"out_dir: {str(target)!r} is not a provenance file this command wrote ({exc}); "
                                    "it is kept: move it, use another --out-dir, or --overwrite to replace it") from None


def _remove_own_temporaries(*targets: Path) -> None:
    """Remove the temporary files a killed :func:`~melfusion.files.write_atomic` of these targets left beside
    them (``.NAME.XXXX.tmp``): only files of that exact pattern, which this module's writes create."""
    for target in targets:
        if target.parent.is_dir():
            for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)


def collect_generations(out_dir: str | os.PathLike, order: Iterable[str] | None = None) -> Path:
    """Rebuild ``out_dir/generations.jsonl`` from the per-file records (atomically), in ``order`` (file names)
    when given, then every other record by name."""
    out = Path(out_dir)
    records_dir = out / RECORDS
    found = {}
    if records_dir.is_dir():
        for p in sorted(records_dir.glob("*.json")):
            record = _read_json(p)
            name = record.get("file") if record is not None else None
            # only the file this record was written beside: a plain name in out_dir, never a path elsewhere
            if isinstance(name, str) and _is_plain_name(name) and p.stem == Path(name).stem and (out / name).is_file():
                found[name] = record
    listed = [n for n in (order or []) if n in found]
    listed += [n for n in sorted(found) if n not in set(listed)]
    text = "".join(json.dumps(found[n], ensure_ascii=False) + "\n" for n in listed)
    target = out / GENERATIONS
    _remove_own_temporaries(target)  # a killed rewrite's temporary
    try:
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            return target  # nothing changed: the file is not rewritten
    except (OSError, UnicodeDecodeError):
        pass
    return write_atomic(target, text)


def _is_plain_name(name: str) -> bool:
    return bool(name) and name == Path(name).name and name not in (".", "..") and "\x00" not in name


def read_generations(folder: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The provenance records of a generated folder (``generations.jsonl``), or None when it has none.

    A line that is not a JSON object with the record fields is a ``ValueError`` naming the file and line.
    """
    path = Path(folder) / GENERATIONS
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r}: not UTF-8 text (byte {exc.start}); was it edited or replaced?") from None
    records, seen = [], {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(f"{str(path)!r} line {number}: not valid JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"{str(path)!r} line {number}: not a JSON object (a provenance record)")
        missing = [k for k in RECORD_FIELDS if k not in record]
        if missing:
            raise ValueError(f"{str(path)!r} line {number}: lacks {', '.join(missing)}")
        odd = _odd_fields(record)
        if odd:
            raise ValueError(f"{str(path)!r} line {number}: {'; '.join(odd)} (was it edited?)")
        if record["file"] in seen:
            raise ValueError(f"{str(path)!r} line {number}: {record['file']!r} is listed twice (line "
                             f"{seen[record['file']]} too)")
        seen[record["file"]] = number
        records.append(record)
    return records


def _odd_fields(record: Mapping[str, Any]) -> list[str]:
    """What is wrong with the types of a record's fields that readers use (empty for a record this module wrote)."""
    odd = []
    if not isinstance(record["file"], str) or not record["file"] or Path(record["file"]).is_absolute() \
            or ".." in Path(record["file"]).parts or "\x00" in record["file"]:
        odd.append(f"'file' is {record['file']!r}, not a file name inside the folder")
    for key in ("caption", "audio_sha256"):
        if not isinstance(record[key], str):
            odd.append(f"{key!r} is {record[key]!r}, not a string")
    for key in ("text", "image", "reference", "image_sha256"):
        if record[key] is not None and (not isinstance(record[key], str) or "\x00" in record[key]):
            odd.append(f"{key!r} is {record[key]!r}, not a string or null")
    for key in ("settings", "model"):
        if record[key] is not None and not isinstance(record[key], dict):
            odd.append(f"{key!r} is {record[key]!r}, not an object")
    rate = record["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        odd.append(f"'sample_rate' is {rate!r}, not a positive int")
    return odd
