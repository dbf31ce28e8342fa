"""Data: the mel front end (later: triplet manifests, audio/image loading, the synthetic world)."""

from .mel import MelFrontEnd

__all__ = ["MelFrontEnd"]
