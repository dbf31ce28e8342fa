"""The Frechet distance between two sets of embeddings, and its extrapolation to infinitely many samples.

Each set is summarised by a Gaussian (mean ``mu``, covariance ``S``, the
unbiased ``n - 1`` estimate as ``np.cov`` gives it, which is what pytorch-fid,
Google's FAD and audioldm_eval use)::

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b))

``S_a S_b`` is not symmetric, so ``scipy.linalg.sqrtm`` on it can return
complex noise or fail on singular covariances. Here the trace is taken from
a symmetric matrix instead: with ``R = sqrtm(S_a)`` (a symmetric
eigendecomposition, negative round-off eigenvalues clipped to 0),
``S_a S_b = R (R S_b)`` has the same non-zero eigenvalues as
``M = R S_b R``, which is symmetric positive semi-definite, so
``tr(sqrtm(S_a S_b)) = sum(sqrt(eigvalsh(M)))``. That holds for singular
covariances too (fewer samples than dimensions, duplicated features).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..checks import finite_float

__all__ = [
    "FewSamplesWarning",
    "NearSingularWarning",
    "FrechetInfFit",
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_distance_inf",
    "fit_frechet_distance_inf",
]

#: a covariance whose smallest eigenvalue is below this fraction of its largest counts as near-singular
SINGULAR_RTOL = 1e-10


class FewSamplesWarning(UserWarning):
    """Fewer samples than dimensions: the covariance is singular and the distance is strongly biased."""


class NearSingularWarning(UserWarning):
    """A covariance is (near-)singular or the result was not finite: ``eps * I`` was added to both."""


def _check_set(x, name: str, dim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric (n, d) array, got {type(x).__name__} ({exc})") from None
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) array of embeddings (rows = samples), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 rows (samples) to estimate a covariance, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name}: expected at least 1 column (dimension), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns to match the other set, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} row(s) contain NaN or infinite values")
    return arr


def _stats(arr: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(over="ignore", invalid="ignore"):
        mu, sigma = arr.mean(axis=0), np.atleast_2d(np.cov(arr, rowvar=False))
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: the values are too large for a covariance in float64 (it overflows); "
                         f"largest magnitude {float(np.abs(arr).max()):.3g}")
    return mu, sigma


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` (float64) of an ``(n, d)`` array."""
    return _stats(_check_set(x, "x"), "x")


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr(sqrtm(s1 @ s2))`` for symmetric PSD ``s1``, ``s2``, through a symmetric eigenproblem."""
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    m = 0.5 * (m + m.T)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())


def _near_singular(s: np.ndarray) -> bool:
    w = np.linalg.eigvalsh(s)
    top = float(np.abs(w).max()) if w.size else 0.0
    return top == 0.0 or float(w.min()) <= SINGULAR_RTOL * top


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: expected a (d,) mean and a (d, d) covariance, got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: the mean or covariance contains NaN or infinite values")
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    If either covariance is near-singular (smallest eigenvalue at most
    ``1e-10`` times the largest) or the computation is not finite, ``eps * I``
    is added to both covariances (as pytorch-fid does) and a
    :class:`NearSingularWarning` says so; ``eps=0`` turns the offset off.
    The result is clipped at 0 (round-off can make identical sets give -1e-13).
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "mu1/sigma1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "mu2/sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu2: expected dimension {mu1.shape[0]} to match mu1, got {mu2.shape[0]}")
    eps = finite_float(eps, "eps", low=0.0)
    diff = mu1 - mu2

    def _fd(s1: np.ndarray, s2: np.ndarray) -> float:
        try:
            tr_covmean = _trace_sqrt_product(s1, s2)
        except np.linalg.LinAlgError:
            return float("nan")
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)

    singular = eps > 0 and (_near_singular(sigma1) or _near_singular(sigma2))
    value = float("nan") if singular else _fd(sigma1, sigma2)
    if not np.isfinite(value) and eps > 0:
        reason = "is near-singular" if singular else "gave a non-finite result"
        warnings.warn(
            f"frechet_distance: a covariance {reason}; adding eps={eps:g} * I to both covariances "
            "(the result carries an offset of order eps * d)",
            NearSingularWarning,
            stacklevel=3,
        )
        offset = eps * np.eye(sigma1.shape[0])
        value = _fd(sigma1 + offset, sigma2 + offset)
    if not np.isfinite(value):
        raise FloatingPointError("frechet_distance: the result is not finite even with the eps offset")
    return max(value, 0.0)


def frechet_distance(a, b, eps: float = 1e-6) -> float:
    """The Frechet distance between the Gaussians fitted to ``a`` and ``b``.

    Args:
        a: ``(n_a, d)`` embeddings (rows are frames or clips), e.g. the generated set.
        b: ``(n_b, d)`` embeddings of the other set, same ``d``.
        eps: the diagonal offset used when a covariance is near-singular (see
            :func:`frechet_distance_from_stats`).

    Returns:
        A float >= 0; 0 (up to round-off) for identical sets. Symmetric in ``a`` and ``b``.

    Warns:
        FewSamplesWarning: when a set has fewer rows than ``d`` (the covariance
            is then singular and the distance strongly depends on ``n``).
    """
    a = _check_set(a, "a")
    b = _check_set(b, "b", dim=a.shape[1])
    d = a.shape[1]
    for name, arr in (("a", a), ("b", b)):
        if arr.shape[0] < d:
            warnings.warn(
                f"frechet_distance: {name} has {arr.shape[0]} samples for {d} dimensions; the covariance is "
                "singular and the distance is biased (use more samples, or compare only at equal n)",
                FewSamplesWarning,
                stacklevel=2,
            )
    mu1, s1 = _stats(a, "a")
    mu2, s2 = _stats(b, "b")
    if a.shape[0] < d or b.shape[0] < d:  # already warned: the offset is expected, not news
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NearSingularWarning)
            return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)


@dataclass
class FrechetInfFit:
    """The fit ``FD(N) = value + slope / N`` over subset sizes ``sizes`` (``distances`` are the means per size)."""

    value: float
    slope: float
    sizes: list[int] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    r2: float = float("nan")


def _default_sizes(n: int, steps: int = 15) -> np.ndarray:
    low = min(500, max(2, n // 5))
    return np.unique(np.linspace(low, n, steps).round().astype(int))


def fit_frechet_distance_inf(
    a,
    b,
    sizes=None,
    repeats: int = 1,
    seed: int = 0,
    eps: float = 1e-6,
) -> FrechetInfFit:
    """Extrapolate the Frechet distance to an infinite generated set (FAD-infinity).

    The Frechet distance estimated from N samples is biased upwards by a term
    that shrinks like ``1/N`` (Chong & Forsyth 2020 for FID; Gui et al. 2024,
    "Adapting Frechet Audio Distance for Generative Music Evaluation", for
    FAD). For each size ``N`` in ``sizes`` a random subset of ``a`` (without
    replacement, ``repeats`` times, seeded) is compared with all of ``b``;
    a least-squares line in ``1/N`` gives the intercept, the distance at
    ``N = infinity``.

    Args:
        a: ``(n_a, d)`` generated embeddings (the set that is subsampled).
        b: ``(n_b, d)`` reference embeddings (always used whole).
        sizes: subset sizes (each in ``2..n_a``); default 15 sizes evenly spaced
            from ``min(500, n_a // 5)`` (at least 2) to ``n_a``.
        repeats: subsets drawn per size; their distances are averaged.
        seed: seed of the subset draws.
    """
    a = _check_set(a, "a")
    b = _check_set(b, "b", dim=a.shape[1])
    n = a.shape[0]
    if sizes is not None:
        raw = np.asarray(sizes)
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise ValueError(f"sizes: expected a list of integer subset sizes, got {sizes!r}")
    sizes = _default_sizes(n) if sizes is None else np.unique(np.asarray(sizes, dtype=int))
    if sizes.ndim != 1 or sizes.size < 2:
        raise ValueError(f"sizes: expected at least 2 distinct subset sizes, got {sizes.tolist()}")
    if sizes.min() < 2 or sizes.max() > n:
        raise ValueError(f"sizes: each size must be in 2..{n} (the rows of a), got {sizes.tolist()}")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats: expected a positive integer, got {repeats!r}")
    rng = np.random.default_rng(seed)
    means = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        warnings.simplefilter("ignore", NearSingularWarning)
        for size in sizes:
            values = [frechet_distance(a[rng.choice(n, size=int(size), replace=False)], b, eps=eps)
                      for _ in range(repeats)]
            means.append(float(np.mean(values)))
    x = 1.0 / sizes.astype(np.float64)
    y = np.asarray(means)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return FrechetInfFit(float(intercept), float(slope), sizes.tolist(), means, r2)


def frechet_distance_inf(a, b, sizes=None, repeats: int = 1, seed: int = 0, eps: float = 1e-6) -> float:
    """The intercept of :func:`fit_frechet_distance_inf`: the Frechet distance extrapolated to ``N -> inf``.

    Unlike :func:`frechet_distance` it can be (slightly) negative when the
    sets are near-identical, since it is an extrapolation.
    """
    return fit_frechet_distance_inf(a, b, sizes=sizes, repeats=repeats, seed=seed, eps=eps).value
