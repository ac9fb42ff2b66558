"""The reference side of step 8: ADM's reference batch, or the user's own images, with cached features.

`--ref` may be
- ADM's reference batch (`VIRTUAL_imagenet256_labeled.npz`: `mu`/`sigma`, `mu_s`/`sigma_s` and the
  `arr_0` images): its statistics are used as they are (the paper's protocol); precision/recall need
  the pool_3 features of its images, computed once and cached in `NAME.pool3-<ref>-<extractor>.npz`;
- an npz of images only (`arr_0`), or a folder of images of any common format (JPEG included): the
  statistics ADM's batch holds are computed from them once (pool_3 mean/covariance for FID, the
  spatial features' for sFID, pool_3 features for precision/recall) and cached in
  `NAME.inception-<content>-<extractor>-<H>x<W>.npz`. Images whose size differs from the samples'
  go through ADM's centre crop first (see image_batches.py).

A cache sits next to the reference, or in `cache_dir`, or in `runs/eval_cache` when the reference's
folder is read-only (Kaggle's /kaggle/input). It is keyed by the reference's content (the sha256 of
an npz, hashed once through `repro.utils.hashing`; for a folder, the digest of its listing: relative
names, sizes and mtimes, so adding, removing or rewriting an image is seen without reading 50,000
files) and by the sha256 of the Inception weights; each key is also stored inside and checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from repro.data.npz import IMAGE_KEY, npz_keys, read_npy_member
from repro.errors import ReproError
from repro.evaluation import metrics as M
from repro.evaluation.features import FEATURE_DIMS, InceptionExtractor, extract_features
from repro.evaluation.image_batches import ImageBatches
from repro.paths import runs_dir
from repro.utils import distributed as du
from repro.utils.hashing import cached_sha256, listing_digest
from repro.utils.io import atomic_path

# (reference key for mean, for covariance, sample feature) per Fréchet metric
FRECHET = {"fid": ("mu", "sigma", "pool"), "sfid": ("mu_s", "sigma_s", "spatial")}
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class Reference:
    """What the metrics compare against. `stats()` and `pool` are for rank 0 (None elsewhere)."""
    path: Path
    kind: str  # "adm" (precomputed statistics) | "images" (statistics computed from images)
    key: str  # sha256 of the npz, or the folder's listing digest
    cache: Optional[Path] = None
    extracted: int = 0  # reference images run through Inception by this call (0: from the cache)
    preprocessing: Optional[str] = None
    pool: Optional[np.ndarray] = None
    _stats: dict = field(default_factory=dict)

    def stats(self, mean_key: str, cov_key: str) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "adm":
            with np.load(self.path) as z:
                return z[mean_key], z[cov_key]
        return self._stats[mean_key], self._stats[cov_key]


def is_adm_batch(ref: Path) -> bool:
    """An npz holding any of ADM's precomputed statistics (else: an npz of images, or a folder)."""
    return ref.is_file() and ref.suffix.lower() == ".npz" and bool(set(STAT_KEYS) & set(npz_keys(ref)))


def check_reference(ref: Path, metrics: tuple[str, ...], samples: ImageBatches) -> None:
    """ADM's batch: every key the requested metrics need is there, with the right shape; sizes agree."""
    if not ref.exists():
        raise ReproError(f"reference not found: {ref}; run `python -m steps.step2_download --only adm-ref-imagenet256`,"
                         " or pass --ref with an npz of images or a folder of images")
    keys = npz_keys(ref)
    for metric, (mu_key, sigma_key, feat) in FRECHET.items():
        if metric not in metrics:
            continue
        d = FEATURE_DIMS[feat]
        for key, shape in ((mu_key, (d,)), (sigma_key, (d, d))):
            if key not in keys:
                raise ReproError(f"{ref}: no '{key}' (needed for {metric}; it has {', '.join(keys)}); use the ADM "
                                 f"reference batch, e.g. VIRTUAL_imagenet256_labeled.npz, which holds mu, sigma, mu_s, "
                                 "sigma_s, or an npz holding only images (arr_0)")
            got = read_npy_member(ref, key).shape
            if got != shape:
                raise ReproError(f"{ref}: '{key}' has shape {got}, expected {shape} ({feat} features)")
    if IMAGE_KEY in keys:
        ref_images = ImageBatches.open(ref, "reference batch")
        if (ref_images.height, ref_images.width) != (samples.height, samples.width):
            raise ReproError(f"{samples.path}: samples are {samples.height}x{samples.width} but the reference images "
                             f"in {ref} are {ref_images.height}x{ref_images.width}; use the reference of that resolution")
    elif "prec" in metrics or "recall" in metrics:
        raise ReproError(f"{ref}: no '{IMAGE_KEY}' images, needed for precision/recall; use the ADM reference batch")


def cache_folder(ref: Path, cache_dir: Optional[Path]) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else ref.parent
    if cache_dir is None and not os.access(folder, os.W_OK):  # e.g. Kaggle's read-only /kaggle/input
        folder = runs_dir() / "eval_cache"
        print(f"reference folder {ref.parent} is read-only; caching its features in {folder}", flush=True)
    return folder


