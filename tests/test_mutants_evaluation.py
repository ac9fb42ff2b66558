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
