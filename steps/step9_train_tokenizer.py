"""Step 9: train a VA-VAE-architecture tokenizer on your images (resumable, torchrun, time budget).

Reads a kit tokenizer config or one of upstream's VA-VAE training configs unchanged
(hustvl/LightningDiT `vavae/configs/f16d32_vfdinov2.yaml`, ...). Writes
`train.output_dir/train.exp_name/`: `checkpoints/{step:07d}.pt`, `tokenizer.safetensors` (the weights a
DiT config names with `vae.model_name: custom`, architecture in its header), `config.yaml`, `log.jsonl`,
`log.txt` and `loss.png`. Running the same command again resumes from the newest checkpoint.

    python -m steps.step9_train_tokenizer --config tokenizer/digits_f4 --set data.image_folder=my_images
    python -m steps.step9_train_tokenizer --config vavae/configs/f16d32_vfdinov2.yaml \\
        --set data.image_folder=/data/scans train.max_steps=20000 model.init_from=asset:vavae-f16d32  # fine-tune
    torchrun --nproc_per_node=8 -m steps.step9_train_tokenizer --config C --time-budget 41000
    # notebook:  from steps.step9_train_tokenizer import main; res = main("tokenizer/digits_f4", set=[...])

The result's `dit_overrides` are the DiT config lines that use the tokenizer (vae.model_name=custom,
vae.ckpt_path, vae.downsample_ratio, vae.ch, model.in_chans, data.image_size). SIGTERM/SIGINT save and
exit with 143/130; exit 1 with a one-line error on bad input.
"""

from __future__ import annotations

import argparse
from typing import Optional

from repro.utils import distributed as dist
from repro.utils.cli import add_config_arguments, run_step, step_parser


def main(config: Optional[str] = None, set: Optional[list[str]] = None, time_budget: Optional[float] = None,
         device: Optional[str] = None) -> dict:
    """Train (or resume) the tokenizer of `config` (+ `set` overrides); returns step, tokenizer, dit_overrides, ..."""
    from repro.tokenizer_training.config import load_tokenizer_config
    from repro.tokenizer_training.trainer import train_tokenizer

    notes: list[str] = []
    cfg = load_tokenizer_config(config, list(set or []), notes=notes)  # a path, or a preset: tokenizer/digits_f4
    for line in notes:
        dist.print0(f"config: {line}")
    return train_tokenizer(cfg, time_budget=time_budget, device=device)


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step9_train_tokenizer", __doc__)
    add_config_arguments(p, "tokenizer YAML (kit schema, or upstream's vavae/configs/*.yaml)",
                         set_help="overrides, e.g. data.image_folder=DIR train.max_steps=300 model.ch_mult=[1,2,2]")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="save and stop before this")
    p.add_argument("--device", default=None, help="cpu, cuda (default: this process's GPU, else cpu)")
    return p


def cli(argv: Optional[list[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    return run_step(lambda: main(a.config, set=a.set, time_budget=a.time_budget, device=a.device))


if __name__ == "__main__":
    cli()
