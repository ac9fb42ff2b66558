"""`latents_stats.pt`: validate, compute from shards, write with a backup. Never fabricated.

Upstream (hustvl/LightningDiT `datasets/img_latent_dataset.py`) computes the file the first time the
dataset is built: 10,000 latents drawn without replacement (unseeded `np.random.choice`) from the
`latents` key, concatenated, then `mean = x.mean(dim=[0, 2, 3], keepdim=True)` and
`std = x.std(dim=[0, 2, 3], keepdim=True)`: per channel over all N*h*w values, std with Bessel's
correction (divides by N*h*w - 1). `compute_stats` computes exactly these quantities over a *seeded*
subset, accumulating in float64 chunk by chunk (memory stays bounded; the float32 result agrees with
upstream's one-shot float32 reduction to ~1e-6 relative), and returns float32 (1, C, 1, 1).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from repro.errors import ReproError
from repro.utils.io import atomic_path, atomic_write_bytes


@dataclass(repr=False)
class StatsVerdict:
    ok: bool
    reason: str
    mean: torch.Tensor | None = None  # (1, C, 1, 1) float32 when ok
    std: torch.Tensor | None = None

    def __str__(self) -> str:
        return f"{'OK' if self.ok else 'BAD'}: {self.reason}"

    def __repr__(self) -> str:
        return f"StatsVerdict(ok={self.ok}, reason={self.reason!r})"


def check_stats(obj, channels: int | None, source: str = "stats") -> StatsVerdict:
    """Validate an in-memory stats object (the rules of `validate_stats`)."""
    if not isinstance(obj, dict):
        return StatsVerdict(False, f"{source} holds a {type(obj).__name__}, expected a dict with keys 'mean' and 'std'")
    missing = [k for k in ("mean", "std") if k not in obj]
    if missing:
        return StatsVerdict(False, f"{source} lacks key(s) {', '.join(repr(k) for k in missing)} "
                                   f"(has {sorted(map(str, obj.keys()))}); expected 'mean' and 'std'")
    out = {}
    for key in ("mean", "std"):
        t = obj[key]
        if not isinstance(t, torch.Tensor):
            return StatsVerdict(False, f"{source}['{key}'] is a {type(t).__name__}, expected a tensor")
        if not t.is_floating_point():
            return StatsVerdict(False, f"{source}['{key}'] has dtype {t.dtype}, expected a floating-point tensor")
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != 1 or t.shape[3] != 1:
            want = f"(1, {channels}, 1, 1)" if channels else "(1, C, 1, 1)"
            return StatsVerdict(False, f"{source}['{key}'] has shape {tuple(t.shape)}, expected {want}")
        if channels is not None and t.shape[1] != channels:
            return StatsVerdict(False, f"{source}['{key}'] has {t.shape[1]} channels but the model takes "
                                       f"{channels} (model.in_chans): statistics of another tokenizer")
        t = t.detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).flatten().nonzero().flatten().tolist()
            return StatsVerdict(False, f"{source}['{key}'] is not finite (NaN/inf) in channel(s) {bad[:8]}")
        out[key] = t
    if out["mean"].shape != out["std"].shape:
        return StatsVerdict(False, f"{source}: 'mean' {tuple(out['mean'].shape)} and 'std' "
                                   f"{tuple(out['std'].shape)} differ in shape")
    if not (out["std"] > 0).all():
        bad = (out["std"] <= 0).flatten().nonzero().flatten().tolist()
        return StatsVerdict(False, f"{source}['std'] is <= 0 in channel(s) {bad[:8]} (division by zero when normalising)")
    c = out["mean"].shape[1]
    return StatsVerdict(True, f"{source}: mean and std (1, {c}, 1, 1), finite, std > 0", out["mean"], out["std"])


def validate_stats(path: str | os.PathLike, channels: int | None) -> StatsVerdict:
    """Check a `latents_stats.pt` file: weights-only load; keys `mean`, `std`; each (1, C, 1, 1) with
    C = `channels` (the model's input channels; None accepts any); finite; std > 0."""
    path = Path(path)
    if not path.is_file():
        return StatsVerdict(False, f"{path} does not exist")
    try:
        # weights_only=True: a pickle that would run code (or build arbitrary objects) is refused
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].strip() or type(e).__name__
        if "Unsupported global" in text:
            detail = detail.split(" was not an allowed global")[0].replace("Unsupported global: ", "")
            return StatsVerdict(False, f"{path} holds pickled code or objects ({detail}) that a weights-only load "
                                       f"refuses (not loaded, nothing executed); a stats file holds only tensors")
        return StatsVerdict(False, f"{path} is not a readable torch file (weights-only unpickler: {detail})")
    except Exception as e:  # truncated, not a torch file, ...
        first = (str(e).strip().split(". ")[0] or type(e).__name__)[:200]
        return StatsVerdict(False, f"{path} is not a readable torch file ({type(e).__name__}: {first}); "
                                   f"truncated or not made by torch.save")
    return check_stats(obj, channels, source=str(path))


