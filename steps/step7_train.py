"""Step 7: train LightningDiT on the latents of step 6, in two stages, resumable after any kill.

    python -m steps.step7_train --config configs/train/lightningdit_xl_800ep_stage_0.yaml \\
        --set data.data_path=/data/latents train.output_dir=/data/runs
    python -m steps.step7_train --config configs/train/lightningdit_xl_800ep_stage_1.yaml \\
        --set data.data_path=/data/latents train.output_dir=/data/runs      # continues the same run
    torchrun --nproc_per_node=8 -m steps.step7_train --config configs/train/lightningdit_xl_800ep_stage_0.yaml
    python -m steps.step7_train --config configs/train/tiny_stage_0.yaml --time-budget 41000   # Kaggle: < 12 h

In a notebook: `from steps.step7_train import main; main(config="configs/train/tiny_stage_0.yaml",
set=["data.data_path=latents"], time_budget=3600)`.

Running the same command again resumes from the newest complete checkpoint in
`train.output_dir/train.exp_name/checkpoints/`. Exit code 1 with a one-line error on bad input or a
non-finite loss (the last good checkpoint is kept). SIGTERM (Kaggle's stop, SLURM's preemption) or
SIGINT finishes the optimizer step, writes a checkpoint and exits with 143 / 130: run the same
command to resume. `runs:REL` paths (data.data_path, train.output_dir) are folders under the runs folder.
"""

from __future__ import annotations

import argparse
from typing import Optional

from repro.config import load_config
from repro.training import train
from repro.utils.cli import add_config_arguments, naming_config, run_step, step_parser


def main(config: Optional[str] = None, set: Optional[list[str]] = None, time_budget: Optional[float] = None) -> dict:
    """Train with `config` (+ `set` overrides); returns {'step', 'checkpoint', 'loss', 'run_dir', 'stopped', ...}."""
    with naming_config(config):  # advice in errors names this config, not `--config C`
        cfg = load_config(config, overrides=list(set or []))
        return train(cfg, time_budget=time_budget)


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser("python -m steps.step7_train", __doc__)
    add_config_arguments(parser, "training YAML (official schema), e.g. configs/train/...",
                         set_help="config overrides, e.g. train.max_steps=1000 data.data_path=latents")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="save a checkpoint and exit cleanly before this many seconds (train.time_budget)")
    return parser


def cli(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    return run_step(lambda: main(config=args.config, set=args.set, time_budget=args.time_budget))


if __name__ == "__main__":
    cli()
