"""The numbers of the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`), in float64 NumPy/PyTorch.

Which Inception feature each metric reads (see `features.py` for the layers):
- FID:  pool_3 (2048-d) statistics of the samples vs the reference npz's `mu`/`sigma`.
- sFID: `mixed_6/conv` first 7 channels, 7*17*17 = 2023-d, vs the reference's `mu_s`/`sigma_s`.
- IS:   softmax of the unbiased logits (pool_3 @ W, no bias; 1008 classes), chunks of 5,000 samples.
- Precision/recall: pool_3 features of the samples vs pool_3 features of the reference batch images,
  k = 3 nearest neighbours (Kynkaanniemi et al. 2019), squared Euclidean distances.

Every function here is pure (arrays in, numbers out) so it is tested against closed forms.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from repro.errors import ReproError

# A symmetric matrix whose most negative eigenvalue is below -NEG_EIG_TOL * (largest |eigenvalue|) is
# not a covariance (a corrupted or mis-keyed file); anything above is rounding and is clipped to 0.
NEG_EIG_TOL = 1e-5


def _as_vector(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ReproError(f"{name} must be a vector (d,), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ReproError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite entries (NaN/inf)")
    return a


def _as_covariance(x, name: str, dim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (dim, dim):
        raise ReproError(f"{name} must have shape ({dim}, {dim}) to match its mean, got {a.shape}")
    if not np.isfinite(a).all():
        raise ReproError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite entries (NaN/inf)")
    return 0.5 * (a + a.T)  # covariances are symmetric; remove the rounding asymmetry of float32 files


def psd_eigen(sigma: np.ndarray, name: str = "sigma") -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, eigenvectors) of a positive semi-definite matrix via `eigh` (float64), keeping only the
    eigenvalues above rounding level (numpy's `matrix_rank` tolerance: max * dim * eps).

    The dropped ones are zero up to rounding (a covariance of n < dim feature rows has dim - n + 1 of them);
    a clearly negative eigenvalue means the matrix is not a covariance: an error.
    """
    w, v = np.linalg.eigh(sigma)
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    if w.min(initial=0.0) < -NEG_EIG_TOL * scale:
        raise ReproError(
            f"{name} is not a covariance matrix: eigenvalue {w.min():.3e} is negative "
            f"(largest {scale:.3e}); check that the file holds the right statistics")
    keep = w > scale * w.shape[0] * np.finfo(np.float64).eps
    return w[keep], v[:, keep]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2).

    The trace term uses the symmetric product instead of `scipy.linalg.sqrtm(sigma1 @ sigma2)` (whose
    NaN/complex results on near-singular products are hustvl/LightningDiT#97, pytorch-fid#103). With
    B = sigma2^1/2 sigma1^1/2 we have B^T B = sigma1^1/2 sigma2 sigma1^1/2, so the eigenvalues' square
    roots are B's singular values: summing them (an SVD of B) avoids taking square roots of
    rounding-noise eigenvalues of the product, so identical statistics give ~1e-13 relative, not ~1e-8.
    With sigma_k = V_k L_k V_k^T, B = V2 [L2^1/2 (V2^T V1) L1^1/2] V1^T has the singular values of the
    bracket, which needs only the eigenvectors of non-zero eigenvalues: one matmul and an SVD of
    rank2 x rank1 instead of three dim^3 matmuls and a dim x dim SVD (a few samples: 7 x 7, not 2048 x 2048).
    The result is real by construction and asserted finite; no scipy involved.
    """
    m1 = _as_vector(mu1, "mu1")
    m2 = _as_vector(mu2, "mu2")
    if m1.shape != m2.shape:
        raise ReproError(f"mu1 and mu2 differ in length: {m1.shape[0]} vs {m2.shape[0]} (features of different layers?)")
    s1 = _as_covariance(sigma1, "sigma1", m1.shape[0])
    s2 = _as_covariance(sigma2, "sigma2", m1.shape[0])

    w1, v1 = psd_eigen(s1, "sigma1")
    w2, v2 = psd_eigen(s2, "sigma2")
    core = np.sqrt(w2)[:, None] * (v2.T @ v1) * np.sqrt(w1)[None, :]  # (rank2, rank1)
    tr_covmean = float(np.linalg.svd(core, compute_uv=False).sum()) if core.size else 0.0
    diff = m1 - m2
    tr1, tr2 = float(np.trace(s1)), float(np.trace(s2))
    d = float(diff @ diff) + tr1 + tr2 - 2.0 * tr_covmean
    if not math.isfinite(d):
        raise ReproError(f"Fréchet distance is not finite ({d}); the statistics overflow float64")
    # FD >= 0 exactly; a negative value at rounding level (identical statistics) is reported as 0.
    if d < 0.0:
        if d < -1e-8 * max(tr1 + tr2, 1.0):
            raise ReproError(f"Fréchet distance came out negative ({d:.3e}): the covariances are inconsistent")
        d = 0.0
    return d


def feature_statistics(features, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, ddof=1, as `np.cov` in the ADM evaluator) in float64.

    Two passes over row chunks, so 50,000 x 2048 float32 features never get a full float64 copy.
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ReproError(f"statistics need at least 2 feature rows, got shape {x.shape}")
    n = x.shape[0]
    mu = sum(x[i:i + chunk].sum(0, dtype=np.float64) for i in range(0, n, chunk)) / n
    sigma = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for i in range(0, n, chunk):
        xc = x[i:i + chunk].astype(np.float64) - mu
        sigma += xc.T @ xc
    return mu, sigma / (n - 1)


def inception_score(logits_or_probs, splits: int = 10, *, split_size: Optional[int] = None,
                    inputs: str = "auto") -> float:
    """Inception Score: mean over splits of exp(E_x KL(p(y|x) || p(y))).

    ADM's convention: softmax of the unbiased logits, consecutive chunks of `split_size` rows (ADM
    uses 5,000: 10 splits at 50,000 samples; the last chunk may be shorter), the mean over chunks
    (no std). With `split_size=None` the chunk is ceil(N / splits). Computed in float64 from log-softmax,
    so classes with probability underflowing to 0 contribute exactly 0 instead of NaN.
    `inputs`: "logits", "probs", or "auto" (rows that are non-negative and sum to 1 are probabilities).
    """
    x = torch.as_tensor(np.asarray(logits_or_probs), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise ReproError(f"inception_score needs an (N, classes) array, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ReproError("inception_score: logits/probabilities contain NaN or inf")
    if inputs == "auto":
        inputs = "probs" if bool((x >= 0).all()) and bool(torch.allclose(x.sum(1), torch.ones(1, dtype=x.dtype), atol=1e-4)) else "logits"
    if inputs == "logits":
        log_p = torch.log_softmax(x, dim=1)
    elif inputs == "probs":
        log_p = torch.log(x / x.sum(1, keepdim=True))
    else:
        raise ReproError(f"inception_score: inputs must be 'auto', 'logits' or 'probs', got {inputs!r}")
    n = x.shape[0]
    if split_size is None:
        if splits < 1:
            raise ReproError(f"inception_score: splits must be >= 1, got {splits}")
        split_size = math.ceil(n / splits)
    scores = []
    for start in range(0, n, split_size):
        lp = log_p[start:start + split_size]
        p = lp.exp()
        log_marginal = torch.log(p.mean(0, keepdim=True))
        # p * (log p - log p_y), with 0 * log 0 = 0 (xlogy semantics) for underflowed classes
        kl_terms = torch.where(p > 0, p * (lp - log_marginal), torch.zeros_like(p))
        scores.append(math.exp(float(kl_terms.sum(1).mean())))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 = |a|^2 - 2 a.b + |b|^2, clamped at 0 (as ADM's DistanceBlock, but float32, not fp16)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour (the row itself counts as the 0-th,
    as in ADM's `np.partition(...)[:, k]`). Blocked: memory O(batch_size^2), never N x N."""
    n = features.shape[0]
    if n <= k:
        raise ReproError(f"precision/recall with k={k} needs more than {k} feature rows, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r0 in range(0, n, batch_size):
        rows = features[r0:r0 + batch_size]
        best = None  # running k+1 smallest distances of these rows
        for c0 in range(0, n, batch_size):
            d = _squared_distances(rows, features[c0:c0 + batch_size])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + batch_size] = best[:, k]
    return radii


