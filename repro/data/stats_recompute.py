"""Latent statistics computed from the shards (step 6 writes them, step 5 repairs with them).

Upstream (hustvl/LightningDiT `datasets/img_latent_dataset.py`) computes the file the first time the
dataset is built: 10,000 latents drawn without replacement (unseeded `np.random.choice`) from the
`latents` key, concatenated, then `mean = x.mean(dim=[0, 2, 3], keepdim=True)` and
`std = x.std(dim=[0, 2, 3], keepdim=True)`: per channel over all N*h*w values, std with Bessel's
correction (divides by N*h*w - 1). `compute_stats` computes exactly these quantities over a *seeded*
subset, accumulating in float64 chunk by chunk (memory stays bounded; the float32 result agrees with
upstream's one-shot float32 reduction to ~1e-6 relative), and returns float32 (1, C, 1, 1).

kit (issue 23): `compute_global_scales` computes, over the same seeded subset, one sigma over every
element of every channel (std with Bessel's correction, float64) and the factor 1/sigma that
`data.latent_scaling: global` multiplies latents by (Stable Diffusion's scaling_factor, lightdiff's
`1 / latents.std()`: no mean shift); `global_means` takes sigma over the posterior means instead of
the draws (moment shards, or step 6's `--store mean` shards). They go to `latents_scale.json`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from repro.data.latents import EMPTY_FOLDER_HINT, LatentShardDataset, image_seed, list_shards, read_shard_info
from repro.data.stats import SCALE_NAME, STATS_NAME, read_scale_file, scale_of, write_scale_file, write_stats
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
    picked = _pick(n, subset, seed)
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


def _pick(n: int, subset: int, seed: int) -> list[int]:
    """The seeded subset of min(subset, n) latent indices, without replacement, in index order."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: min(subset, n)].sort().values.tolist()


# ----------------------------------------------------------------------------------------------
# kit (issue 23): the global factors of data.latent_scaling


def _global_moments(read, picked: list[int], chunk: int) -> tuple[int, float, float]:
    """(count, mean, M2) of every element of the latents `read(i)` gives, in float64 (Chan's merge)."""
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, len(picked), chunk):
        x = torch.stack([read(i) for i in picked[start:start + chunk]]).to(torch.float64).flatten()
        b, b_mean = x.numel(), float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = count + b
        delta = b_mean - mean
        mean, m2 = mean + delta * (b / total), m2 + b_m2 + delta ** 2 * (count * b / total)
        count = total
    return count, mean, m2


def compute_global_scales(data_dir: str | os.PathLike, subset: int = 10000, seed: int = 0,
                          chunk: int = 256) -> dict:
    """latents_scale.json's record: `global` (sigma over the latents training draws: `latents`, or a
    posterior draw per image seeded as in `compute_stats`) and `global_means` (sigma over the posterior
    means; only where the shards hold them), each {std, scale = 1/std, mean, elements}; plus the subset."""
    if subset < 2:
        raise ReproError(f"data.stats_subset={subset}: at least 2 latents are needed for a standard deviation")
    ds = LatentShardDataset(data_dir, latent_norm=False)
    n = len(ds)
    if n == 0:
        raise ReproError(f"latent shards in {data_dir} hold 0 latents: the global scale cannot be computed")
    picked = _pick(n, subset, seed)

    def draw(i: int) -> torch.Tensor:  # the same draws as compute_stats
        gen = torch.Generator().manual_seed(image_seed(seed, i)) if ds.store == "moments" else None
        return ds.raw(i, flip=False, generator=gen)[0]

    # Which posterior the shards hold: moment shards keep the means; step 6 --store mean writes them as latents.
    posterior = "moments" if ds.store == "moments" else (read_shard_info(ds.files[0]) or {}).get("posterior", "sample")
    sources = {"global": draw}
    if posterior == "moments":
        sources["global_means"] = ds.posterior_mean
    elif posterior == "mean":
        sources["global_means"] = draw  # the stored latents are the means
    record = {"num_latents": n, "num_shards": len(ds.files), "subset": len(picked), "seed": int(seed),
              "store": ds.store, "posterior": posterior, "unavailable": {}}
    for name, read in sources.items():
        count, mean, m2 = _global_moments(read, picked, chunk)
        std = (m2 / (count - 1)) ** 0.5  # Bessel's correction, as torch.std
        if not std > 0:
            raise ReproError(f"latent shards in {data_dir}: every latent element is equal (std 0); no '{name}' scale")
        record[name] = {"std": std, "scale": 1.0 / std, "mean": mean, "elements": count}
    if "global_means" not in sources:
        record["unavailable"]["global_means"] = (
            "the shards hold posterior draws, not means: re-extract with step 6 --store moments (or --store mean), "
            "or use data.latent_scaling: global")
    return record


def global_scale(data_dir: str | os.PathLike, scaling: str, subset: int = 10000, seed: int = 0,
                 note=print) -> float:
    """The factor of `scaling` (global | global_means) for the shards in `data_dir`: from its
    latents_scale.json while that describes the same shards (count of latents and shards), else computed
    now and written there (a read-only folder: used uncached, with a note)."""
    data_dir = Path(data_dir)
    path = data_dir / SCALE_NAME
    record = read_scale_file(path)
    ds = LatentShardDataset(data_dir, latent_norm=False)
    same = record is not None and (record.get("num_latents"), record.get("num_shards")) == (len(ds), len(ds.files))
    if not same:
        record = compute_global_scales(data_dir, subset=subset, seed=seed)
        try:
            write_scale_file(path, record)
            note(f"global latent scales computed from {record['subset']} latents, written to {path}")
        except ReproError as e:
            note(f"note: global latent scales computed but not cached ({e})")
    return scale_of(record, scaling, str(path))


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
    write_scale_file(data_dir / SCALE_NAME, compute_global_scales(data_dir, subset=subset, seed=seed))  # issue 23
    return f"recomputed from {len(shards)} shard(s) (subset of up to {subset} latents, seed {seed})"
