"""Evaluation numbers against references that do not share the code under test.

- Inception Score with a split count that does not divide N: ceil(N / splits) rows per chunk (the last one
  shorter), KL terms from torch.distributions.
- Precision/recall with k = 1..4 against plain-Python k-th-neighbour radii and a hand-worked line of points
  whose answer changes with k (so a k +- 1 slip shows).
- Inception features of non-square, asymmetric images against torch-fidelity's network fed NCHW tensors
  built here: the FID/IS/PR tests compare two sides that went through the same extractor, which a
  transposed input would leave equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from repro.evaluation import inception_score, precision_recall
from repro.evaluation.features import InceptionExtractor
from tests.test_evaluation import write_random_inception

# ---------------------------------------------------------------------------------------------------
# Inception Score


def _is_reference(probs: torch.Tensor, chunks: list[tuple[int, int]]) -> float:
    scores = []
    for lo, hi in chunks:
        p = probs[lo:hi]
        marginal = Categorical(probs=p.mean(0))
        kl = torch.stack([kl_divergence(Categorical(probs=row), marginal) for row in p])
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores))


@pytest.mark.parametrize("n,splits,chunks", [
    (10, 3, [(0, 4), (4, 8), (8, 10)]),            # ceil(10/3) = 4, not 3 (which would make 4 chunks)
    (23, 5, [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]),
    (7, 2, [(0, 4), (4, 7)]),
])
def test_inception_score_splits_that_do_not_divide(n, splits, chunks):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2.5
    probs = torch.softmax(logits, dim=1)
    expected = _is_reference(probs, chunks)
    assert inception_score(logits.numpy(), splits=splits) == pytest.approx(expected, rel=1e-10)
    assert inception_score(logits.numpy(), split_size=chunks[0][1]) == pytest.approx(expected, rel=1e-10)
    floor_chunks = [(lo, min(lo + n // splits, n)) for lo in range(0, n, n // splits)]
    assert _is_reference(probs, floor_chunks) != pytest.approx(expected, rel=1e-6)  # the case tells them apart


# ---------------------------------------------------------------------------------------------------
# Precision / recall: the k-th neighbour


def _kth_radius(points: list[list[float]], k: int) -> list[float]:
    """Squared distance of each point to its k-th nearest other point (plain Python)."""
    out = []
    for a in points:
        d = sorted(sum((x - y) ** 2 for x, y in zip(a, b)) for b in points)  # includes itself at 0
        out.append(d[k])
    return out


def _pr_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    r, f = real.tolist(), fake.tolist()
    rr, rf = _kth_radius(r, k), _kth_radius(f, k)
    dist = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b))  # noqa: E731
    precision = np.mean([any(dist(q, p) <= rad for p, rad in zip(r, rr)) for q in f])
    recall = np.mean([any(dist(p, q) <= rad for q, rad in zip(f, rf)) for p in r])
    return float(precision), float(recall)


def test_precision_recall_on_a_line_changes_with_k_as_worked_out_by_hand():
    # real 0, 1, 3, 7, 15 (gaps doubling); squared distance to the k-th nearest other real point:
    #   k=1: 1, 1, 4, 16, 64        k=2: 9, 4, 9, 36, 144
    # fake 5, 12, 27; their own radii: k=1: 49, 49, 225
    # precision, k=1: 5 is in 3's ball (4 <= 4), 12 in 15's (9 <= 64), 27 is in none (to 15: 144 > 64) -> 2/3
    # precision, k=2: 27 is now in 15's ball (144 <= 144)                                           -> 1
    # recall, k=1: 0 (25 to 5), 1 (16), 3 (4), 7 (4) are in 5's ball (49), 15 in 12's (9 <= 49)       -> 1
    real = np.array([[x, 0.0] for x in (0, 1, 3, 7, 15)])
    fake = np.array([[x, 0.0] for x in (5, 12, 27)])
    assert _kth_radius(real.tolist(), 1) == [1, 1, 4, 16, 64]
    assert _kth_radius(real.tolist(), 2) == [9, 4, 9, 36, 144]
    assert precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
    assert precision_recall(real, fake, k=2) == pytest.approx((1.0, 1.0))
    # fewer fake points than k + 1 cannot form balls
    from repro.errors import ReproError

    with pytest.raises(ReproError, match="needs more than 3"):
        precision_recall(real, fake, k=3)
    # the recall side on its own: swap the roles
    assert precision_recall(fake, real, k=1) == pytest.approx((1.0, 2 / 3))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_precision_recall_match_plain_python_for_several_k(k):
    rng = np.random.default_rng(10 + k)
    real = rng.integers(-6, 7, size=(13, 3)).astype(np.float64)
    fake = rng.integers(-9, 10, size=(11, 3)).astype(np.float64) + np.array([2.0, 0.0, 0.0])
    expected = _pr_reference(real, fake, k)
    assert precision_recall(real, fake, k=k, batch_size=4) == pytest.approx(expected)
    assert precision_recall(real, fake, k=k) == pytest.approx(expected)
    neighbours = {_pr_reference(real, fake, j) for j in (k - 1, k + 1) if j >= 1}
    assert expected not in neighbours  # the data tells k from k - 1 and k + 1


# ---------------------------------------------------------------------------------------------------
# Inception input layout


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth", seed=3)


def test_inception_features_of_non_square_images_match_torch_fidelity_fed_nchw(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    rng = np.random.default_rng(0)
    h, w = 24, 40
    ramp = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.3, 0.0])  # left-to-right red ramp
    images = np.clip(ramp[None] + rng.normal(0, 30, (3, h, w, 3)), 0, 255).astype(np.uint8)
    images[:, : h // 3, :, 2] = 255  # a blue band along the top
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights)).eval()
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # (N, 3, H, W), rows = image height
    with torch.no_grad():
        pool, logits = net(nchw)
        pool_t, _ = net(nchw.transpose(2, 3).contiguous())
    got = InceptionExtractor(weights, device="cpu")(images)
    np.testing.assert_allclose(got["pool"], pool.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(pool.numpy(), pool_t.numpy(), rtol=1e-3)  # the transposed image is another vector
    square = images[:, :, :h]  # square crops too (where a transposed input still has the right shape)
    with torch.no_grad():
        pool_sq, _ = net(torch.from_numpy(square.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(InceptionExtractor(weights, device="cpu")(square)["pool"], pool_sq.numpy(),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# From mutation testing of repro/evaluation/metrics.py (docs/mutation_testing.md)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_frechet_errors_name_the_argument_at_fault():
    from repro.errors import ReproError
    from repro.evaluation import frechet_distance

    mu, sigma = np.zeros(3), np.eye(3)
    bad_mu = np.array([0.0, np.nan, np.inf])
    negative = np.diag([1.0, 1.0, -1.0])
    cases = [((np.zeros((3, 1)), sigma, mu, sigma), r"^mu1 must be a vector \(d,\), got shape \(3, 1\)"),
             ((mu, sigma, bad_mu, sigma), r"^mu2 has 2 non-finite entries"),
             ((bad_mu, sigma, mu, sigma), r"^mu1 has 2 non-finite entries"),
             ((mu, np.eye(2), mu, sigma), r"^sigma1 must have shape \(3, 3\) to match its mean, got \(2, 2\)"),
             ((mu, sigma, mu, np.full((3, 3), np.nan)), r"^sigma2 has 9 non-finite entries"),
             ((mu, negative, mu, sigma), r"^sigma1 is not a covariance matrix"),
             ((mu, sigma, mu, negative), r"^sigma2 is not a covariance matrix"),
             ((np.full(3, 1e200), sigma, -np.full(3, 1e200), sigma), r"not finite .* overflow float64")]
    for args, message in cases:
        with pytest.raises(ReproError, match=message):
            frechet_distance(*args)
    from repro.evaluation.metrics import psd_eigen

    with pytest.raises(ReproError, match=r"^sigma is not a covariance matrix"):
        psd_eigen(negative)


def test_frechet_small_values_zero_and_tiny_covariances_follow_the_closed_form():
    from repro.evaluation import frechet_distance

    # FD of diagonal Gaussians = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    assert frechet_distance(np.zeros(2), np.eye(2), np.array([0.5, 0.0]), np.eye(2)) == pytest.approx(0.25)
    assert frechet_distance(np.zeros(2), np.zeros((2, 2)), np.array([0.3, 0.4]), np.zeros((2, 2))) == pytest.approx(0.25)
    a, b = np.array([4.0, 1.0, 9.0]) * 1e-20, np.array([1.0, 1.0, 4.0]) * 1e-20  # features of scale 1e-10
    expected = 1e-20 * (1.0 + 0.0 + 1.0)
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected, rel=1e-9, abs=0)


def test_frechet_and_inception_score_compute_float32_inputs_in_float64():
    from repro.evaluation import frechet_distance

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((40, 6)) * 1.3 + 0.1
    stats = [v.astype(np.float32) for v in (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))]
    as64 = [v.astype(np.float64) for v in stats]
    assert frechet_distance(*stats) == pytest.approx(frechet_distance(*as64), rel=1e-13)
    logits = (rng.standard_normal((30, 50)) * 4).astype(np.float32)
    assert inception_score(logits, splits=3) == pytest.approx(inception_score(logits.astype(np.float64), splits=3),
                                                               rel=1e-13)


def test_frechet_of_identical_rank_deficient_statistics_is_rounding_small():
    from repro.evaluation import feature_statistics, frechet_distance

    feats = np.random.default_rng(1).standard_normal((6, 64)) * 3.0  # rank 5 covariance in 64 dimensions
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) <= 1e-10 * np.trace(sigma)


def test_feature_statistics_row_limits():
    from repro.errors import ReproError
    from repro.evaluation import feature_statistics

    two = np.array([[1.0, 2.0], [3.0, 6.0]])
    mu, sigma = feature_statistics(two)
    np.testing.assert_allclose(sigma, np.cov(two, rowvar=False))
    mu, sigma = feature_statistics(np.array([[1.0], [2.0], [4.0]]))  # one feature column is fine
    assert sigma.shape == (1, 1) and sigma[0, 0] == pytest.approx(np.var([1, 2, 4], ddof=1))
    for bad in (np.ones((1, 3)), np.ones(5)):
        with pytest.raises(ReproError, match=r"statistics need at least 2 feature rows, got shape"):
            feature_statistics(bad)


def test_inception_score_input_checks_defaults_and_detection():
    from repro.errors import ReproError

    rng = np.random.default_rng(2)
    logits = rng.standard_normal((11, 6)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    chunks = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 11)]  # default splits=10: ceil(11 / 10) = 2 rows
    assert inception_score(logits) == pytest.approx(_is_reference(torch.from_numpy(p), chunks), rel=1e-10)
    assert inception_score(logits[:1], splits=1) == pytest.approx(1.0)  # one row is a valid (trivial) input
    for bad, message in ((np.ones((0, 5)), r"needs an \(N, classes\) array, got shape \(0, 5\)"),
                         (np.ones((3, 1)), r"needs an \(N, classes\) array, got shape \(3, 1\)"),
                         (np.ones(4), r"needs an \(N, classes\) array, got shape \(4,\)"),
                         (np.array([[0.0, np.nan]]), r"^inception_score: logits/probabilities contain NaN or inf$")):
        with pytest.raises(ReproError, match=message):
            inception_score(bad, splits=1)
    with pytest.raises(ReproError, match=r"inputs must be 'auto', 'logits' or 'probs', got 'softmax'"):
        inception_score(logits, inputs="softmax")
    with pytest.raises(ReproError, match=r"splits must be >= 1, got 0"):
        inception_score(logits, splits=0)
    # auto: non-negative rows that do not sum to 1 are logits; rows within 1e-4 of 1 are probabilities
    positive = rng.random((10, 6)) * 0.5  # row sums ~1.5
    assert inception_score(positive, splits=2) == pytest.approx(inception_score(positive, splits=2, inputs="logits"))
    nearly = p[:10] * (1 + 5e-5)
    assert inception_score(nearly, splits=2) == pytest.approx(inception_score(p[:10], splits=2, inputs="probs"),
                                                              rel=1e-9)
    # probabilities given unnormalised are normalised per row
    assert inception_score(p[:10] * 3.0, splits=2, inputs="probs") == pytest.approx(
        inception_score(p[:10], splits=2, inputs="probs"), rel=1e-12)


def test_precision_recall_shape_checks_device_argument_and_recall_ties():
    from repro.errors import ReproError

    real = np.array([[x, 0.0] for x in (0, 1, 3, 7, 15)])
    fake = np.array([[x, 0.0] for x in (5, 12, 27)])
    assert precision_recall(real, fake, k=1, device="cpu") == pytest.approx((2 / 3, 1.0))
    # roles swapped at k=2: 27 lies on the boundary of 15's ball (144 <= 144) and counts for recall
    assert precision_recall(fake, real, k=2) == pytest.approx((1.0, 1.0))
    for a, b in ((real, np.ones((5, 3))), (np.ones(5), real), (real, np.ones(5))):
        with pytest.raises(ReproError, match=r"precision_recall needs \(N, D\) arrays of the same D, got \("):
            precision_recall(a, b, k=1)
