"""Embedders for the metrics, chosen by name from ``EMBEDDERS``.

Each entry is a loader ``(source, **options) -> embedder``; a third-party
package adds one with ``EMBEDDERS.register("name", loader)`` or through the
``melfusion.embedders`` entry-point group. Built in:

========  ===========================  ===========  ===================================
name      model                        audio rate   used by
========  ===========================  ===========  ===================================
vggish    VGGish (torchvggish weights) 16 kHz       FAD (frames, 128-d)
panns     PANNs CNN14                  32 kHz       FD (clips, 2048-d), KL (527 logits)
clap      transformers ``ClapModel``   48 kHz       CLAP score, IMSM
clip      transformers ``CLIPModel``   (images)     IMSM
========  ===========================  ===========  ===================================
"""

from __future__ import annotations

from typing import Any

from ...registry import Registry
from .base import AudioEmbedder, Embedder, read_checkpoint, resolve_weights_file, state_dict_sha256
from .joint import DEFAULT_CLAP, DEFAULT_CLIP, ClapEmbedder, ClipEmbedder
from .panns import PANNS_SAMPLE_RATE, Cnn14, PANNsEmbedder
from .vggish import VGGISH_SAMPLE_RATE, VGGish, VGGishEmbedder, vggish_examples, vggish_log_mel

__all__ = [
    "EMBEDDERS", "load_embedder", "Embedder", "AudioEmbedder", "read_checkpoint", "resolve_weights_file",
    "state_dict_sha256", "VGGish", "VGGishEmbedder", "vggish_log_mel", "vggish_examples", "VGGISH_SAMPLE_RATE",
    "Cnn14", "PANNsEmbedder", "PANNS_SAMPLE_RATE", "ClapEmbedder", "ClipEmbedder", "DEFAULT_CLAP", "DEFAULT_CLIP",
]

EMBEDDERS = Registry("embedder", "melfusion.embedders")
EMBEDDERS.register("vggish", VGGishEmbedder.from_pretrained)
EMBEDDERS.register("panns", PANNsEmbedder.from_pretrained)
EMBEDDERS.register("clap", ClapEmbedder.from_pretrained)
EMBEDDERS.register("clip", ClipEmbedder.from_pretrained)


def load_embedder(name: str, source: Any, **options: Any) -> Any:
    """``EMBEDDERS.get(name)(source, **options)``: e.g. ``load_embedder("vggish", "vggish-10086976.pth")``."""
    return EMBEDDERS.get(name)(source, **options)