def _read_cache(path: Path, expected: dict, arrays: dict) -> Optional[dict]:
    """The arrays of cache `path` if its recorded keys equal `expected` and shapes equal `arrays`."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if all(str(z[k]) == str(v) for k, v in expected.items()):
                out = {k: z[k] for k in arrays}
                if all(out[k].shape == shape for k, shape in arrays.items()):
                    print(f"reference features: cached {path}", flush=True)
                    return out
        print(f"reference feature cache {path} does not match this reference/extractor; recomputing", flush=True)
    except (OSError, KeyError, ValueError) as e:
        print(f"reference feature cache {path} is unreadable ({e}); recomputing", flush=True)
    return None


def _write_cache(path: Path, arrays: dict, keys: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays, **{k: np.array(v) for k, v in keys.items()})
    print(f"reference features cached in {path}", flush=True)


def open_reference(ref: Path, metrics: tuple[str, ...], samples: ImageBatches, extractor: InceptionExtractor,
                   batch_size: int, cache_dir: Optional[Path] = None) -> Reference:
    """The reference for `metrics`, with what they need computed (or read from the cache)."""
    if not ref.exists():
        check_reference(ref, metrics, samples)  # the not-found message
    if is_adm_batch(ref):
        check_reference(ref, metrics, samples)
        key = du.run_on_main(cached_sha256, ref)
        reference = Reference(ref, "adm", key)
        if "prec" in metrics or "recall" in metrics:
            reference.pool, reference.cache, reference.extracted = _adm_pool_features(
                ref, key, extractor, batch_size, cache_dir)
        return reference
    return _image_reference(ref, samples, extractor, batch_size, cache_dir)


def _adm_pool_features(ref: Path, ref_sha: str, extractor: InceptionExtractor, batch_size: int,
                       cache_dir: Optional[Path]) -> tuple[Optional[np.ndarray], Path, int]:
    """pool_3 features of ADM's reference images (rank 0; None elsewhere), from the cache when valid."""
    source = ImageBatches.open(ref, "reference batch")
    cache = du.run_on_main(lambda: cache_folder(ref, cache_dir) / f"{ref.stem}.pool3-{ref_sha[:16]}-"
                                                                  f"{extractor.weights_sha256[:16]}.npz")
    keys = {"ref_sha256": ref_sha, "weights_sha256": extractor.weights_sha256}
    cached = (_read_cache(cache, keys, {"pool": (source.num_images, FEATURE_DIMS["pool"])})
              if du.is_main() else None)
    if du.broadcast_object(cached is not None):
        return (cached["pool"].astype(np.float32, copy=False) if cached else None), cache, 0
    feats = extract_features(source, extractor, batch_size, keys=("pool",), desc="reference")
    if du.is_main():
        _write_cache(cache, {"pool": feats["pool"]}, keys)
    du.barrier()
    return (feats["pool"] if du.is_main() else None), cache, source.num_images


def _image_reference(ref: Path, samples: ImageBatches, extractor: InceptionExtractor, batch_size: int,
                     cache_dir: Optional[Path]) -> Reference:
    """Statistics and pool features of reference images (npz or folder), computed once per content."""
    source = ImageBatches.open_reference(ref, samples.height, samples.width)
    size = f"{samples.height}x{samples.width}"
    if source.kind == "images":
        key = du.run_on_main(listing_digest, ref, source.files)
    else:
        key = du.run_on_main(cached_sha256, ref)
    preprocessing = (f"ADM centre crop to {size} where the size differs" if source.resize_to is not None
                     else "none (same size as the samples)")
    cache = du.run_on_main(lambda: cache_folder(ref, cache_dir) / f"{ref.stem}.inception-{key[:16]}-"
                                                                  f"{extractor.weights_sha256[:16]}-{size}.npz")
    keys = {"ref_key": key, "weights_sha256": extractor.weights_sha256, "size": size}
    d_pool, d_spatial = FEATURE_DIMS["pool"], FEATURE_DIMS["spatial"]
    shapes = {"mu": (d_pool,), "sigma": (d_pool, d_pool), "mu_s": (d_spatial,), "sigma_s": (d_spatial, d_spatial),
              "pool": (source.num_images, d_pool)}
    reference = Reference(ref, "images", key, cache=cache, preprocessing=preprocessing)
    cached = _read_cache(cache, keys, shapes) if du.is_main() else None
    if du.broadcast_object(cached is not None):
        if cached:
            reference._stats = {k: cached[k] for k in STAT_KEYS}
            reference.pool = cached["pool"].astype(np.float32, copy=False)
        return reference
    if source.num_images < 2:
        raise ReproError(f"{ref}: {source.num_images} reference image(s); statistics need at least 2 "
                         "(the ADM reference batches hold 10,000)")
    feats = extract_features(source, extractor, batch_size, keys=("pool", "spatial"), desc="reference")
    reference.extracted = source.num_images
    if du.is_main():
        mu, sigma = M.feature_statistics(feats["pool"])
        mu_s, sigma_s = M.feature_statistics(feats["spatial"])
        reference._stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        reference.pool = feats["pool"]
        _write_cache(cache, {**reference._stats, "pool": feats["pool"]}, keys)
    du.barrier()
    return reference
