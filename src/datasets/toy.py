"""The synthetic toy world: tiny image-caption-tone triplets for tests and the tiny training example.

The image's hue class sets the tone's pitch, the caption's word sets its timbre, envelope and loudness,
so a model has to use both inputs to get a clip right. Everything is drawn from one seeded generator:
the same arguments write the same bytes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

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
                       image_size: int = 64, seed: int = 0, format: str = "jsonl") -> Path:
    """Write ``n`` triplets under ``folder`` (audio/*.wav PCM_16, images/*.png) and their manifest.

    Item i has hue class ``i % 4`` (:data:`TOY_CLASSES`) and caption ``(i // 4) % 3``
    (:data:`TOY_STYLES`). The manifest is ``folder/manifest.jsonl`` (or ``.csv``) with the columns
    ``captions``, ``location``, ``img_path`` (relative paths), plus ``colour`` and ``pitch_hz``.
    Returns the manifest path.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected 'jsonl' or 'csv', got {format!r}")
    check_positive_ints(n=n, sample_rate=sample_rate, image_size=image_size)
    if not isinstance(seconds, (int, float)) or not np.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds: expected a positive number, got {seconds!r}")
    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        colour, hue, pitch = TOY_CLASSES[i % len(TOY_CLASSES)]
        style = (i // len(TOY_CLASSES)) % len(TOY_STYLES)
        audio, image = f"audio/toy_{i:04d}.wav", f"images/toy_{i:04d}.png"
        sf.write(folder / audio, _tone(pitch, style, seconds, sample_rate, rng), sample_rate,
                 subtype="PCM_16", format="WAV")
        _picture(hue, image_size, rng).save(folder / image, format="PNG")
        records.append({"captions": TOY_STYLES[style][0], "location": audio, "img_path": image,
                        "colour": colour, "pitch_hz": pitch})
    if format == "jsonl":
        path = folder / "manifest.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path = folder / "manifest.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
    return path
