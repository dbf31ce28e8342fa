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
"""

from .cache import EmbeddingCache, default_cache_dir
from .embedders import EMBEDDERS, ClapEmbedder, ClipEmbedder, PANNsEmbedder, VGGishEmbedder, load_embedder
from .evaluate import METRICS, add_evaluate_arguments, evaluate, format_table, run_evaluate
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
from .kl import KL_DIRECTION, kl_divergence, kl_divergence_per_pair, pair_by_stem
from .similarity import clap_score, cosine_similarity, imsm, imsm_matrix

__all__ = [
    "frechet_distance", "frechet_distance_from_stats", "frechet_distance_inf", "fit_frechet_distance_inf",
    "gaussian_stats", "FrechetInfFit", "FewSamplesWarning", "NearSingularWarning",
    "kl_divergence", "kl_divergence_per_pair", "pair_by_stem", "KL_DIRECTION",
    "imsm", "imsm_matrix", "clap_score", "cosine_similarity",
    "evaluate", "METRICS", "format_table", "add_evaluate_arguments", "run_evaluate",
    "EMBEDDERS", "load_embedder", "VGGishEmbedder", "PANNsEmbedder", "ClapEmbedder", "ClipEmbedder",
    "EmbeddingCache", "default_cache_dir",
]
