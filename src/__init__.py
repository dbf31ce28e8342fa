"""melfusion: music from an image and a text prompt (MeLFusion, CVPR 2024) on stock diffusers.

    import melfusion as mf
    model = mf.MelFusion.from_config(mf.MelFusionConfig.preset("tiny"))
    out = model.generate(image="cat.png", text="calm piano", num_inference_steps=20)
    out.save("song.wav")

``import melfusion`` imports neither torch, diffusers nor transformers: each public name below is imported
the first time it is used (module ``__getattr__``), so ``melfusion --help`` and ``--version`` start at once
and a model build imports what it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

__version__ = "0.1.0.dev0"

# public name -> the submodule that defines it (None: the name is that submodule itself)
_LAZY: dict[str, str | None] = {
    "MelFusion": "pipeline",
    "GenerationOutput": "pipeline",
    "MelFusionConfig": "config",
    "FeatureSource": "interfaces",
    "SynapseMixer": "interfaces",
    "MusicDenoiser": "interfaces",
    "LatentCodec": "interfaces",
    "Vocoder": "interfaces",
    "TextEncoder": "interfaces",
    "LayerInfo": "interfaces",
    "registry": None,
    "synapse": None,
    "backbones": None,
    "vocoders": None,
    "disable_progress_bars": "progress",
    "enable_progress_bars": "progress",
    "progress_bars_enabled": "progress",
}

__all__ = [*_LAZY, "__version__"]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import backbones, registry, synapse, vocoders  # noqa: F401
    from .config import MelFusionConfig  # noqa: F401
    from .interfaces import (  # noqa: F401
        FeatureSource,
        LatentCodec,
        LayerInfo,
        MusicDenoiser,
        SynapseMixer,
        TextEncoder,
        Vocoder,
    )
    from .pipeline import GenerationOutput, MelFusion  # noqa: F401
    from .progress import disable_progress_bars, enable_progress_bars, progress_bars_enabled  # noqa: F401
