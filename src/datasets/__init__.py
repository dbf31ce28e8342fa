"""Data: triplet manifests (read, validate), audio and image loading, the torch dataset, the mel front end,
and the synthetic toy world.

The names below are imported on first use, so the manifest tools (``melfusion data``) start without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

# public name -> the submodule that defines it
_LAZY = {
    "MelFrontEnd": "mel",
    "Triplet": "manifest",
    "ManifestError": "manifest",
    "ManifestRows": "manifest",
    "ValidationReport": "manifest",
    "read_manifest": "manifest",
    "validate_manifest": "manifest",
    "load_audio": "audio",
    "fit_length": "audio",
    "crop_start": "audio",
    "check_audio": "audio",
    "max_audio_seconds": "audio",
    "TripletDataset": "triplets",
    "collate_triplets": "triplets",
    "square_image": "triplets",
    "write_toy_manifest": "toy",
    "write_synthetic_manifest": "synthetic",
    "read_attributes": "synthetic",
    "TOY_CLASSES": "toy",
    "TOY_STYLES": "toy",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from .audio import check_audio, crop_start, fit_length, load_audio, max_audio_seconds  # noqa: F401
    from .manifest import (  # noqa: F401
        ManifestError,
        ManifestRows,
        Triplet,
        ValidationReport,
        read_manifest,
        validate_manifest,
    )
    from .mel import MelFrontEnd  # noqa: F401
    from .synthetic import read_attributes, write_synthetic_manifest  # noqa: F401
    from .toy import TOY_CLASSES, TOY_STYLES, write_toy_manifest  # noqa: F401
    from .triplets import TripletDataset, collate_triplets, square_image  # noqa: F401
