"""Step 8: FID, sFID, IS, precision and recall with the ADM evaluator's protocol, in PyTorch.

Samples: an npz in the ADM format (`arr_0`: uint8 N x H x W x 3), a folder of PNGs, or step 4's --out
folder as it is (its `samples.npz`, else `images/`). Reference: the ADM batch
`VIRTUAL_imagenet256_labeled.npz` (the paper's numbers), or your own images: an npz of images or a
folder of images in any common format (statistics computed once, cached next to it or in --cache-dir;
images of another size get ADM's centre crop). Features: torch-fidelity's TF-faithful Inception-v3
from the local weights file (never the network). `--ref` / `--weights` default to the files step 2
recorded in `runs/assets.json`. Paths may be `runs:REL` (under the runs folder).
Writes `metrics.json` (next to the samples unless `--out`) and prints a one-line summary.

    python -m steps.step8_evaluate --samples runs/fid/samples.npz
    python -m steps.step8_evaluate --samples runs:samples/my_run --ref /data/my_images --metrics fid,prec,recall
    python -m steps.step8_evaluate --samples runs/fid/images --ref VIRTUAL_imagenet256_labeled.npz \\
        --weights weights-inception-2015-12-05-6726825d.pth --metrics fid,sfid --batch-size 200
    torchrun --nproc_per_node=4 -m steps.step8_evaluate --samples runs/fid/samples.npz
    # notebook:  from steps.step8_evaluate import main; result = main(samples="runs/fid/samples.npz")
"""

from __future__ import annotations

import argparse

from repro.evaluation.evaluate import DEFAULT_BATCH_SIZE, METRICS, configured_reference, evaluate, resolve_assets
from repro.paths import runs_path
from repro.utils import distributed
from repro.utils.cli import run_step, step_parser


def main(samples: str, ref: str | None = None, metrics: str | list[str] = ",".join(METRICS),
         weights: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, out: str | None = None,
         device: str | None = None, cache_dir: str | None = None) -> dict:
    """Evaluate `samples`; returns the metrics dict (also written to metrics.json) on every rank."""
    samples, ref, weights, out, cache_dir = (None if v is None else runs_path(str(v))  # runs:REL as in every step
                                             for v in (samples, ref, weights, out, cache_dir))
    ref = ref if ref is not None else configured_reference(samples)  # the run config's data.fid_reference_file
    ref_path, weights_path, weights_sha = resolve_assets(ref, weights)
    distributed.init(device)
    return evaluate(samples, ref_path, metrics, weights_path=weights_path, weights_sha256=weights_sha,
                    batch_size=batch_size, device=device, out=out, cache_dir=cache_dir)


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step8_evaluate", __doc__)
    p.add_argument("--samples", required=True, help="npz (arr_0 uint8 NxHxWx3), folder of PNGs, or step 4's --out")
    p.add_argument("--ref", default=None, help="ADM reference batch npz (default: step 2's adm-ref-imagenet256), "
                   "or an npz / folder of your own images")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--weights", default=None, help="torch-fidelity Inception weights (default: step 2's fid-inception)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass per process")
    p.add_argument("--out", default=None, help="metrics.json path (default: next to the samples)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this process's GPU, else cpu)")
    p.add_argument("--cache-dir", default=None, help="where reference features are cached (default: next to --ref)")
    return p


def cli(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return run_step(lambda: main(samples=args.samples, ref=args.ref, metrics=args.metrics, weights=args.weights,
                                 batch_size=args.batch_size, out=args.out, device=args.device,
                                 cache_dir=args.cache_dir))


if __name__ == "__main__":
    cli()
