"""Data: triplet manifests (read, validate), audio and image loading, the torch dataset, the mel front end,
and the synthetic toy world."""

from .audio import check_audio, crop_start, fit_length, load_audio, max_audio_seconds
from .manifest import (
    ManifestError,
    ManifestRows,
    Triplet,
    ValidationReport,
    read_manifest,
    validate_manifest,
)
from .mel import MelFrontEnd
from .synthetic import read_attributes, write_synthetic_manifest
from .toy import TOY_CLASSES, TOY_STYLES, write_toy_manifest
from .triplets import TripletDataset, collate_triplets, square_image

__all__ = [
    "MelFrontEnd",
    "Triplet",
    "ManifestError",
    "ManifestRows",
    "ValidationReport",
    "read_manifest",
    "validate_manifest",
    "load_audio",
    "fit_length",
    "crop_start",
    "check_audio",
    "max_audio_seconds",
    "TripletDataset",
    "collate_triplets",
    "square_image",
    "write_toy_manifest",
    "write_synthetic_manifest",
    "read_attributes",
    "TOY_CLASSES",
    "TOY_STYLES",
]
