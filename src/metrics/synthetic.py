"""Scoring a model on the synthetic world: attribute accuracy recovered from generated audio, and FD.

:func:`score_synthetic` generates one clip per row of a synthetic manifest (its picture and caption), reads
the four attributes back from each waveform (:func:`~melfusion.datasets.synthetic.read_attributes`) and
compares them with the row's ground truth. Controls for the image cue: ``alpha=0.0`` forces every synapse
weight to zero (the text-only path of the same weights); ``swap_images=True`` gives each caption another
row's picture (a seeded random permutation), and the score is then also reported against the pictures'
own labels (``accuracy_vs_image``). ``text=""`` drops every caption (the image-only row of Table 4).

The Frechet distance is computed on a deliberately simple audio embedding (:func:`mel_band_embedding`: the
mean and standard deviation over time of the log-mel energy in 16 bands, 32 numbers) between the generated
clips and the manifest's real clips.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import NonFiniteError, positive_int
from ..datasets.audio import load_audio
from ..datasets.synthetic import ATTRIBUTES, CHANCE, AttributeReading, attribute_accuracy, read_attributes

__all__ = ["SyntheticScore", "score_synthetic", "mel_band_embedding", "read_synthetic_rows"]


@dataclass
class SyntheticScore:
    """Accuracy per attribute (fraction of clips), chance per attribute, FD and the raw readings."""

    accuracy: dict[str, float]
    chance: dict[str, float]
    fd: float
    n: int
    accuracy_vs_image: dict[str, float] | None = None  # with swapped images: against the pictures' labels
    readings: list[AttributeReading] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "chance": self.chance, "fd": self.fd,
                "accuracy_vs_image": self.accuracy_vs_image}


def read_synthetic_rows(manifest: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a synthetic manifest, with ``location``/``img_path`` made absolute.

    ``captions`` may be a string or a list of strings (the first is used, as everywhere). A line that is
    not UTF-8 or not a JSON object, or lacks a field, is a ``ValueError`` naming the manifest and the row.
    """
    from ..datasets.manifest import caption_text

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest: no such file {str(manifest)!r}")
    rows = []
    for number, raw in enumerate(manifest.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"manifest: row {number} of {str(manifest)!r}"
        try:
            row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{where} is not UTF-8 text") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{where} is not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object")
        missing = [k for k in ("captions", "location", "img_path", *ATTRIBUTES) if k not in row]
        if missing:
            raise ValueError(f"{where} lacks {missing}; is it a synthetic manifest (write_synthetic_manifest)?")
        caption, why = caption_text(row["captions"])
        if why:
            raise ValueError(f"{where}: {why}")
        bad = [k for k in ("location", "img_path") if not isinstance(row[k], str) or not row[k].strip()]
        if bad:
            raise ValueError(f"{where}: {', '.join(bad)} must be non-empty strings")
        row["captions"] = caption
        row["location"] = str(manifest.parent / row["location"])
        row["img_path"] = str(manifest.parent / row["img_path"])
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _native_rate(path: str, default: int) -> int:
    """The sample rate a file's header declares (``default`` where soundfile cannot tell: load_audio then
    decodes it another way, or says what is wrong)."""
    import soundfile as sf

    try:
        return int(sf.info(path).samplerate)
    except (RuntimeError, OSError, ValueError):
        return default


def mel_band_embedding(waveform: np.ndarray, sample_rate: int, bands: int = 16) -> np.ndarray:
    """Mean and standard deviation over time of the log-mel energy in ``bands`` bands (``2 * bands`` numbers)."""
    import librosa

    y = np.asarray(waveform, dtype=np.float32).reshape(-1)
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=1024, hop_length=160, n_mels=bands,
                                         fmax=sample_rate / 2)
    log = np.log(mel + 1e-5)
    return np.concatenate([log.mean(axis=1), log.std(axis=1)]).astype(np.float64)


def score_synthetic(model, manifest: str | Path, *, limit: int | None = None, num_inference_steps: int | None = None,
                    guidance_scale: float | None = None, image_guidance_scale: float | None = None,
                    batch_size: int = 16, seed: int = 0,
                    alpha: float | None = None, swap_images: bool = False, text: str | None = None,
                    progress: bool = True) -> SyntheticScore:
    """Generate one clip per manifest row and score it (see the module doc)."""
    from tqdm.auto import tqdm

    from ..metrics.frechet import frechet_distance
    from ..progress import show_progress

    batch_size = positive_int(batch_size, "batch_size")
    rows = read_synthetic_rows(manifest, limit)
    if not rows:
        raise ValueError(f"manifest: {str(manifest)!r} has no rows")
    images = [r["img_path"] for r in rows]
    image_rows = rows
    if swap_images:
        order = np.random.default_rng(seed).permutation(len(rows))
        images = [images[i] for i in order]
        image_rows = [rows[i] for i in order]
    captions = [r["captions"] if text is None else text for r in rows]
    use_image = model.synapse is not None
    readings: list[AttributeReading] = []
    generated = []
    bar = tqdm(total=len(rows), desc="score", disable=not show_progress(progress), dynamic_ncols=True)
    forcing = model.synapse.mixer.forced(alpha) if (alpha is not None and use_image) else nullcontext()
    with forcing:
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            out = model.generate(image=images[start:stop] if use_image else None, text=captions[start:stop],
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 image_guidance_scale=image_guidance_scale if use_image else None,
                                 seed=seed + start, progress=False)
            for offset, wave in enumerate(out.waveforms):
                if not np.isfinite(wave).all():
                    raise NonFiniteError(f"score_synthetic: the clip generated for the row of "
                                         f"{rows[start + offset]['location']!r} holds NaN or infinite samples; "
                                         "nothing is scored")
                readings.append(read_attributes(wave, out.sample_rate))
                generated.append(mel_band_embedding(wave, out.sample_rate))
            bar.update(stop - start)
    bar.close()
    real = []
    for r in rows:  # at the file's own rate; load_audio refuses truncated, corrupt or non-finite files
        sr = _native_rate(r["location"], out.sample_rate)
        real.append(mel_band_embedding(load_audio(r["location"], sr, name="manifest audio"), sr))
    accuracy = attribute_accuracy(readings, rows)
    vs_image = None
    if swap_images:
        truth = [{**r, "register": ir["register"], "tempo": ir["tempo"]} for r, ir in zip(rows, image_rows, strict=True)]
        vs_image = attribute_accuracy(readings, truth)
    fd = frechet_distance(np.stack(generated), np.stack(real))
    return SyntheticScore(accuracy=accuracy, chance=dict(CHANCE), fd=float(fd), n=len(rows),
                          accuracy_vs_image=vs_image, readings=readings)

