"""Step 6: extract VA-VAE latents from images into upstream-format safetensors shards (resumable).

Writes `latents_rank00_shard{k:03d}.safetensors` (`latents`, `latents_flip`, `labels`), then
`latents_stats.pt` and `extract_report.json` (counts, corrupt files) into --out (default data.data_path).
Running the same command again skips finished shards. Sources: an ImageNet-style class folder, a flat
folder with labels.txt ('filename,label'), or WebDataset .tar shards (see repro/data/images.py).

    python -m steps.step6_extract --config C --source /data/imagenet/train --out data/latents
    python -m steps.step6_extract --config C --source shards/ --store moments --shard-size 10000
    torchrun --nproc_per_node=8 -m steps.step6_extract --config C --source DIR --out DIR
    # notebook:  from steps.step6_extract import main; main("configs/tiny.yaml", source="imgs", out="latents")
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from repro.config import Config, apply_overrides, load_config
from repro.errors import ConfigError
from repro.utils import distributed as dist
from repro.utils.hardware import default_device


def main(config: str | Config | None = None, *, source=None, out: str | None = None, batch_size: int = 32,
         shard_size: int = 10000, store: str = "sample", seed: int = 0, device: str | None = None,
         labels_file: str | None = None, set: list[str] | None = None) -> dict:
    """Extract latents (this process's share under torchrun); returns the extraction report."""
    from repro.data.extract import extract_latents
    from repro.tokenizer.vavae import load_vavae

    cfg = apply_overrides(copy.deepcopy(config), set) if isinstance(config, Config) else load_config(config, set)
    source = source if source is not None else cfg.data.raw_data_dir
    out = out if out is not None else cfg.data.data_path
    if not source:
        raise ConfigError("no image source: pass --source DIR_or_TARS (or set data.raw_data_dir)")
    for key, value in (("--out / data.data_path", out), ("vae.ckpt_path", cfg.vae.ckpt_path)):
        if not value or str(value).startswith("asset"):
            raise ConfigError(f"{key} is {value!r}: run step 3 first (python -m steps.step3_configs) or set it")
    dist.init(device)
    dev = default_device() if device is None else torch.device(device)
    vae = load_vavae(cfg.vae.ckpt_path, ch=cfg.vae.ch, device=dev)
    return extract_latents(vae, source, Path(out), image_size=cfg.data.image_size, batch_size=batch_size,
                           shard_size=shard_size, seed=seed, store=store, device=dev,
                           stats_subset=cfg.data.stats_subset, labels_file=labels_file)


def cli(argv: list[str] | None = None) -> dict:
    from repro.utils.cli import run_cli

    p = argparse.ArgumentParser(prog="python -m steps.step6_extract", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config (vae.ckpt_path, vae.ch, data.image_size)")
    p.add_argument("--source", nargs="+", default=None, help="image folder, or .tar shards (default data.raw_data_dir)")
    p.add_argument("--out", default=None, help="output folder for shards (default data.data_path)")
    p.add_argument("--labels-file", default=None, help="labels file of a flat folder (default DIR/labels.txt|csv)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard (upstream: 10000)")
    p.add_argument("--store", choices=["sample", "moments"], default="sample")
    p.add_argument("--seed", type=int, default=0, help="posterior-noise and statistics-subset seed")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    source = args.source[0] if args.source and len(args.source) == 1 else args.source
    try:
        return run_cli(lambda: main(args.config, source=source, out=args.out, batch_size=args.batch_size,
                                    shard_size=args.shard_size, store=args.store, seed=args.seed,
                                    device=args.device, labels_file=args.labels_file, set=args.set))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    cli()
