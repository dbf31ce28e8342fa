"""The synthetic toy world: tiny image-caption-tone triplets for tests and the tiny training example.

The image's hue class sets the tone's pitch, the caption's word sets its timbre, envelope and loudness,
so a model has to use both inputs to get a clip right. Everything is drawn from one seeded generator:
the same arguments write the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..checks import check_size
from .audio import MAX_SAMPLE_RATE
from .writing import png_bytes, wav_bytes, write_dataset_folder

__all__ = ["write_toy_manifest", "TOY_CLASSES", "TOY_STYLES"]

# hue class: (name, hue in [0, 1), fundamental in Hz); pitches an A-major chord's notes and the octave
TOY_CLASSES = (
    ("red", 0.00, 220.00),
    ("yellow", 0.15, 277.18),
    ("green", 0.35, 329.63),
    ("blue", 0.62, 440.00),
)
# caption word: (caption, harmonic amplitudes of 1f/2f/3f, peak level); the envelope is chosen by name below
TOY_STYLES = (
    ("a soft flute tone", (1.0, 0.15, 0.05), 0.3),
    ("a bright plucked tone", (1.0, 0.6, 0.4), 0.7),
    ("a pulsing organ tone", (1.0, 0.4, 0.25), 0.5),
)
FORMATS = ("jsonl", "csv")
MAX_IMAGE_SIZE = 4096  # pixels a side of a rendered picture


def check_positive_ints(**values) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is not a positive integer (bools refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _envelope(style: str, t: np.ndarray, seconds: float) -> np.ndarray:
    fade = np.clip(np.minimum(t / 0.01, (seconds - t) / 0.01), 0.0, 1.0)  # 10 ms in and out, no clicks
    if "soft" in style:
        env = np.clip(t / min(0.25, seconds / 2), 0.0, 1.0)  # slow swell
    elif "plucked" in style:
        env = np.exp(-t / (0.3 * max(seconds, 0.1)))  # sharp attack, decay
    else:
        env = 0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t) ** 2  # 4 Hz pulse
    return env * fade


def _tone(pitch: float, style: int, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    caption, harmonics, level = TOY_STYLES[style]
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    wave = np.zeros_like(t)
    for k, amp in enumerate(harmonics, start=1):
        if k * pitch < sample_rate / 2:
            wave += amp * np.sin(2 * np.pi * k * pitch * t + rng.uniform(0, 2 * np.pi))
    wave *= _envelope(caption, t, seconds)
    wave += 0.002 * rng.standard_normal(t.shape)
    peak = np.abs(wave).max()
    return (level * wave / peak if peak > 0 else wave).astype(np.float32)


def _picture(hue: float, size: int, rng: np.random.Generator) -> Image.Image:
    """A noisy field of one hue with a lighter disc somewhere on it."""
    h = (hue + rng.uniform(-0.02, 0.02)) % 1.0
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.12, 0.25) * size) ** 2
    sat = np.where(disc, 0.45, 0.85) + 0.04 * rng.standard_normal((size, size))
    val = np.where(disc, 0.95, 0.75) + 0.04 * rng.standard_normal((size, size))
    hsv = np.stack([np.full((size, size), h), np.clip(sat, 0, 1), np.clip(val, 0, 1)], axis=-1)
    pixels = np.ascontiguousarray(np.round(hsv * 255).astype(np.uint8))
    return Image.frombytes("HSV", (size, size), pixels.tobytes()).convert("RGB")


def write_toy_manifest(folder: str | Path, *, n: int = 16, seconds: float = 1.0, sample_rate: int = 16000,
                       image_size: int = 64, seed: int = 0, format: str = "jsonl", overwrite: bool = False) -> Path:
    """Write ``n`` triplets under ``folder`` (audio/*.wav PCM_16, images/*.png) and their manifest.

    Item i has hue class ``i % 4`` (:data:`TOY_CLASSES`) and caption ``(i // 4) % 3``
    (:data:`TOY_STYLES`). The manifest is ``folder/manifest.jsonl`` (or ``.csv``) with the columns
    ``captions``, ``location``, ``img_path`` (relative paths), plus ``colour`` and ``pitch_hz``.
    Returns the manifest path.

    ``folder`` must be new, empty, or hold exactly what these arguments write (writing the same dataset
    again changes nothing); a folder holding other or different files is refused, naming them, before
    anything is written, unless ``overwrite=True`` (which replaces this dataset's files and keeps the
    rest). See :mod:`melfusion.datasets.writing`.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected 'jsonl' or 'csv', got {format!r}")
    check_positive_ints(n=n, sample_rate=sample_rate, image_size=image_size)
    check_sizes(seconds=seconds, sample_rate=sample_rate, image_size=image_size, low=0.0)
    folder = Path(folder)
    manifest = f"manifest.{format}"
    names = [(f"audio/toy_{i:04d}.wav", f"images/toy_{i:04d}.png") for i in range(n)]
    planned = [p for pair in names for p in pair] + [manifest]

    def files():
        rng = np.random.default_rng(seed)
        records = []
        for i, (audio, image) in enumerate(names):
            colour, hue, pitch = TOY_CLASSES[i % len(TOY_CLASSES)]
            style = (i // len(TOY_CLASSES)) % len(TOY_STYLES)
            yield audio, wav_bytes(_tone(pitch, style, seconds, sample_rate, rng), sample_rate)
            yield image, png_bytes(_picture(hue, image_size, rng))
            records.append({"captions": TOY_STYLES[style][0], "location": audio, "img_path": image,
                            "colour": colour, "pitch_hz": pitch})
        yield manifest, _manifest_text(records, format).encode("utf-8")

    write_dataset_folder(folder, planned, files, overwrite=overwrite)
    return folder / manifest


def _manifest_text(records: list[dict], format: str) -> str:
    if format == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def check_sizes(*, seconds, sample_rate: int, image_size: int, low: float) -> None:
    """``seconds`` a finite number above ``low`` (``ValueError`` naming it) and the clip and picture small
    enough to render in this machine's memory (:func:`melfusion.checks.check_size`)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not np.isfinite(seconds) \
            or seconds <= low:
        raise ValueError(f"seconds: expected a number of seconds > {low:g}, got {seconds!r}")
    if sample_rate > MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate: expected at most {MAX_SAMPLE_RATE} Hz, got {sample_rate!r}")
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size: expected at most {MAX_IMAGE_SIZE} pixels, got {image_size!r}")
    check_size(8 * 4 * int(round(seconds * sample_rate)), "seconds", f"rendering {seconds:g} s at {sample_rate} Hz")
