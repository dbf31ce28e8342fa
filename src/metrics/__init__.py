"""Evaluation metrics: FAD, FD, KL, IMSM and CLAP score (see docs/evaluation.md).

The math works on arrays and needs no model::

    from melfusion.metrics import frechet_distance, kl_divergence, imsm, clap_score
    frechet_distance(a, b)                       # (n, d) embeddings, rows = frames or clips
    kl_divergence(gen_logits, ref_logits)        # KL(reference || generated), audioldm_eval's way
    imsm(image_text, audio_text, mode="paper")   # (N, N) CLIP and CLAP similarity matrices
    clap_score(audio_emb, text_emb)              # mean cosine of paired rows

``evaluate(generated_dir, reference_dir, metrics=...)`` runs the embedders
(VGGish, PANNs CNN14, CLAP, CLIP) over folders of audio and computes them
all; ``melfusion evaluate`` is its command line.

The names below are imported on first use: the array math (``frechet_distance``, ``kl_divergence``,
``imsm``) loads without torch or the embedders' libraries.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

# public name -> the submodule that defines it
_LAZY = {
    "EmbeddingCache": "cache",
    "default_cache_dir": "cache",
    "EMBEDDERS": "embedders",
    "ClapEmbedder": "embedders",
    "ClipEmbedder": "embedders",
    "PANNsEmbedder": "embedders",
    "VGGishEmbedder": "embedders",
    "load_embedder": "embedders",
    "METRICS": "evaluate",
    "add_evaluate_arguments": "evaluate",
    "evaluate": "evaluate",
    "format_table": "evaluate",
    "run_evaluate": "evaluate",
    "FewSamplesWarning": "frechet",
    "FrechetInfFit": "frechet",
    "NearSingularWarning": "frechet",
    "fit_frechet_distance_inf": "frechet",
    "frechet_distance": "frechet",
    "frechet_distance_from_stats": "frechet",
    "frechet_distance_inf": "frechet",
    "gaussian_stats": "frechet",
    "KL_DIRECTION": "kl",
    "kl_divergence": "kl",
    "kl_divergence_per_pair": "kl",
    "pair_by_stem": "kl",
    "clap_score": "similarity",
    "cosine_similarity": "similarity",
    "imsm": "similarity",
    "imsm_matrix": "similarity",
}

__all__ = [
    "frechet_distance", "frechet_distance_from_stats", "frechet_distance_inf", "fit_frechet_distance_inf",
    "gaussian_stats", "FrechetInfFit", "FewSamplesWarning", "NearSingularWarning",
    "kl_divergence", "kl_divergence_per_pair", "pair_by_stem", "KL_DIRECTION",
    "imsm", "imsm_matrix", "clap_score", "cosine_similarity",
    "evaluate", "METRICS", "format_table", "add_evaluate_arguments", "run_evaluate",
    "EMBEDDERS", "load_embedder", "VGGishEmbedder", "PANNsEmbedder", "ClapEmbedder", "ClipEmbedder",
    "EmbeddingCache", "default_cache_dir",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


class _Package(types.ModuleType):
    """``melfusion.metrics.evaluate`` is the function, as it was when this package imported it eagerly: importing
    the submodule of the same name (e.g. ``from melfusion.metrics.evaluate import run_evaluate``) must not
    bind the submodule over it."""

    def __setattr__(self, name: str, value) -> None:
        if name == "evaluate" and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule: the lazy lookup gives the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:
    from .cache import EmbeddingCache, default_cache_dir  # noqa: F401
    from .embedders import EMBEDDERS, ClapEmbedder, ClipEmbedder, PANNsEmbedder, VGGishEmbedder, load_embedder  # noqa: F401
    from .evaluate import METRICS, add_evaluate_arguments, evaluate, format_table, run_evaluate  # noqa: F401
    from .frechet import (
        FewSamplesWarning,
        FrechetInfFit,
        NearSingularWarning,
        fit_frechet_distance_inf,
        frechet_distance,
        frechet_distance_from_stats,
        frechet_distance_inf,
        gaussian_stats,
    )
    from .kl import KL_DIRECTION, kl_divergence, kl_divergence_per_pair, pair_by_stem  # noqa: F401
    from .similarity import clap_score, cosine_similarity, imsm, imsm_matrix  # noqa: F401
