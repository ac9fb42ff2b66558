"""Step 8 logic: the ADM evaluator's FID, sFID, IS, precision and recall, in PyTorch, on any device.

    from repro.evaluation.evaluate import evaluate
    result = evaluate("runs/fid/samples.npz", "VIRTUAL_imagenet256_labeled.npz",
                      weights_path="weights-inception-2015-12-05-6726825d.pth")
    result["fid"], result["metrics_json"]

Protocol (openai/guided-diffusion evaluations/evaluator.py):
- FID / sFID: statistics of the samples' pool_3 / mixed_6/conv[:7] features against the reference
  npz's precomputed `mu`/`sigma` and `mu_s`/`sigma_s` (not against its 10,000 images).
- IS: chunks of 5,000 samples (10 splits at 50,000), mean over chunks.
- Precision/recall: k = 3, reference = pool_3 features of the reference npz's `arr_0` images;
  those are cached next to the reference file, keyed by its sha256 and the extractor's sha256.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from repro.errors import ReproError
from repro.evaluation import metrics as M
from repro.evaluation.features import FEATURE_DIMS, InceptionExtractor, extract_features, sha256_file
from repro.data.npz import IMAGE_KEY, npz_keys, read_npy_member
from repro.evaluation.image_batches import ImageBatches
from repro.paths import runs_dir
from repro.utils import distributed as du
from repro.utils.io import atomic_path, atomic_write_json

METRICS = ("fid", "sfid", "is", "prec", "recall")
IS_SPLIT_SIZE = 5000  # ADM compute_inception_score(split_size=5000)
PR_K = 3  # ADM ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH = 10000  # ADM row/col batch size for the blocked distances
DEFAULT_BATCH_SIZE = 100
PROTOCOL_NUM_SAMPLES = 50000
# (reference key for mean, for covariance, sample feature) per Fréchet metric
FRECHET = {"fid": ("mu", "sigma", "pool"), "sfid": ("mu_s", "sigma_s", "spatial")}
LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "prec": "Prec", "recall": "Rec"}
FORMATS = {"fid": ".3f", "sfid": ".3f", "is": ".1f", "prec": ".3f", "recall": ".3f"}

# VA-VAE + LightningDiT-XL/1 on ImageNet 256x256 with CFG (Yao et al., CVPR 2025, arXiv 2501.01423,
# system-level table; FID 1.35 / 2.11 also in hustvl/LightningDiT's README), ADM evaluator, 50k samples.
PAPER_RESULTS = {
    "LightningDiT-XL/1 800ep (cfg)": {"fid": 1.35, "sfid": 4.15, "is": 295.3, "prec": 0.79, "recall": 0.65},
    "LightningDiT-XL/1 64ep (cfg)": {"fid": 2.11, "sfid": 4.16, "is": 252.3, "prec": 0.81, "recall": 0.58},
}


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [m for m in names if m]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ReproError(f"unknown metric(s) {bad or names}; choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def check_reference(ref: Path, metrics: tuple[str, ...], samples: ImageBatches) -> None:
    """Every key the requested metrics need is there, with the right shape; image sizes agree."""
    if not ref.is_file():
        raise ReproError(f"reference batch not found: {ref}; run `python -m steps.step2_download --only adm-ref-imagenet256`")
    keys = npz_keys(ref)
    for metric, (mu_key, sigma_key, feat) in FRECHET.items():
        if metric not in metrics:
            continue
        d = FEATURE_DIMS[feat]
        for key, shape in ((mu_key, (d,)), (sigma_key, (d, d))):
            if key not in keys:
                raise ReproError(f"{ref}: no '{key}' (needed for {metric}; it has {', '.join(keys)}); use the ADM "
                                 f"reference batch, e.g. VIRTUAL_imagenet256_labeled.npz, which holds mu, sigma, mu_s, sigma_s")
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


def _cache_file(ref: Path, ref_sha: str, weights_sha: str, cache_dir: Optional[Path]) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else ref.parent
    if cache_dir is None and not os.access(folder, os.W_OK):  # e.g. Kaggle's read-only /kaggle/input
        folder = runs_dir() / "eval_cache"
        print(f"reference folder {ref.parent} is read-only; caching its features in {folder}", flush=True)
    return folder / f"{ref.stem}.pool3-{ref_sha[:16]}-{weights_sha[:16]}.npz"


def _read_cache(path: Path, ref_sha: str, weights_sha: str, count: int) -> Optional[np.ndarray]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["ref_sha256"]) == ref_sha and str(z["weights_sha256"]) == weights_sha:
                pool = z["pool"]
                if pool.shape == (count, FEATURE_DIMS["pool"]):
                    print(f"reference features: cached {path}", flush=True)
                    return pool.astype(np.float32, copy=False)
        print(f"reference feature cache {path} does not match this reference/extractor; recomputing", flush=True)
    except (OSError, KeyError, ValueError) as e:
        print(f"reference feature cache {path} is unreadable ({e}); recomputing", flush=True)
    return None


def reference_pool_features(ref: Path, ref_sha: str, extractor: InceptionExtractor, batch_size: int,
                            cache_dir: Optional[Path] = None) -> Optional[np.ndarray]:
    """pool_3 features of the reference images (rank 0; None elsewhere), from the cache when valid."""
    source = ImageBatches.open(ref, "reference batch")
    cache = du.run_on_main(_cache_file, ref, ref_sha, extractor.weights_sha256, cache_dir)
    cached = _read_cache(cache, ref_sha, extractor.weights_sha256, source.num_images) if du.is_main() else None
    if du.broadcast_object(cached is not None):
        return cached
    feats = extract_features(source, extractor, batch_size, keys=("pool",), desc="reference")
    if du.is_main():
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, pool=feats["pool"], ref_sha256=np.array(ref_sha), weights_sha256=np.array(extractor.weights_sha256))
        print(f"reference features cached in {cache}", flush=True)
    du.barrier()
    return feats["pool"] if du.is_main() else None


def find_run_config(samples: ImageBatches) -> Optional[Path]:
    """The run's resolved `config.yaml`: in the sample folder, or next to the npz / folder."""
    base = samples.path if samples.kind == "folder" else samples.path.parent
    for folder in (base, base.parent) if samples.kind == "folder" else (base,):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def default_metrics_path(samples: ImageBatches, config_path: Optional[Path]) -> Path:
    """`metrics.json` in the run folder (where config.yaml is), else in the PNG folder / next to the npz."""
    if config_path is not None:
        return config_path.parent / "metrics.json"
    return (samples.path if samples.kind == "folder" else samples.path.parent) / "metrics.json"


