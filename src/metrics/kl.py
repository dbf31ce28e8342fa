"""The KL divergence between classifier outputs of paired clips, as audioldm_eval computes it.

audioldm_eval (haoheliu/audioldm_eval, ``metrics/kl.py``, ``calculate_kl``)
pairs each reference clip with the generated clip of the same file name,
runs PANNs CNN14 on both and computes, with ``g`` the generated logits and
``r`` the reference logits of ``n`` pairs::

    softmax: F.kl_div(log(softmax(g) + 1e-6), softmax(r), reduction="sum") / n
    sigmoid: F.kl_div(log(sigmoid(g) + 1e-6), sigmoid(r), reduction="sum") / n

``F.kl_div(input=log q, target=p)`` sums ``p * (log p - log q)``: the
divergence is **KL(reference || generated)**, the reference distribution
being the target. The sigmoid variant applies the same sum to the 527
independent sigmoid probabilities (the "positive" terms only, no ``1 - p``
terms), so it is not a sum of Bernoulli divergences and can be negative;
it is kept for comparability. The ``1e-6`` is added to the generated
probabilities before the log, exactly as there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax, xlogy

from ..checks import finite_float

__all__ = ["KL_VARIANTS", "KL_DIRECTION", "kl_divergence", "kl_divergence_per_pair", "pair_by_stem"]

KL_VARIANTS = ("softmax", "sigmoid")
KL_DIRECTION = "KL(reference || generated)"
KL_EPS = 1e-6


def _check_logits(x, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric (n, classes) array, got {type(x).__name__} ({exc})") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty 2-D (n, classes) array of logits, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} to pair row by row with generated_logits, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def kl_divergence_per_pair(generated_logits, reference_logits, variant: str = "softmax",
                           eps: float = KL_EPS) -> np.ndarray:
    """``sum_c p_c (log p_c - log(q_c + eps))`` for each pair (row): ``p`` from the reference, ``q`` generated.

    ``eps=0`` takes ``log q`` from ``log_softmax`` / ``log_sigmoid`` directly, so a generated probability
    that underflows to 0 still gives a finite divergence. Finite logits always give finite values.
    """
    if variant not in KL_VARIANTS:
        raise ValueError(f"variant: expected one of {KL_VARIANTS}, got {variant!r}")
    eps = finite_float(eps, "eps", low=0.0)
    gen = _check_logits(generated_logits, "generated_logits")
    ref = _check_logits(reference_logits, "reference_logits", shape=gen.shape)
    with np.errstate(over="ignore"):  # logits near the float limit: softmax's shift overflows harmlessly
        if variant == "softmax":
            p, log_p = softmax(ref, axis=1), log_softmax(ref, axis=1)
            q, log_q = softmax(gen, axis=1), log_softmax(gen, axis=1)
        else:
            p, log_p = expit(ref), log_expit(ref)
            q, log_q = expit(gen), log_expit(gen)
    # p * log p is 0 where p underflows to 0 (as torch's kl_div treats a zero target)
    plogp = np.where(p > 0, p * log_p, 0.0)
    plogq = np.where(p > 0, p * log_q, 0.0) if eps == 0 else xlogy(p, q + eps)
    out = (plogp - plogq).sum(axis=1)
    if not np.isfinite(out).all():
        raise FloatingPointError("kl_divergence: the divergence is not finite (logits beyond float range?)")
    return out


def kl_divergence(generated_logits, reference_logits, variant: str = "softmax", eps: float = KL_EPS) -> float:
    """KL(reference || generated), summed over classes and averaged over pairs (audioldm_eval's ``KL``).

    Args:
        generated_logits: ``(n, classes)`` classifier logits of the generated clips
            (PANNs CNN14: the 527 AudioSet logits, before the sigmoid).
        reference_logits: ``(n, classes)`` logits of the reference clips, row ``i``
            paired with row ``i`` of ``generated_logits`` (see :func:`pair_by_stem`).
        variant: ``"softmax"`` (audioldm_eval's ``KL``, the one papers report) or
            ``"sigmoid"`` (its ``KL_Sigmoid``).
        eps: added to the generated probabilities before the log (audioldm_eval: 1e-6).
    """
    return float(kl_divergence_per_pair(generated_logits, reference_logits, variant, eps).mean())


def _few(items: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else f" ({len(items)})")


def _by_stem(paths: Iterable[str | Path], name: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if p.stem in out:
            raise ValueError(f"{name}: two files share the stem {p.stem!r} ({out[p.stem]} and {p}); "
                             "pairing by stem needs unique stems")
        out[p.stem] = p
    return out


def pair_by_stem(generated: Iterable[str | Path], reference: Iterable[str | Path]) -> list[tuple[str, Path, Path]]:
    """``(stem, generated_path, reference_path)`` for every stem, sorted; a ``ValueError`` lists unmatched stems.

    Paired metrics (KL) need exactly one generated file per reference file,
    matched by file name without extension (``song.wav`` <-> ``song.flac``).
    """
    gen = _by_stem(generated, "generated")
    ref = _by_stem(reference, "reference")
    only_gen = sorted(set(gen) - set(ref))
    only_ref = sorted(set(ref) - set(gen))
    if only_gen or only_ref:
        parts = []
        if only_ref:
            parts.append(f"reference files with no generated file of the same stem: {_few(only_ref)}")
        if only_gen:
            parts.append(f"generated files with no reference file of the same stem: {_few(only_gen)}")
        raise ValueError("KL pairs generated and reference files by stem, but " + "; ".join(parts))
    return [(s, gen[s], ref[s]) for s in sorted(gen)]
