"""Step 6: extract VA-VAE latents from images into upstream-format safetensors shards (resumable).

Writes `latents_rank00_shard{k:03d}.safetensors` (`latents`, `latents_flip`, `labels`), then
`latents_stats.pt` and `extract_report.json` (counts, corrupt files) into --out (default data.data_path).
Running the same command again skips finished shards. Sources: an ImageNet-style class folder, a flat
folder with labels.txt ('filename,label'), or WebDataset .tar shards (see repro/data/images.py).
--workers N decodes and crops images in N processes (the same shards). --official skips encoding: it
fetches upstream's pre-extracted ImageNet-256 latents (step 2's group `imagenet256-latents`, ~63 GB of
tar.gz parts) and unpacks them into --out, resumably; train on that folder (data.data_path).

    python -m steps.step6_extract --config C --source /data/imagenet/train --out data/latents --workers 8
    python -m steps.step6_extract --config C --official --out data/latents   # upstream's latents, no encoding
    python -m steps.step6_extract --config C --source shards/ --store moments --shard-size 10000
    python -m steps.step6_extract --config own.yaml --source my_images --out latents --store mean   # step 9's tokenizer
    torchrun --nproc_per_node=8 -m steps.step6_extract --config C --source DIR --out DIR
    # notebook:  from steps.step6_extract import main; main("configs/tiny.yaml", source="imgs", out="latents")
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

from repro.config import Config, apply_overrides, load_config
from repro.errors import ConfigError
from repro.paths import refuse_asset_markers, resolve_runs_markers, runs_path
from repro.utils.cli import add_config_arguments, naming_config, run_step, step_parser
from repro.utils import distributed as dist
from repro.utils.hardware import default_device


def main(config: str | Config | None = None, *, source=None, out: str | None = None, batch_size: int = 32,
         shard_size: int = 10000, store: str = "sample", seed: int = 0, device: str | None = None,
         labels_file: str | None = None, set: list[str] | None = None, workers: int = 0,
         official: bool = False) -> dict:
    """Extract latents (this process's share under torchrun); returns the extraction report.
    official=True: fetch and unpack upstream's latents instead (one process); returns the unpack summary."""
    from repro.data.extract import extract_latents
    from repro.tokenizer.loader import load_vae

    with naming_config(config):  # advice in errors names this config, not `--config C`
        cfg = apply_overrides(copy.deepcopy(config), set) if isinstance(config, Config) else load_config(config, set)
        resolve_runs_markers(cfg)  # runs:REL means a folder under the runs folder, in --out and --source too
        if official:
            return _official(cfg, out)
        source = source if source is not None else cfg.data.raw_data_dir
        if not source:
            raise ConfigError("no image source: pass --source DIR_or_TARS (or set data.raw_data_dir)")
        source = [runs_path(str(s)) for s in source] if isinstance(source, (list, tuple)) else runs_path(str(source))
        refuse_asset_markers(cfg, ["vae.ckpt_path", "vae.siglip_path"] + (["data.data_path"] if out is None else []))
        out = runs_path(str(out)) if out is not None else cfg.data.data_path
        labels_file = runs_path(str(labels_file)) if labels_file is not None else None
        for key, value in (("--out / data.data_path", out), ("vae.ckpt_path", cfg.vae.ckpt_path)):
            if not value:
                raise ConfigError(f"{key} is not set: pass {'--out DIR' if key[0] == '-' else '--set vae.ckpt_path=FILE'}"
                                  " or run `python -m steps.step3_configs --config C` and pass the config it writes")
        dist.init(device)
        dev = default_device() if device is None else torch.device(device)
        vae = load_vae(cfg.vae, device=dev)  # the official VA-VAE, or a tokenizer of step 9 (vae.model_name: custom)
        return extract_latents(vae, source, Path(out), image_size=cfg.data.image_size, batch_size=batch_size,
                               shard_size=shard_size, seed=seed, store=store, device=dev,
                               stats_subset=cfg.data.stats_subset, labels_file=labels_file, workers=workers)


def _official(cfg: Config, out) -> dict:
    """Upstream's pre-extracted latents: step 2 fetches the parts, repro.data.official_latents unpacks them."""
    from repro.data.official_latents import OFFICIAL_GROUP, unpack_parts
    from repro.hub import fetch_assets

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--official unpacks in one process: run it with python -m steps.step6_extract, not torchrun")
    refuse_asset_markers(cfg, ["data.data_path"] if out is None else [])
    out = runs_path(str(out)) if out is not None else cfg.data.data_path
    if not out:
        raise ConfigError("--out / data.data_path is not set: pass --out DIR (the folder to unpack the latents into)")
    return unpack_parts([r.path for r in fetch_assets([OFFICIAL_GROUP])], out)


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step6_extract", __doc__)
    add_config_arguments(p, "YAML config (vae.ckpt_path, vae.ch, data.image_size)")
    p.add_argument("--source", nargs="+", default=None, help="image folder, or .tar shards (default data.raw_data_dir)")
    p.add_argument("--out", default=None, help="output folder for shards (default data.data_path)")
    p.add_argument("--labels-file", default=None, help="labels file of a flat folder (default DIR/labels.txt|csv)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard (upstream: 10000)")
    p.add_argument("--store", choices=["sample", "mean", "moments"], default="sample",
                   help="sample: a posterior draw (upstream); mean: the posterior mean (deterministic); moments")
    p.add_argument("--seed", type=int, default=0, help="posterior-noise and statistics-subset seed")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes (0 = this process)")
    p.add_argument("--official", action="store_true", help="fetch and unpack upstream's pre-extracted latents")
    return p


def cli(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    source = args.source[0] if args.source and len(args.source) == 1 else args.source
    return run_step(lambda: main(args.config, source=source, out=args.out, batch_size=args.batch_size,
                                 shard_size=args.shard_size, store=args.store, seed=args.seed,
                                 device=args.device, labels_file=args.labels_file, set=args.set,
                                 workers=args.workers, official=args.official))


if __name__ == "__main__":
    cli()