def sampler_settings(config_path: Optional[Path]) -> Optional[dict]:
    if config_path is None:
        return None
    from repro.config import load_config

    cfg = load_config(config_path)
    return {"config": str(config_path), "ckpt_path": cfg.ckpt_path, "model_type": cfg.model.model_type,
            "sample": dataclasses.asdict(cfg.sample)}


def summary_line(result: dict) -> str:
    parts = [f"{LABELS[m]} {result[m]:{FORMATS[m]}}" for m in METRICS if m in result]
    return (" | ".join(parts) + f" | {result['num_samples']} samples vs {Path(result['reference']).name}"
            + (f" -> {result['metrics_json']}" if result.get("metrics_json") else ""))


def compare_to_paper(result: dict) -> str:
    """A plain-text table: this run's numbers next to the paper's rows (same column order)."""
    head = f"{'':34s}" + "".join(f"{LABELS[m]:>9s}" for m in METRICS)
    rows = [head]
    for name, nums in [(f"this run ({result['num_samples']} samples)", result), *PAPER_RESULTS.items()]:
        cells = "".join(f"{nums[m]:>9{FORMATS[m]}}" if m in nums else f"{'-':>9s}" for m in METRICS)
        rows.append(f"{name:34s}{cells}")
    return "\n".join(rows)


