"""Cross-modal similarity scores: CLAP score and MeLFusion's image-music similarity metric (IMSM).

IMSM ties an image to a piece of music through their shared texts: CLIP
scores images against texts, CLAP scores audios against the same texts, and
the product of the two ``(N, N)`` matrices scores images against audios.
Row ``i`` of each matrix is the ``i``-th triplet (image, text, audio), so the
matched pairs sit on the diagonal, and the score is the mean of the diagonal.

``mode="paper"`` (the paper's definition)::

    IMSM = S_IT @ S_AT.T                      (N images x N audios)

``mode="released"`` (the authors' ``imsm_calculator.py``, which takes CLIP's
``logits_per_image`` and CLAP's ``logits_per_audio``, i.e. the cosine
similarities times each model's ``exp(logit_scale)``)::

    P_IT = softmax(S_IT, over texts); P_AT = softmax(S_AT, over texts)
    IMSM = softmax(P_IT @ P_AT.T, over audios)

The released matrix has rows summing to 1, so its diagonal mean depends on
``N`` (1 for ``N = 1``; about ``1/N`` when nothing is matched better than
chance): only compare released-mode numbers computed at the same ``N``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from ..checks import finite_float

__all__ = ["IMSM_MODES", "cosine_similarity", "clap_score", "imsm", "imsm_matrix"]

IMSM_MODES = ("paper", "released")


def _as_2d(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric 2-D array, got {type(x).__name__} ({exc})") from None
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = x / np.abs(x).max(axis=1, keepdims=True).clip(min=np.finfo(np.float64).tiny)  # no over/underflow
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name}: row(s) {np.flatnonzero(norms[:, 0] == 0).tolist()[:10]} are all zeros "
                         "(a cosine similarity needs non-zero vectors)")
    return x / norms


def cosine_similarity(a, b) -> np.ndarray:
    """The ``(n_a, n_b)`` matrix of cosine similarities between the rows of ``a`` and of ``b``."""
    a = _as_2d(a, "a")
    b = _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b: expected {a.shape[1]} columns to match a, got shape {b.shape}")
    return _unit_rows(a, "a") @ _unit_rows(b, "b").T


def clap_score(audio_embeddings, text_embeddings) -> float:
    """The mean cosine similarity of each audio's CLAP embedding with its own text's (row ``i`` with row ``i``).

    Args:
        audio_embeddings: ``(n, d)`` CLAP audio embeddings (normalised or not).
        text_embeddings: ``(n, d)`` CLAP text embeddings of the paired captions.

    Returns:
        A float in ``[-1, 1]``; higher means the audio matches its caption better.
    """
    audio = _as_2d(audio_embeddings, "audio_embeddings")
    text = _as_2d(text_embeddings, "text_embeddings")
    if text.shape != audio.shape:
        raise ValueError(f"text_embeddings: expected shape {audio.shape} (one text per audio, same width), "
                         f"got {text.shape}")
    a = _unit_rows(audio, "audio_embeddings")
    t = _unit_rows(text, "text_embeddings")
    return float((a * t).sum(axis=1).mean())


def _check_square(x, name: str, n: int | None = None) -> np.ndarray:
    arr = _as_2d(x, name)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name}: expected a square (N, N) similarity matrix (row i and column i are the "
                         f"i-th triplet), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n}, {n}) to match image_text, got {arr.shape}")
    return arr


def imsm_matrix(image_text, audio_text, mode: str = "paper", *, image_logit_scale: float = 1.0,
                audio_logit_scale: float = 1.0) -> np.ndarray:
    """The ``(N images, N audios)`` IMSM matrix (see the module docstring for the two modes).

    Args:
        image_text: ``(N, N)`` CLIP similarities, rows images, columns texts.
        audio_text: ``(N, N)`` CLAP similarities, rows audios, columns the same texts.
        mode: ``"paper"`` or ``"released"``.
        image_logit_scale, audio_logit_scale: multiply the matrices first (both
            modes). With cosine similarities as input, the released script's
            numbers need the models' ``exp(logit_scale)`` here (CLIP ViT-B/32: 100);
            with logits as input leave them at 1.
    """
    if mode not in IMSM_MODES:
        raise ValueError(f"mode: expected one of {IMSM_MODES}, got {mode!r}")
    image_logit_scale = finite_float(image_logit_scale, "image_logit_scale", low=0.0, low_open=True)
    audio_logit_scale = finite_float(audio_logit_scale, "audio_logit_scale", low=0.0, low_open=True)
    it = _check_square(image_text, "image_text") * image_logit_scale
    at = _check_square(audio_text, "audio_text", n=it.shape[0]) * audio_logit_scale
    with np.errstate(over="ignore", invalid="ignore"):
        out = it @ at.T if mode == "paper" else softmax(softmax(it, axis=1) @ softmax(at, axis=1).T, axis=1)
    if not np.isfinite(out).all():
        raise FloatingPointError("imsm: the matrix is not finite (similarities or logit scales beyond float range)")
    return out


def imsm(image_text, audio_text, mode: str = "paper", *, image_logit_scale: float = 1.0,
         audio_logit_scale: float = 1.0) -> float:
    """MeLFusion's image-music similarity: the mean diagonal of :func:`imsm_matrix` (matched image-audio pairs).

    ``mode="paper"``: ``mean(diag(S_IT @ S_AT.T))``; ``mode="released"``:
    ``mean(diag(softmax(softmax(S_IT) @ softmax(S_AT).T)))`` with row softmaxes.
    Higher is better in both modes.
    """
    m = imsm_matrix(image_text, audio_text, mode, image_logit_scale=image_logit_scale,
                    audio_logit_scale=audio_logit_scale)
    return float(np.diag(m).mean())
