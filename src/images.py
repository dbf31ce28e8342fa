"""Turning user images (paths, PIL images, tensors) into ``(batch, 3, H, W)`` float tensors in [0, 1]."""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that make tensors: opening and checking a picture (the manifest tools)
# needs only PIL

__all__ = ["load_images", "open_image"]

MAX_PIXELS = 8192 * 8192


def open_image(path: str | Path, name: str = "image") -> Image.Image:
    """An RGB PIL image from a file of any mode (EXIF rotation applied), or a clear ValueError."""
    from .files import check_input_file

    path = check_input_file(path, name, "image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{name}: file {str(path)!r} is empty")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check would warn, or raise before ours: the size is checked here, by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _no_pil_limit(), Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError(f"{name}: {str(path)!r} is {im.width}x{im.height}, over the "
                                     f"{MAX_PIXELS} pixel limit")
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, EOFError,
            struct.error, MemoryError, ValueError) as exc:
        if str(exc).startswith(f"{name}: "):
            raise
        raise ValueError(f"{name}: cannot read {str(path)!r} as an image ({exc})") from None


@contextlib.contextmanager
def _no_pil_limit():
    """PIL's bomb limit off while one file is opened (``open_image`` checks ``MAX_PIXELS`` itself, first)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode: alpha composited on white, 16-bit and float scaled, palettes expanded."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit modes are scaled by their depth (a dark 16-bit picture stays dark); a 32-bit "I" image has
        # no depth of its own: 16-bit when its values need it, else 8-bit
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("the picture holds NaN or infinite pixel values")
        span = arr.max() - arr.min()
        im = Image.fromarray((255 * (arr - arr.min()) / (span if span > 0 else 1)).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB")


def _one(image: Any, name: str) -> torch.Tensor:
    import torch

    if isinstance(image, (str, Path)):
        image = open_image(image, name)
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{name}: {image.width}x{image.height}, over the {MAX_PIXELS} pixel limit")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name}: empty image ({image.width}x{image.height})")
        try:
            arr = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return torch.from_numpy(arr).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.is_complex():
            raise ValueError(f"{name}: expected a real tensor in [0, 1], got {image.dtype}")
        x = image.detach().float()
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
            raise ValueError(f"{name}: expected a (3, H, W) tensor in [0, 1], got shape {tuple(image.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name}: empty tensor of shape {tuple(image.shape)}")
        if x.shape[-1] * x.shape[-2] > MAX_PIXELS:
            raise ValueError(f"{name}: {x.shape[-1]}x{x.shape[-2]} pixels, over the {MAX_PIXELS} pixel limit")
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name}: tensor values must be finite and in [0, 1]")
        if x.shape[0] == 4:  # RGBA: composited on white, as a PIL image with alpha is
            rgb, alpha = x[:3], x[3:]
            return rgb * alpha + (1 - alpha)
        return x if x.shape[0] == 3 else x.expand(3, -1, -1)
    raise ValueError(f"{name}: expected a path, a PIL image or a float tensor in [0, 1], got {type(image).__name__}")


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """One ``(3, H, W)`` image in [0, 1] -> ``(3, size, size)``: bicubic with antialiasing, clamped to [0, 1]
    (what the image LDMs' ``encode`` does to a batch; done per image, a row never depends on its batch)."""
    import torch

    if tuple(x.shape[-2:]) == (size, size):
        return x
    return torch.nn.functional.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False,
                                           antialias=True).clamp(0, 1)[0]


def load_images(images: Any, name: str = "image", size: int | None = None) -> torch.Tensor:
    """``(batch, 3, H, W)`` in [0, 1] from one image or a list.

    With ``size``, each image is resized to ``size x size`` on its own (:func:`resize_image`); without it, the
    images of a list are resized to the first one's size."""
    import torch

    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int or None, got {size!r}")
        many = (isinstance(images, torch.Tensor) and images.ndim == 4) or (
            isinstance(images, Sequence) and not isinstance(images, (str, bytes)))
        items = list(images) if many else [images]
        if not items:
            raise ValueError(f"{name}: empty list")
        return torch.stack([resize_image(_one(x, f"{name}[{i}]" if many else name), size)
                            for i, x in enumerate(items)])
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return torch.cat([_one(x, f"{name}[{i}]")[None] for i, x in enumerate(images)])
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if not images:
            raise ValueError(f"{name}: empty list")
        tensors = [_one(x, f"{name}[{i}]") for i, x in enumerate(images)]
        size = tensors[0].shape[-2:]
        tensors = [torch.nn.functional.interpolate(t[None], size=tuple(size), mode="bilinear")[0]
                   if t.shape[-2:] != size else t for t in tensors]
        return torch.stack(tensors)
    return _one(images, name)[None]
