"""The visual synapse: capture image keys/values, align them, mix them into the music UNet."""

from .aligners import Aligner, InterpolateAligner, LinearAligner, PoolAligner, pool_channels, pool_tokens
from .injection import INJECTIONS, VIEWS, injection_points, split_view, with_view
from .install import (
    CaptureHandle,
    SynapseHandle,
    capture,
    decoder_layers,
    install,
    layer_info,
    resolve_attention,
)
from .mixers import (
    BaseMixer,
    BoundedMixer,
    ConvexMixer,
    GatedMixer,
    PerHeadMixer,
    mix,
    straight_through_clamp,
)
from .processors import CaptureProcessor, InjectProcessor, KVProcessor, SynapseState

__all__ = [
    "Aligner",
    "PoolAligner",
    "InterpolateAligner",
    "LinearAligner",
    "pool_tokens",
    "pool_channels",
    "INJECTIONS",
    "VIEWS",
    "injection_points",
    "split_view",
    "with_view",
    "BaseMixer",
    "ConvexMixer",
    "PerHeadMixer",
    "GatedMixer",
    "BoundedMixer",
    "mix",
    "straight_through_clamp",
    "KVProcessor",
    "CaptureProcessor",
    "InjectProcessor",
    "SynapseState",
    "install",
    "capture",
    "decoder_layers",
    "resolve_attention",
    "layer_info",
    "SynapseHandle",
    "CaptureHandle",
]

from .features import FeatureCache, FeatureStore  # noqa: E402
from .wiring import LayerPair, Synapse, probe_layers  # noqa: E402

__all__ += ["FeatureCache", "FeatureStore", "LayerPair", "Synapse", "probe_layers"]
