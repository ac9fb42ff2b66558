"""Latent statistics computed from the shards (step 6 writes them, step 5 repairs with them).

Upstream (hustvl/LightningDiT `datasets/img_latent_dataset.py`) computes the file the first time the
dataset is built: 10,000 latents drawn without replacement (unseeded `np.random.choice`) from the
`latents` key, concatenated, then `mean = x.mean(dim=[0, 2, 3], keepdim=True)` and
`std = x.std(dim=[0, 2, 3], keepdim=True)`: per channel over all N*h*w values, std with Bessel's
correction (divides by N*h*w - 1). `compute_stats` computes exactly these quantities over a *seeded*
subset, accumulating in float64 chunk by chunk (memory stays bounded; the float32 result agrees with
upstream's one-shot float32 reduction to ~1e-6 relative), and returns float32 (1, C, 1, 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from repro.data.latents import EMPTY_FOLDER_HINT, LatentShardDataset, image_seed, list_shards
from repro.data.stats import STATS_NAME, write_stats
from repro.errors import ReproError


def compute_stats(data_dir: str | os.PathLike, subset: int = 10000, seed: int = 0,
                  chunk: int = 256) -> dict[str, torch.Tensor]:
    """Channel-wise mean and std (upstream's formula, see the module docstring) over a seeded subset
    of min(`subset`, N) latents drawn without replacement from the shards in `data_dir`.

    Sample shards use `latents` (not the flips), as upstream. Moment shards use one posterior sample
    per image drawn from a generator seeded by (seed, index): the distribution training sees.
    """
    # A seeded subset of the latents, without replacement (upstream: unseeded np.random.choice).
    if subset < 2:
        raise ReproError(f"data.stats_subset={subset}: at least 2 latents are needed for a standard deviation")
    ds = LatentShardDataset(data_dir, latent_norm=False)
    n = len(ds)
    if n == 0:
        raise ReproError(f"latent shards in {data_dir} hold 0 latents (every image was corrupt?); "
                         f"statistics cannot be computed: re-run step 6 on a valid image source")
    g = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(n, generator=g)[: min(subset, n)].sort().values.tolist()
    # Per-channel mean and M2 over chunks in float64, merged exactly (no whole-subset tensor in memory).
    count = 0
    mean = m2 = None
    for start in range(0, len(picked), chunk):
        xs = []
        for i in picked[start:start + chunk]:
            gen = torch.Generator().manual_seed(image_seed(seed, i)) if ds.store == "moments" else None
            xs.append(ds.raw(i, flip=False, generator=gen)[0])
        x = torch.stack(xs).to(torch.float64).transpose(0, 1).reshape(ds.channels, -1)  # (C, n*h*w)
        b = x.shape[1]
        b_mean = x.mean(dim=1)
        b_m2 = ((x - b_mean[:, None]) ** 2).sum(dim=1)
        if mean is None:
            mean, m2, count = b_mean, b_m2, b
        else:  # Chan et al. parallel merge of (count, mean, M2)
            delta = b_mean - mean
            total = count + b
            mean = mean + delta * (b / total)
            m2 = m2 + b_m2 + delta ** 2 * (count * b / total)
            count = total
    # Bessel's correction, as torch.std; float32 (1, C, 1, 1) as upstream stores them.
    std = (m2 / (count - 1)).sqrt()
    shape = (1, ds.channels, 1, 1)
    return {"mean": mean.to(torch.float32).reshape(shape), "std": std.to(torch.float32).reshape(shape)}


# ----------------------------------------------------------------------------------------------
# Repairs (step 5)


def no_stats_no_shards_message(data_dir: str | os.PathLike) -> str:
    return (f"{data_dir} has neither {STATS_NAME} nor latent shards: {EMPTY_FOLDER_HINT}. Fix it either way: "
            f"(1) fetch the official statistics: python -m steps.step5_fix_stats --config C --refetch; or "
            f"(2) extract latents into this folder with step 6 (python -m steps.step6_extract --config C "
            f"--source IMAGES --out {data_dir}), which also writes the statistics. Or fix data.data_path "
            f"if the shards live elsewhere")


def repair_advice(data_dir: str | os.PathLike) -> str:
    """What to run when the stats of `data_dir` are bad (depends on what the folder holds)."""
    shards = list_shards(data_dir)
    if shards:
        return f"repair: --recompute (from the {len(shards)} shard(s) in {data_dir}) or --refetch (the official file)"
    if not (Path(data_dir) / STATS_NAME).exists():
        return no_stats_no_shards_message(data_dir)
    return "repair: --refetch (the official file), or extract latents with step 6, then --recompute"


def recompute_stats_file(data_dir: str | os.PathLike, channels: int, subset: int = 10000, seed: int = 0) -> str:
    """Recompute `<data_dir>/latents_stats.pt` from the shards there (backup + atomic write)."""
    data_dir = Path(data_dir)
    shards = list_shards(data_dir)
    if not shards:
        raise ReproError(no_stats_no_shards_message(data_dir) if not (data_dir / STATS_NAME).exists() else
                         f"cannot recompute: {data_dir} holds no latent shards; {EMPTY_FOLDER_HINT}. "
                         f"Use --refetch, or extract latents into it with step 6")
    stats = compute_stats(data_dir, subset=subset, seed=seed)
    c = stats["mean"].shape[1]
    if c != channels:
        raise ReproError(f"the shards in {data_dir} have {c} channels but model.in_chans={channels}: "
                         f"they come from another tokenizer; re-extract with step 6 or fix model.in_chans")
    write_stats(data_dir / STATS_NAME, stats, backup=True)
    return f"recomputed from {len(shards)} shard(s) (subset of up to {subset} latents, seed {seed})"