def precision_recall(real_feats, fake_feats, k: int = 3, *, batch_size: int = 10000,
                     device: Optional[str | torch.device] = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them.

    precision = fraction of fake points inside at least one real k-NN ball;
    recall    = fraction of real points inside at least one fake k-NN ball.
    A point is inside a ball when its squared distance is <= the ball's squared radius.
    Distances are formed in blocks of `batch_size` x `batch_size` (ADM: 10,000), so 50k x 50k never
    exists at once. float32 on `device` (ADM: fp16 with fp32 fallback, which can flip near-ties).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=dev)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=dev)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ReproError(f"precision_recall needs (N, D) arrays of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    radii_real = knn_radii(real, k, batch_size)
    radii_fake = knn_radii(fake, k, batch_size)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=dev)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=dev)
    # One pass over real x fake blocks updates both statuses (ADM's `evaluate_pr`).
    for r0 in range(0, real.shape[0], batch_size):
        r_rad = radii_real[r0:r0 + batch_size, None]
        for f0 in range(0, fake.shape[0], batch_size):
            d = _squared_distances(real[r0:r0 + batch_size], fake[f0:f0 + batch_size])
            fake_in[f0:f0 + batch_size] |= (d <= r_rad).any(0)
            real_in[r0:r0 + batch_size] |= (d <= radii_fake[None, f0:f0 + batch_size]).any(1)
    return float(fake_in.double().mean()), float(real_in.double().mean())


def kernel_distance(real_feats, fake_feats, *, subset_size: int = 1000, subsets: int = 10, seed: int = 0) -> float:
    """KID: the unbiased squared MMD with the cubic polynomial kernel (x.y / d + 1)^3, averaged over
    random subsets (Binkowski et al. 2018, as torch-fidelity). Unbiased, so it suits a few hundred images
    where FID's covariance is poorly estimated; 0 in expectation for two samples of one distribution."""
    a, b = np.asarray(real_feats, dtype=np.float64), np.asarray(fake_feats, dtype=np.float64)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ReproError(f"KID needs at least 2 feature rows in each set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    d, values = a.shape[1], []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values))
