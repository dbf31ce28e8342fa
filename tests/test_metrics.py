"""The metric math: Frechet distance (closed forms, scipy parity, rank deficiency, FAD-inf), KL, IMSM, CLAP score."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from melfusion.metrics import (
    FewSamplesWarning,
    NearSingularWarning,
    clap_score,
    fit_frechet_distance_inf,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_inf,
    gaussian_stats,
    imsm,
    imsm_matrix,
    kl_divergence,
    pair_by_stem,
)


def _with_exact_stats(n: int, mu: np.ndarray, var: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly ``mu`` and unbiased sample covariance exactly ``diag(var)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, mu.size))
    x -= x.mean(axis=0)
    q, _ = np.linalg.qr(x)  # orthonormal columns, still centred (they span the centred columns)
    return q * np.sqrt((n - 1) * var) + mu


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# -- Frechet distance ---------------------------------------------------------------------------


def test_identical_sets_give_zero():
    a = np.random.default_rng(0).standard_normal((200, 16)) * 3 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a.copy()[::-1]) == pytest.approx(0.0, abs=1e-9)  # row order does not matter


def test_diagonal_gaussians_closed_form():
    mu1, var1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    mu2, var2 = np.array([1.0, 1.0, 0.0, 0.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a = _with_exact_stats(50, mu1, var1, seed=1)
    b = _with_exact_stats(80, mu2, var2, seed=2)
    mu_a, s_a = gaussian_stats(a)
    np.testing.assert_allclose(mu_a, mu1, atol=1e-12)
    np.testing.assert_allclose(s_a, np.diag(var1), atol=1e-12)
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    # by hand: means 1 + 0 + 4 + 0.25 = 5.25; variances (1+9-6) + (4+1-4) + 0 + (2+0.5-2) = 5.5
    assert expected == pytest.approx(10.75)
    assert frechet_distance(a, b) == pytest.approx(10.75, rel=1e-10)


def test_from_stats_isotropic():
    d = 7  # N(0, I) vs N(0, 4 I): d * (1 + 4 - 2 * 2) = d
    assert frechet_distance_from_stats(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 12
    a = rng.standard_normal((300, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((250, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-6)


def test_fewer_samples_than_dimensions_is_finite_and_warned():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((10, 32)), rng.standard_normal((12, 32)) + 0.5
    with pytest.warns(FewSamplesWarning) as record:
        value = frechet_distance(a, b)
    messages = [str(w.message) for w in record]
    assert any("a has 10 samples for 32 dimensions" in m for m in messages)
    assert any("b has 12 samples for 32 dimensions" in m for m in messages)
    assert np.isfinite(value) and value >= 0


def test_duplicated_columns_are_stable():
    # a duplicated feature doubles the distance exactly: the covariances are S * ones(2, 2), singular
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((400, 1)), rng.standard_normal((300, 1)) * 2 + 1
    single = frechet_distance(x, y)
    with pytest.warns(NearSingularWarning):
        doubled = frechet_distance(np.hstack([x, x]), np.hstack([y, y]))
    assert doubled == pytest.approx(2 * single, rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eps=0: no offset, still exact through the symmetric eigenproblem
        assert frechet_distance(np.hstack([x, x]), np.hstack([y, y]), eps=0) == pytest.approx(2 * single, rel=1e-9)


def test_constant_sets():
    a, b = np.ones((5, 3)), np.zeros((6, 3))
    with pytest.warns(NearSingularWarning):
        assert frechet_distance(a, b) == pytest.approx(3.0, abs=1e-5)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros(5), np.zeros((5, 2)), "a: expected a 2-D"),
        (np.zeros((5, 2)), np.zeros((5, 3)), "b: expected 2 columns"),
        (np.zeros((1, 2)), np.zeros((5, 2)), "a: need at least 2 rows"),
        (np.zeros((5, 2)), np.full((5, 2), np.nan), "b: 5 row"),
        ("text", np.zeros((5, 2)), "a: expected"),
    ],
)
def test_frechet_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


_sets = arrays(np.float64, st.tuples(st.integers(3, 12), st.just(3)),
               elements=st.floats(-10, 10, allow_nan=False, width=32))


@settings(max_examples=40, deadline=None)
@given(a=_sets, b=_sets)
@example(a=np.array([[0.0, 0, 0], [0, 0, 0], [8, 4, 0]]),
         b=np.array([[0.0, 0, 2.00001001], [0, 0, 0], [8, 4, 0]]))  # asymmetric by 1.7e-7 (eps * I path)
def test_symmetric_and_non_negative(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab >= 0
    # near-singular covariances (few rows, repeated rows) take the eps * I path, where the trace of the
    # matrix square root carries round-off of order sqrt(eps * scale); found by hypothesis at 3e-7
    assert ab == pytest.approx(ba, rel=1e-6, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(a=_sets, b=_sets, shift=arrays(np.float64, 3, elements=st.floats(-100, 100, width=32)))
def test_translating_both_sets_changes_nothing(a, b, shift):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before, after = frechet_distance(a, b), frechet_distance(a + shift, b + shift)
    assert after == pytest.approx(before, rel=1e-6, abs=1e-5)


def test_fad_inf_is_closer_to_the_population_value():
    rng = np.random.default_rng(0)
    d, mu = 16, np.full(16, 0.25)
    truth = float(mu @ mu)  # N(mu, I) vs N(0, I)
    reference = rng.standard_normal((20_000, d))
    generated = rng.standard_normal((300, d)) + mu
    plain = frechet_distance(generated, reference)
    fit = fit_frechet_distance_inf(generated, reference, sizes=range(60, 301, 20), repeats=3, seed=0)
    assert abs(fit.value - truth) < 0.5 * abs(plain - truth)
    assert fit.slope > 0  # the bias shrinks with N
    assert frechet_distance_inf(generated, reference, sizes=range(60, 301, 20), repeats=3) == fit.value


def test_fad_inf_bad_sizes():
    a = np.random.default_rng(0).standard_normal((20, 2))
    with pytest.raises(ValueError, match="sizes: each size must be in 2..20"):
        frechet_distance_inf(a, a, sizes=[5, 40])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        frechet_distance_inf(a, a, sizes=[5])


# -- KL -----------------------------------------------------------------------------------------


def test_kl_softmax_by_hand():
    gen = np.array([[0.0, 0.0]])  # q = (1/2, 1/2)
    ref = np.array([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    # KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
    assert kl_divergence(gen, ref, eps=0) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)
    assert kl_divergence(gen, ref, eps=0) == pytest.approx(0.130812, abs=1e-6)
    # the other direction, KL(q || p) = 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410...: not what is computed
    assert kl_divergence(ref, gen, eps=0) == pytest.approx(0.143841, abs=1e-6)
    # audioldm_eval's 1e-6 inside the log
    with_eps = 0.75 * (math.log(0.75) - math.log(0.5 + 1e-6)) + 0.25 * (math.log(0.25) - math.log(0.5 + 1e-6))
    assert kl_divergence(gen, ref) == pytest.approx(with_eps, rel=1e-12)


def test_kl_sigmoid_by_hand_can_be_negative():
    gen = np.array([[math.log(3.0)]])  # sigmoid -> 3/4
    ref = np.array([[0.0]])  # sigmoid -> 1/2
    # only the p ln(p/q) term of each class: 1/2 ln(2/3) < 0
    assert kl_divergence(gen, ref, variant="sigmoid", eps=0) == pytest.approx(0.5 * math.log(2 / 3), rel=1e-12)


def test_kl_averages_over_pairs():
    gen = np.array([[0.0, 0.0], [0.0, 0.0]])
    ref = np.array([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert kl_divergence(gen, ref, eps=0) == pytest.approx(0.130812 / 2, abs=1e-6)
    assert kl_divergence(ref, ref, eps=0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("variant", ["softmax", "sigmoid"])
def test_kl_matches_audioldm_eval_formula(variant):
    rng = np.random.default_rng(0)
    gen, ref = rng.standard_normal((6, 527)) * 3, rng.standard_normal((6, 527)) * 3
    g, r = torch.from_numpy(gen), torch.from_numpy(ref)
    act = (lambda x: x.softmax(dim=1)) if variant == "softmax" else torch.sigmoid
    expected = torch.nn.functional.kl_div((act(g) + 1e-6).log(), act(r), reduction="sum") / len(g)
    assert kl_divergence(gen, ref, variant=variant) == pytest.approx(float(expected), rel=1e-9)


def test_kl_bad_inputs():
    with pytest.raises(ValueError, match="reference_logits: expected shape"):
        kl_divergence(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="variant"):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 3)), variant="tanh")
    with pytest.raises(ValueError, match="generated_logits: expected a non-empty 2-D"):
        kl_divergence(np.zeros(3), np.zeros(3))


def test_pair_by_stem():
    pairs = pair_by_stem(["g/b.wav", "g/a.flac"], ["r/a.wav", "r/b.wav"])
    assert [(s, str(g), str(r)) for s, g, r in pairs] == [("a", "g/a.flac", "r/a.wav"), ("b", "g/b.wav", "r/b.wav")]
    with pytest.raises(ValueError, match=r"no generated file of the same stem: c \(1\).*no reference file.*: x, y"):
        pair_by_stem(["a.wav", "x.wav", "y.wav"], ["a.wav", "c.wav"])
    many = [f"{i:03d}.wav" for i in range(25)]
    with pytest.raises(ValueError, match=r"009, \.\.\. \(25 in all\)"):
        pair_by_stem(many, [])
    with pytest.raises(ValueError, match="share the stem 'a'"):
        pair_by_stem(["g/a.wav", "g/sub/a.wav"], ["a.wav"])


# -- IMSM and CLAP score -------------------------------------------------------------------------


def test_imsm_paper_2x2_by_hand():
    it = np.array([[0.9, 0.1], [0.2, 0.8]])
    at = np.array([[0.7, 0.3], [0.4, 0.6]])
    # it @ at.T = [[0.66, 0.42], [0.38, 0.56]]
    np.testing.assert_allclose(imsm_matrix(it, at), [[0.66, 0.42], [0.38, 0.56]], atol=1e-12)
    assert imsm(it, at) == pytest.approx(0.61)
    assert imsm(it, at, mode="paper") == pytest.approx(0.61)


def test_imsm_paper_3x3_by_hand():
    it = np.eye(3)
    at = np.array([[0.5, 0.1, 0.0], [0.2, 0.3, 0.1], [0.0, 0.4, 0.7]])
    assert imsm(it, at) == pytest.approx((0.5 + 0.3 + 0.7) / 3)


def test_imsm_released_2x2_by_hand():
    s = np.array([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    # row softmaxes: [[3/4, 1/4], [1/4, 3/4]]; product [[5/8, 3/8], [3/8, 5/8]];
    # last softmax: diagonal = 1 / (1 + e^(-1/4)) = 0.5621765...
    assert imsm(s, s, mode="released") == pytest.approx(1 / (1 + math.exp(-0.25)), rel=1e-12)
    assert imsm(s, s, mode="released") == pytest.approx(0.5621765, abs=1e-7)
    # with cosine similarities as input, the logit scales reproduce the same logits
    eye = np.eye(2)
    assert imsm(eye, eye, mode="released", image_logit_scale=math.log(3.0),
                audio_logit_scale=math.log(3.0)) == pytest.approx(0.5621765, abs=1e-7)
    # uninformative similarities give 1/N
    assert imsm(np.zeros((2, 2)), np.zeros((2, 2)), mode="released") == pytest.approx(0.5)
    np.testing.assert_allclose(imsm_matrix(s, s, mode="released").sum(axis=1), 1.0)


def test_imsm_released_3x3_rows_sum_to_one_and_n1_is_one():
    rng = np.random.default_rng(0)
    m = imsm_matrix(rng.standard_normal((3, 3)), rng.standard_normal((3, 3)), mode="released")
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert imsm([[0.3]], [[-0.2]], mode="released") == pytest.approx(1.0)


def test_imsm_bad_inputs():
    with pytest.raises(ValueError, match="image_text: expected a square"):
        imsm(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"audio_text: expected shape \(2, 2\)"):
        imsm(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="mode"):
        imsm(np.zeros((2, 2)), np.zeros((2, 2)), mode="average")


def test_clap_score_by_hand():
    audio = np.array([[1.0, 0.0], [0.0, 2.0]])
    text = np.array([[3.0, 0.0], [1.0, 1.0]])
    # cosines 1 and 1/sqrt(2)
    assert clap_score(audio, text) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert clap_score(-audio, text) == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2)


def test_clap_score_bad_inputs():
    with pytest.raises(ValueError, match="text_embeddings: expected shape"):
        clap_score(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="audio_embeddings: row"):
        clap_score(np.zeros((2, 3)), np.ones((2, 3)))
