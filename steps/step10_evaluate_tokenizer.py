"""Step 10: evaluate a tokenizer on held-out images: rFID, PSNR, SSIM, LPIPS and a reconstruction grid.

As upstream's evaluate_tokenizer.py, on any image folder (one sub-folder per class, or as step 6 reads)
with a tokenizer of step 9. rFID needs the Inception weights (step 2's `fid-inception`) and LPIPS its VGG
weights (`lpips-vgg16`, `lpips-vgg-heads`): without them one line says the metric is skipped. Writes
OUT/metrics.json and OUT/reconstructions.png (originals above reconstructions).

    python -m steps.step10_evaluate_tokenizer --tokenizer runs/tokenizer/own_data/tokenizer.safetensors \\
        --folder held_out/ --out runs/tokenizer/own_data/eval
    python -m steps.step10_evaluate_tokenizer --config tokenizer/digits_f4 --folder held_out/ --limit 500
    # notebook:  from steps.step10_evaluate_tokenizer import main; res = main(tokenizer=..., folder=...)

With --config, the tokenizer is the run's `tokenizer.safetensors` (train.output_dir/train.exp_name) and the
folder defaults to data.valid_folder, then data.image_folder.
"""

from __future__ import annotations

import argparse
from typing import Optional

from repro.utils.cli import add_config_arguments, run_cli, step_parser


def main(tokenizer: Optional[str] = None, folder: Optional[str] = None, out: Optional[str] = None,
         config: Optional[str] = None, set: Optional[list[str]] = None, limit: Optional[int] = None,
         rfid_images: Optional[int] = None, posterior: str = "mean", batch_size: int = 64,
         device: Optional[str] = None) -> dict:
    """Returns psnr, ssim, lpips (or None), rfid (or None), the grid path and a summary line."""
    from repro.errors import ConfigError
    from repro.paths import runs_path
    from repro.tokenizer_training.evaluate import evaluate_tokenizer

    if config is not None:
        from repro.tokenizer_training.config import load_tokenizer_config
        from repro.tokenizer_training.trainer import TOKENIZER_FILE, run_dir_of

        cfg = load_tokenizer_config(config, list(set or []))  # a path, or a preset
        tokenizer = tokenizer or str(run_dir_of(cfg) / TOKENIZER_FILE)
        folder = folder or cfg.data.valid_folder or cfg.data.image_folder
    if not tokenizer or not folder:
        raise ConfigError("pass --tokenizer FILE and --folder DIR (or --config C of the step-9 run)")
    tokenizer_path = runs_path(str(tokenizer))
    out_dir = runs_path(str(out)) if out else tokenizer_path.parent / "eval"
    return evaluate_tokenizer(tokenizer_path, runs_path(str(folder)), out_dir=out_dir, limit=limit,
                              batch_size=batch_size, posterior=posterior, rfid_images=rfid_images, device=device)


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step10_evaluate_tokenizer", __doc__)
    p.add_argument("--tokenizer", help="tokenizer.safetensors of step 9")
    p.add_argument("--folder", help="held-out image folder")
    p.add_argument("--out", help="output folder (default: next to the tokenizer, eval/)")
    add_config_arguments(p, "the step-9 config instead of --tokenizer (and its data folders)", required=False)
    p.add_argument("--limit", type=int, help="the first N images only")
    p.add_argument("--rfid-images", type=int, help="rFID on the first N images only (Inception is slow on a CPU)")
    p.add_argument("--posterior", choices=["mean", "sample"], default="mean", help="decode the mean, or a draw")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu, cuda (default: the GPU if any)")
    return p


def cli(argv: Optional[list[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    return run_cli(lambda: main(a.tokenizer, a.folder, a.out, a.config, a.set, a.limit, a.rfid_images, a.posterior,
                                a.batch_size, a.device))


if __name__ == "__main__":
    cli()
