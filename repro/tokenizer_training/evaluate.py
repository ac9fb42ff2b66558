"""Tokenizer evaluation (step 10): rFID, PSNR, SSIM and LPIPS of reconstructions of a held-out folder.

Upstream (hustvl/LightningDiT `evaluate_tokenizer.py`) encodes ImageNet's validation images (resize +
centre crop), decodes them, and reports rFID (Inception features of originals vs reconstructions), PSNR,
SSIM and LPIPS. The kit does the same on any image folder with a tokenizer of step 9 (or the official
VA-VAE), in one process:

- images: step 6's listing and conversions, short side resized to the tokenizer's image size, centre crop;
  unreadable files are reported and left out; the classes are taken in turn, so `limit`, the rFID subset
  and the grid sample every class;
- reconstruction: `decode(posterior mean)` by default (deterministic; `posterior="sample"` draws z with a
  seeded per-image noise, as upstream's `posterior.sample()`), to uint8 with upstream's `to_uint8`;
- PSNR / SSIM (`repro.evaluation.reconstruction`, SSIM with the standard 11x11 Gaussian window), LPIPS
  when its weights are present (else one line says it is skipped), rFID = Frechet distance of Inception
  pool features (torch-fidelity's network, `repro.evaluation.features`) when its weights file is present
  (step 2's `fid-inception`; else one line says rFID is skipped), on at most `rfid_images` images;
- writes `OUT/metrics.json` and `OUT/reconstructions.png` (originals above their reconstructions).

    result = evaluate_tokenizer("runs/tokenizer/digits/tokenizer.safetensors", "held_out/", out_dir="runs/tok_eval")
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from repro import paths
from repro.errors import ReproError
from repro.evaluation.reconstruction import evaluate_reconstructions
from repro.tokenizer.loader import load_tokenizer, read_tokenizer_header
from repro.tokenizer.images import to_uint8
from repro.tokenizer_training.data import TokenizerImages
from repro.utils.io import atomic_write_json, wrote_line
from repro.utils.seeding import seed_from


def reconstruct(vae, images: torch.Tensor, batch_size: int = 64, posterior: str = "mean", seed: int = 0, *,
                device: torch.device) -> np.ndarray:
    """(N, 3, S, S) in [-1, 1] -> (N, S, S, 3) uint8 reconstructions, `batch_size` at a time."""
    if posterior not in ("mean", "sample"):
        raise ReproError(f"posterior={posterior!r}: choose 'mean' (deterministic) or 'sample' (as upstream)")
    out = []
    with torch.inference_mode():
        for lo in range(0, images.shape[0], batch_size):
            post = vae.encode(images[lo:lo + batch_size].to(device))
            z = post.mean
            if posterior == "sample":
                eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(
                    seed_from("repro-tokenizer-eval", seed, lo + j))) for j in range(z.shape[0])]).to(device)
                z = post.mean + post.std * eps
            out.append(to_uint8(vae.decode(z)).numpy())
    return np.concatenate(out)


def reconstruction_grid(originals: np.ndarray, reconstructions: np.ndarray, path: str | os.PathLike,
                        columns: int = 8, rows: int = 2) -> Path:
    """A PNG with `rows` pairs of rows: originals, then their reconstructions underneath (the sampling
    grid writer's tiling; cells without an image stay black)."""
    from repro.sampling.grid import save_grid

    h, w = originals.shape[1:3]
    cells = np.zeros((rows, 2, columns, h, w, 3), dtype=np.uint8)  # (pair, original/reconstruction, column)
    for k in range(min(len(originals), columns * rows)):
        r, c = divmod(k, columns)
        cells[r, 0, c], cells[r, 1, c] = originals[k], reconstructions[k]
    return save_grid(cells.reshape(-1, h, w, 3), path, rows=2 * rows, cols=columns)


def rfid(originals: np.ndarray, reconstructions: np.ndarray, weights: Path, device=None, batch_size: int = 50) -> float:
    """Frechet distance between Inception pool features of two uint8 (N, H, W, 3) sets."""
    from repro.evaluation.features import InceptionExtractor
    from repro.evaluation.metrics import feature_statistics, frechet_distance

    extractor = InceptionExtractor(weights, device=device)
    feats = [np.concatenate([extractor(x[lo:lo + batch_size])["pool"] for lo in range(0, len(x), batch_size)])
             for x in (originals, reconstructions)]
    return float(frechet_distance(*feature_statistics(feats[0]), *feature_statistics(feats[1])))


def evaluate_tokenizer(tokenizer: str | os.PathLike, folder: str | os.PathLike, *, out_dir: str | os.PathLike,
                       limit: Optional[int] = None, batch_size: int = 64, posterior: str = "mean",
                       rfid_images: Optional[int] = None, inception_weights: Optional[str] = "asset:fid-inception",
                       lpips_trunk: Optional[str] = "asset:lpips-vgg16",
                       lpips_heads: Optional[str] = "asset:lpips-vgg-heads", device: Optional[str] = None,
                       image_size: Optional[int] = None) -> dict:
    """Reconstruction metrics of `tokenizer` (a step-9 file) on `folder`; writes metrics.json and the grid."""
    from repro.tokenizer.lpips import LPIPS_HEADS_MD5, build_lpips
    from repro.utils.hardware import default_device

    t0 = time.perf_counter()
    dev = torch.device(device) if device else default_device()
    header = read_tokenizer_header(tokenizer)
    if header is None:
        raise ReproError(f"{tokenizer} is not a tokenizer written by step 9: pass the run's tokenizer.safetensors")
    vae, header = load_tokenizer(tokenizer, device=dev)
    size = int(image_size or header.get("image_size") or header["arch"]["resolution"])
    images = TokenizerImages(folder, size, crop="center")
    x, used = images.centre_crops(limit)
    originals = to_uint8(x).numpy()
    recons = reconstruct(vae, x, batch_size=batch_size, posterior=posterior, device=dev)
    lpips_net = build_lpips(paths.resolve_file_value(lpips_trunk, "lpips_trunk"), paths.resolve_file_value(lpips_heads, "lpips_heads"),
                            device=dev, heads_md5=LPIPS_HEADS_MD5)
    metrics = evaluate_reconstructions(originals, recons, lpips=lpips_net)
    # rFID: only with the Inception weights (an asset not every machine has); one line says when it is skipped
    weights = paths.resolve_file_value(inception_weights, "inception_weights")  # None when not given
    n_fid = len(originals) if rfid_images is None else min(rfid_images, len(originals))
    if weights is None or not weights.is_file():
        metrics["rfid"], rfid_note = None, (f"rFID skipped: Inception weights {inception_weights} are not on disk "
                                            "(`python -m steps.step2_download --only fid-inception`)")
    elif n_fid < 2:
        metrics["rfid"], rfid_note = None, "rFID skipped: it needs at least 2 images"
    else:
        metrics["rfid"] = rfid(originals[:n_fid], recons[:n_fid], weights, device=dev)
        rfid_note = f"rFID {metrics['rfid']:.3f} on {n_fid} images"
    out = Path(out_dir)
    grid = reconstruction_grid(originals, recons, out / "reconstructions.png")
    lpips_text = f"LPIPS {metrics['lpips']:.4f}" if metrics["lpips"] is not None else "LPIPS skipped (weights absent)"
    result = {**metrics, "rfid_images": n_fid if metrics["rfid"] is not None else 0, "tokenizer": str(tokenizer),
              "folder": str(folder), "image_size": size, "posterior": posterior, "images_used": len(used),
              "unreadable": len(images.bad), "listing_problems": len(images.src.problems),
              "tokenizer_step": header.get("step"), "grid": str(grid), "seconds": time.perf_counter() - t0}
    result["summary"] = (f"{len(used)} images of {folder}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                         f"{lpips_text}; {rfid_note}")
    atomic_write_json(out / "metrics.json", result)
    print(result["summary"], flush=True)
    print(wrote_line([out / "metrics.json", grid]), flush=True)
    return result
