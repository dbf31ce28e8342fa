"""melfusion: music from an image and a text prompt (MeLFusion, CVPR 2024) on stock diffusers.

    import melfusion as mf
    model = mf.MelFusion.from_config(mf.MelFusionConfig.preset("tiny"))
    out = model.generate(image="cat.png", text="calm piano", num_inference_steps=20)
    out.save("song.wav")
"""

from . import backbones, registry, synapse, vocoders
from .config import MelFusionConfig
from .interfaces import (
    FeatureSource,
    LatentCodec,
    LayerInfo,
    MusicDenoiser,
    SynapseMixer,
    TextEncoder,
    Vocoder,
)
from .pipeline import GenerationOutput, MelFusion

__version__ = "0.1.0.dev0"

__all__ = [
    "MelFusion",
    "MelFusionConfig",
    "GenerationOutput",
    "FeatureSource",
    "SynapseMixer",
    "MusicDenoiser",
    "LatentCodec",
    "Vocoder",
    "TextEncoder",
    "LayerInfo",
    "registry",
    "synapse",
    "backbones",
    "vocoders",
    "__version__",
]
