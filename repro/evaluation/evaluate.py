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
The reference may also be the user's own images (an npz of images or a folder, any format): their
statistics are computed once and cached the same way (see reference.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Iterable, Optional

from repro.errors import ReproError
from repro.evaluation import metrics as M
from repro.evaluation.features import InceptionExtractor, extract_features
from repro.evaluation.image_batches import ImageBatches
from repro.evaluation.reference import FRECHET, check_reference, open_reference  # noqa: F401 (check_reference: API)
from repro.utils import distributed as du
from repro.utils.io import atomic_write_json, wrote_line

METRICS = ("fid", "sfid", "is", "prec", "recall")
IS_SPLIT_SIZE = 5000  # ADM compute_inception_score(split_size=5000)
PR_K = 3  # ADM ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH = 10000  # ADM row/col batch size for the blocked distances
DEFAULT_BATCH_SIZE = 100
PROTOCOL_NUM_SAMPLES = 50000
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
    """Compute `metrics` for `samples` (npz, PNG folder or step 4's run folder) against `ref`: the ADM
    reference batch, an npz of images or a folder of images (see reference.py).

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
    if not ref.exists():
        check_reference(ref, metrics, source)  # the not-found message, before any feature is computed
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
    # The reference (checked, and its features computed or read from the cache) before the samples'.
    reference = open_reference(ref, metrics, source, extractor, batch_size,
                               Path(cache_dir) if cache_dir is not None else None)

    # Features of the samples (every rank its slice).
    keys = [k for k, needed in (("pool", {"fid", "prec", "recall"}), ("spatial", {"sfid"}), ("logits", {"is"}))
            if needed & set(metrics)]
    feats = extract_features(source, extractor, batch_size, keys=tuple(keys), desc="samples")
    out_path = Path(out) if out is not None else default_metrics_path(source, config_path)

    # The numbers and the record, on rank 0.
    def compute() -> dict:
        result: dict = {}
        # Frechet distances against the reference's statistics, IS, precision/recall.
        for metric, (mu_key, sigma_key, feat) in FRECHET.items():
            if metric in metrics:
                mu, sigma = M.feature_statistics(feats[feat])
                result[metric] = M.frechet_distance(mu, sigma, *reference.stats(mu_key, sigma_key))
        if "is" in metrics:
            result["is"] = M.inception_score(feats["logits"], split_size=IS_SPLIT_SIZE, inputs="logits")
        if "prec" in metrics or "recall" in metrics:
            prec, rec = M.precision_recall(reference.pool, feats["pool"], k=PR_K, batch_size=PR_BATCH,
                                           device=extractor.device)
            result.update({m: v for m, v in (("prec", prec), ("recall", rec)) if m in metrics})
        # What the numbers were computed on and how (metrics.json).
        result.update({
            "num_samples": n, "image_size": [source.height, source.width], "samples": str(source.path),
            "samples_kind": source.kind, "reference": str(ref), "reference_kind": reference.kind,
            ("reference_sha256" if ref.is_file() else "reference_listing_digest"): reference.key,
            "reference_cache": str(reference.cache) if reference.cache else None,
            "reference_images_extracted": reference.extracted, "reference_preprocessing": reference.preprocessing,
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
        print(wrote_line([out_path]), flush=True)
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


def configured_reference(samples: str | os.PathLike) -> Optional[Path]:
    """The FID reference the samples' run config names (`data.fid_reference_file`, which upstream
    inference.py scores against), or None when there is no run config or the key is unset."""
    from repro.config import load_config

    # kit (issue 12): the key is honoured, not ignored; --ref still wins
    path = Path(samples)
    folders = (path, path.parent) if path.is_dir() else (path.parent,)
    config_path = next((f / "config.yaml" for f in folders if (f / "config.yaml").is_file()), None)
    value = load_config(config_path).data.fid_reference_file if config_path is not None else None
    if value is None:
        return None
    if not Path(value).exists():
        raise ReproError(f"{config_path}: data.fid_reference_file is {value}, which does not exist: pass --ref FILE, "
                         "or set the key to the ADM reference batch (step 2's adm-ref-imagenet256) or null")
    du.print0(f"reference: {value} (data.fid_reference_file of {config_path})")
    return Path(value)


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