def compute_stats(data_dir: str | os.PathLike, subset: int = 10000, seed: int = 0,
                  chunk: int = 256) -> dict[str, torch.Tensor]:
    """Channel-wise mean and std (upstream's formula, see the module docstring) over a seeded subset
    of min(`subset`, N) latents drawn without replacement from the shards in `data_dir`.

    Sample shards use `latents` (not the flips), as upstream. Moment shards use one posterior sample
    per image drawn from a generator seeded by (seed, index): the distribution training sees.
    """
    from repro.data.latents import LatentShardDataset, image_seed

    if subset < 2:
        raise ReproError(f"data.stats_subset={subset}: at least 2 latents are needed for a standard deviation")
    ds = LatentShardDataset(data_dir, latent_norm=False)
    n = len(ds)
    if n == 0:
        raise ReproError(f"latent shards in {data_dir} hold 0 latents (every image was corrupt?); "
                         f"statistics cannot be computed: re-run step 6 on a valid image source")
    g = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(n, generator=g)[: min(subset, n)].sort().values.tolist()
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
    std = (m2 / (count - 1)).sqrt()  # Bessel's correction, as torch.std
    shape = (1, ds.channels, 1, 1)
    return {"mean": mean.to(torch.float32).reshape(shape), "std": std.to(torch.float32).reshape(shape)}


def backup_existing(path: str | os.PathLike) -> Path | None:
    """Copy an existing file to `NAME.bak-<timestamp>` (atomically) before it is replaced."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bak, k = path.with_name(f"{path.name}.bak-{stamp}"), 1
    while bak.exists():
        bak, k = path.with_name(f"{path.name}.bak-{stamp}-{k}"), k + 1
    with atomic_path(bak) as tmp:
        shutil.copyfile(path, tmp)
    print(f"kept the previous {path.name} as {bak}", flush=True)
    return bak


def write_stats(path: str | os.PathLike, stats: dict[str, torch.Tensor], backup: bool = True) -> Path:
    """Write `{'mean', 'std'}` atomically with torch.save (the upstream format). An existing file is
    first kept as `latents_stats.pt.bak-<timestamp>` (when `backup`). Invalid stats are refused."""
    path = Path(path)
    verdict = check_stats(stats, None, source="statistics to write")
    if not verdict.ok:
        raise ReproError(f"refusing to write {path}: {verdict.reason}")
    if backup:
        backup_existing(path)
    # saved through a buffer: the zip's inner folder name is then fixed ("archive"), not the temp
    # file's random name, so equal statistics give byte-identical files
    buf = io.BytesIO()
    torch.save({"mean": verdict.mean.contiguous(), "std": verdict.std.contiguous()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# -- repairs (step 5; step 6 computes with the same compute_stats) -------------------------------


def no_stats_no_shards_message(data_dir: str | os.PathLike) -> str:
    from repro.data.latents import EMPTY_FOLDER_HINT, STATS_NAME

    return (f"{data_dir} has neither {STATS_NAME} nor latent shards: {EMPTY_FOLDER_HINT}. Fix it either way: "
            f"(1) fetch the official statistics: python -m steps.step5_fix_stats --config C --refetch; or "
            f"(2) extract latents into this folder with step 6 (python -m steps.step6_extract --config C "
            f"--source IMAGES --out {data_dir}), which also writes the statistics. Or fix data.data_path "
            f"if the shards live elsewhere")


def repair_advice(data_dir: str | os.PathLike) -> str:
    """What to run when the stats of `data_dir` are bad (depends on what the folder holds)."""
    from repro.data.latents import STATS_NAME, list_shards

    shards = list_shards(data_dir)
    if shards:
        return f"repair: --recompute (from the {len(shards)} shard(s) in {data_dir}) or --refetch (the official file)"
    if not (Path(data_dir) / STATS_NAME).exists():
        return no_stats_no_shards_message(data_dir)
    return "repair: --refetch (the official file), or extract latents with step 6, then --recompute"


def recompute_stats_file(data_dir: str | os.PathLike, channels: int, subset: int = 10000, seed: int = 0) -> str:
    """Recompute `<data_dir>/latents_stats.pt` from the shards there (backup + atomic write)."""
    from repro.data.latents import EMPTY_FOLDER_HINT, STATS_NAME, list_shards

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


def install_stats_file(source: str | os.PathLike, path: str | os.PathLike, channels: int) -> None:
    """Copy a fetched stats file's bytes to `path` after validating it (backup + atomic write)."""
    check = validate_stats(source, channels)
    if not check.ok:
        raise ReproError(f"the fetched file is not usable either: {check.reason}")
    backup_existing(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
