"""Reconstruction metrics for the tokenizer: PSNR and SSIM, per image.

Inputs: two batches of the same shape, either uint8 (N,H,W,C) pixels (what `to_uint8` and PNG files
give; data range 255) or floating-point (N,C,H,W) tensors in [-1,1] (the model's range; mapped to
[0,1] with (x + 1) / 2, data range 1). numpy arrays or torch tensors; computed in float64 on the CPU.

SSIM is Wang et al. 2004 with the standard settings: an 11x11 Gaussian window, sigma 1.5, K1 0.01,
K2 0.03, population (not sample) covariances, per channel, then the mean over the region where the window
fits entirely inside the image (a 5-pixel border is left out) and over channels. This is what
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=...)` and torchmetrics' `StructuralSimilarityIndexMeasure` compute; the tests compare with
scikit-image. (scikit-image's own defaults, a 7x7 uniform window with sample covariances, differ.)

    metrics = evaluate_reconstructions(originals_u8, reconstructions_u8, lpips=build_lpips(...))
    # {'psnr': dB, 'ssim': ..., 'lpips': ... or None, 'n': N, 'exact': images reconstructed exactly}
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_nchw_float64(images, name: str) -> tuple[torch.Tensor, float]:
    """(N,C,H,W) float64 tensor in [0, data_range] and that data range."""
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if t.ndim != 4:
        raise ValueError(f"{name}: expected a batch of images (4 dimensions), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.permute(0, 3, 1, 2).to(torch.float64), 255.0  # NHWC pixels
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected uint8 (N,H,W,C) pixels or float (N,C,H,W) in [-1,1], got {t.dtype}")
    return (t.to(torch.float64) + 1.0) / 2.0, 1.0


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor, float]:
    x, range_x = _as_nchw_float64(a, "first batch")
    y, range_y = _as_nchw_float64(b, "second batch")
    if x.shape != y.shape or range_x != range_y:
        raise ValueError(f"PSNR/SSIM compare batches of one shape and kind; got {tuple(x.shape)} "
                         f"({'uint8' if range_x == 255 else 'float'}) and {tuple(y.shape)} "
                         f"({'uint8' if range_y == 255 else 'float'})")
    return x, y, range_x


def psnr(images, reconstructions) -> np.ndarray:
    """Per-image PSNR in dB (N,): 10 log10(range^2 / MSE); identical images give +inf."""
    x, y, data_range = _pair(images, reconstructions)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(data_range ** 2 / mse.numpy())).astype(np.float64)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()  # (size,), separable: the 2-D window is its outer product


def ssim(images, reconstructions) -> np.ndarray:
    """Per-image SSIM (N,), mean over channels and valid window positions (see the module docstring)."""
    x, y, data_range = _pair(images, reconstructions)
    n, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got {h}x{w}")
    g = _gaussian_window()
    row = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)  # depthwise (C,1,1,11)
    col = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)  # (C,1,11,1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # 'valid' filtering: only positions where the whole window fits (= skimage's cropped border)
        return F.conv2d(F.conv2d(t, row, groups=c), col, groups=c)  # (N, C, H-10, W-10)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()


def uint8_to_model_range(pixels) -> torch.Tensor:
    """uint8 (N,H,W,C) pixels -> float32 (N,C,H,W) in [-1,1] (x / 127.5 - 1, as ToTensor + Normalize(0.5))."""
    t = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels.cpu()
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 (N,H,W,C) pixels, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(torch.float32).div(255).sub(0.5).div(0.5)


def evaluate_reconstructions(images, reconstructions, lpips: Optional[torch.nn.Module] = None,
                             batch_size: int = 256) -> dict:
    """PSNR, SSIM and (when an LPIPS module is given) LPIPS of a tokenizer's reconstructions.

    images, reconstructions: uint8 (N,H,W,C) pixels, e.g. the originals and `to_uint8(vae.decode(...))`,
    so the numbers are those of the saved images. Processed in batches of `batch_size` (bounded memory).
    `lpips` None gives `'lpips': None` (the caller says why, e.g. build_lpips's note on absent weights).
    """
    n = len(images)
    if len(reconstructions) != n or n == 0:
        raise ValueError(f"need two non-empty batches of the same length; got {n} and {len(reconstructions)}")
    psnrs, ssims, dists = [], [], []
    for start in range(0, n, batch_size):
        a, b = images[start:start + batch_size], reconstructions[start:start + batch_size]
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
        if lpips is not None:
            device = next(lpips.parameters()).device
            with torch.no_grad():
                d = lpips(uint8_to_model_range(a).to(device), uint8_to_model_range(b).to(device))
            dists.append(d.float().cpu().numpy())
    per_psnr = np.concatenate(psnrs)
    finite = np.isfinite(per_psnr)
    return {"psnr": float(per_psnr[finite].mean()) if finite.any() else math.inf,
            "ssim": float(np.concatenate(ssims).mean()),
            "lpips": float(np.concatenate(dists).mean()) if dists else None,
            "n": n, "exact": int((~finite).sum())}