def evaluate(samples: str | os.PathLike, ref: str | os.PathLike, metrics: str | Iterable[str] = METRICS, *,
             weights_path: str | os.PathLike, weights_sha256: Optional[str] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, device=None, out: Optional[str | os.PathLike] = None,
             cache_dir: Optional[str | os.PathLike] = None) -> dict:
    """Compute `metrics` for `samples` (npz or PNG folder) against the ADM reference batch `ref`.

    Runs on one process or under torchrun (each rank extracts a contiguous slice; rank 0 computes the
    numbers and writes `metrics.json`); every rank returns the same dict.
    """
    # Check the inputs before any feature is computed: metrics, samples, the reference batch.
    t0 = time.time()
    metrics = parse_metrics(metrics)
    if batch_size < 1:
        raise ReproError(f"batch_size must be >= 1, got {batch_size}")
    source = ImageBatches.open(samples, "samples")
    ref = Path(ref)
    check_reference(ref, metrics, source)
    n = source.num_images
    if ("fid" in metrics or "sfid" in metrics) and n < 2:
        raise ReproError(f"{source.path}: FID needs at least 2 samples, got {n}")
    if ("prec" in metrics or "recall" in metrics) and n <= PR_K:
        raise ReproError(f"{source.path}: precision/recall (k={PR_K}) need more than {PR_K} samples, got {n}")
    if n != PROTOCOL_NUM_SAMPLES:
        du.print0(f"note: {n} samples; the paper's numbers use {PROTOCOL_NUM_SAMPLES} (FID is biased upward for fewer)")
    # The sampler settings of the run (for the record), the extractor, the reference's identity.
    config_path = find_run_config(source)
    sampler = du.run_on_main(sampler_settings, config_path)
    extractor = InceptionExtractor(weights_path, weights_sha256, device=device)
    ref_sha = du.run_on_main(sha256_file, ref)

    # Features: of the samples (every rank its slice), of the reference images when P/R need them.
    keys = [k for k, needed in (("pool", {"fid", "prec", "recall"}), ("spatial", {"sfid"}), ("logits", {"is"}))
            if needed & set(metrics)]
    feats = extract_features(source, extractor, batch_size, keys=tuple(keys), desc="samples")
    ref_pool = (reference_pool_features(ref, ref_sha, extractor, batch_size, cache_dir)
                if "prec" in metrics or "recall" in metrics else None)
    out_path = Path(out) if out is not None else default_metrics_path(source, config_path)

    # The numbers and the record, on rank 0.
    def compute() -> dict:
        result: dict = {}
        # Frechet distances against the reference's precomputed statistics, IS, precision/recall.
        with np.load(ref) as z:
            for metric, (mu_key, sigma_key, feat) in FRECHET.items():
                if metric in metrics:
                    mu, sigma = M.feature_statistics(feats[feat])
                    result[metric] = M.frechet_distance(mu, sigma, z[mu_key], z[sigma_key])
        if "is" in metrics:
            result["is"] = M.inception_score(feats["logits"], split_size=IS_SPLIT_SIZE, inputs="logits")
        if "prec" in metrics or "recall" in metrics:
            prec, rec = M.precision_recall(ref_pool, feats["pool"], k=PR_K, batch_size=PR_BATCH, device=extractor.device)
            # What the numbers were computed on and how (metrics.json).
            result.update({m: v for m, v in (("prec", prec), ("recall", rec)) if m in metrics})
        result.update({
            "num_samples": n, "image_size": [source.height, source.width], "samples": str(source.path),
            "samples_kind": source.kind, "reference": str(ref), "reference_sha256": ref_sha,
            "feature_extractor": {"weights": str(extractor.weights_path), "weights_sha256": extractor.weights_sha256,
                                  "implementation": f"torch-fidelity {_tf_version()} FeatureExtractorInceptionV3",
                                  "features": {"fid": "pool_3 (2048)", "sfid": "mixed_6/conv[:7] NHWC (2023)",
                                               "is": "softmax(logits_unbiased) (1008)", "prec_recall": "pool_3 (2048)"}},
            "protocol": {"evaluator": "openai/guided-diffusion evaluations/evaluator.py", "is_split_size": IS_SPLIT_SIZE,
                         "prec_recall_k": PR_K},
            "sampler": sampler, "world_size": du.get_world_size(), "device": str(extractor.device),
            "seconds": round(time.time() - t0, 2), "metrics_json": str(out_path),
        })
        atomic_write_json(out_path, result)
        print(summary_line(result), flush=True)
        return result

    return du.run_on_main(compute)


def _tf_version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def _asset_from_table(name: str, flag: str) -> tuple[Path, Optional[str]]:
    """(path, recorded sha256) of asset `name` from step 2's table, or an error naming the flag to pass."""
    from repro.paths import read_asset_table, recorded_asset_path

    entries, src = read_asset_table()
    fix = f"run `python -m steps.step2_download --only {name}` (step 2) or pass {flag}"
    if not src.exists():
        raise ReproError(f"no {flag} given and {src} does not exist yet: {fix}")
    path = recorded_asset_path(entries, name, src.parent)
    if path is None:
        raise ReproError(f"no {flag} given and {src} does not list asset '{name}': {fix}")
    if not path.exists():
        raise ReproError(f"no {flag} given and {src} points asset '{name}' to {path}, which is gone: {fix}")
    return path, entries[name].get("sha256")


def resolve_assets(ref: Optional[str | os.PathLike], weights: Optional[str | os.PathLike]
                   ) -> tuple[Path, Path, Optional[str]]:
    """Fill a missing reference/weights path from `runs/assets.json` (step 2's table
    `{"assets": {name: {"path": ..., "sha256": ...}}}`). Returns (ref, weights, expected weights sha256):
    the hash is the table's when the weights come from it, None for a path the caller gave."""
    weights_sha = None
    if ref is None:
        ref, _ = _asset_from_table("adm-ref-imagenet256", "--ref")
    if weights is None:
        weights, weights_sha = _asset_from_table("fid-inception", "--weights")
    return Path(ref), Path(weights), weights_sha
