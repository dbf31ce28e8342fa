"""A torch Dataset over manifest triplets: fixed-length audio, square images, captions; and its collate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..checks import check_size
from ..images import MAX_PIXELS, open_image
from .audio import fit_length, load_audio, max_audio_seconds
from .manifest import Triplet

__all__ = ["TripletDataset", "collate_triplets", "square_image"]


def square_image(im: Image.Image, size: int) -> Image.Image:
    """Shorter side resized to ``size`` (bicubic), then the centre ``size x size`` crop."""
    w, h = im.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


class TripletDataset(torch.utils.data.Dataset):
    """Items ``{"index", "row", "text", "audio": (samples,), "image": (3, S, S) in [0, 1] or None}``.

    Audio is loaded mono at ``sample_rate`` and cut or zero-padded to ``round(seconds * sample_rate)``
    samples. With ``random_crop`` the window start is drawn from ``np.random.default_rng([seed, epoch,
    index])``, so it depends only on (seed, epoch, index): a resumed run that calls ``set_epoch`` sees the
    same crops, whatever the worker or batch order. Without it the window is the start of the clip.
    Images: see :func:`square_image`; ``image_size=None`` keeps their size (then a batch needs equal sizes);
    ``images=False`` never opens them (every item's ``image`` is None: a model without a synapse).
    A file longer than :func:`~melfusion.datasets.audio.max_audio_seconds` of ``seconds`` (100 windows, at
    least an hour) is refused before it is decoded, as are truncated, corrupt or non-finite ones.
    """

    def __init__(self, rows: Sequence[Triplet], *, sample_rate: int, seconds: float, image_size: int | None,
                 random_crop: bool = False, seed: int = 0, images: bool = True):
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate: expected a positive integer, got {sample_rate!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not np.isfinite(seconds) \
                or seconds <= 0:
            raise ValueError(f"seconds: expected a positive number, got {seconds!r}")
        if round(seconds * sample_rate) < 1:
            raise ValueError(f"seconds: {seconds!r} s at {sample_rate} Hz is less than one sample")
        check_size(4 * int(round(seconds * sample_rate)), "seconds", f"a {seconds:g} s window at {sample_rate} Hz")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                       or not 0 < image_size * image_size <= MAX_PIXELS):
            raise ValueError(f"image_size: expected a positive integer (at most {int(MAX_PIXELS ** 0.5)}) or None, "
                             f"got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.rows = list(rows)
        for i, row in enumerate(self.rows):
            if not isinstance(row, Triplet):
                raise ValueError(f"rows[{i}]: expected a Triplet, got {type(row).__name__}")
        self.sample_rate = int(sample_rate)
        self.seconds = float(seconds)
        self.num_samples = int(round(seconds * sample_rate))
        self.image_size = None if image_size is None else int(image_size)
        self.images = bool(images)  # False: never open the rows' pictures (a model without a synapse)
        self.random_crop = bool(random_crop)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops ``__getitem__`` returns (call it at the start of every epoch)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def crop_rng(self, index: int) -> np.random.Generator | None:
        """The generator for item ``index``'s crop this epoch (None without ``random_crop``)."""
        if not self.random_crop:
            return None
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        index = int(index) % len(self)
        row = self.rows[index]
        wave = load_audio(row.audio, self.sample_rate, name=f"row {row.row} audio",
                          max_seconds=max_audio_seconds(self.seconds))
        wave = fit_length(wave, self.num_samples, rng=self.crop_rng(index))
        image = None
        if row.image is not None and self.images:
            im = open_image(row.image, f"row {row.row} image")
            if self.image_size is not None:
                im = square_image(im, self.image_size)
            arr = np.asarray(im, dtype=np.float32) / 255.0
            image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return {"index": index, "row": row.row, "text": row.caption, "audio": torch.from_numpy(wave),
                "image": image}


def collate_triplets(items: list[dict]) -> dict:
    """A batch: ``index``/``row`` LongTensors, ``text`` list, ``audio`` (batch, samples), ``image``
    (batch, 3, S, S), or None if any item has no image."""
    if not items:
        raise ValueError("items: cannot collate an empty batch")
    images = [item["image"] for item in items]
    if any(im is None for im in images):
        image = None
    else:
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"items: images of different sizes {sorted(shapes)} cannot be stacked; "
                             "set image_size on the TripletDataset")
        image = torch.stack(images)
    return {
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        "row": torch.tensor([int(item.get("row", -1)) for item in items], dtype=torch.long),
        "text": [item["text"] for item in items],
        "audio": torch.stack([item["audio"] for item in items]),
        "image": image,
    }
