"""`latents_stats.pt`: read, check and write the file (the low level; never fabricated).

Upstream (hustvl/LightningDiT `datasets/img_latent_dataset.py`) stores `{'mean', 'std'}`, each
(1, C, 1, 1) float32, and normalises a training latent as `(x - mean) / std * latent_multiplier`.
Everything here works on the file alone; computing statistics from latent shards sits above the
dataset, in `repro.data.stats_recompute`.

kit (issue 23): `latents_scale.json` (`SCALE_NAME`) beside it holds the global factors of
`data.latent_scaling` (SD/lightdiff-style `x * 1/sigma`, one sigma over every latent element); a file of
its own, so the bytes of `latents_stats.pt` stay upstream's.
"""


from __future__ import annotations

import io
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from repro.errors import ReproError
from repro.utils.io import atomic_path, atomic_write_bytes, atomic_write_json

STATS_NAME = "latents_stats.pt"  # upstream's name, inside data.data_path
SCALE_NAME = "latents_scale.json"  # kit (issue 23): the global factors, beside STATS_NAME
GLOBAL_SCALINGS = ("global", "global_means")  # data.latent_scaling values that use SCALE_NAME


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


def load_latent_stats(path: str | os.PathLike, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (mean, std), each (1, C, 1, 1) float32; a ReproError with the reason otherwise."""
    verdict = validate_stats(path, channels)
    if not verdict.ok:
        raise ReproError(f"latent statistics {path}: {verdict.reason}. Repair with step 5 "
                         f"(python -m steps.step5_fix_stats --config C --recompute, or --refetch)")
    return verdict.mean, verdict.std


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


def install_stats_file(source: str | os.PathLike, path: str | os.PathLike, channels: int) -> None:
    """Copy a fetched stats file's bytes to `path` after validating it (backup + atomic write)."""
    check = validate_stats(source, channels)
    if not check.ok:
        raise ReproError(f"the fetched file is not usable either: {check.reason}")
    backup_existing(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


# ----------------------------------------------------------------------------------------------
# kit (issue 23): latents_scale.json, {"global": {...}, "global_means": {...}, ...}


def read_scale_file(path: str | os.PathLike) -> dict | None:
    """The record of a `latents_scale.json` (None when there is none); an unreadable one is a ReproError."""
    import json

    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReproError(f"{path} is not readable JSON ({e}); delete it (it is recomputed from the shards) or "
                         f"re-run step 5 --recompute") from e
    if not isinstance(record, dict):
        raise ReproError(f"{path} holds a {type(record).__name__}, expected a JSON object; delete it")
    return record


def scale_of(record: dict | None, scaling: str, source: str) -> float:
    """The factor 1/sigma of `scaling` in a latents_scale.json record, checked (finite, > 0)."""
    entry = (record or {}).get(scaling)
    if not isinstance(entry, dict) or "scale" not in entry:
        why = (record or {}).get("unavailable", {}).get(scaling, "it has no such entry")
        raise ReproError(f"{source} holds no '{scaling}' factor ({why}); recompute it with step 5 --recompute, or "
                         f"set data.latent_scale to the factor")
    scale = entry["scale"]
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ReproError(f"{source}['{scaling}']['scale'] is {scale!r}, expected a finite number > 0")
    return float(scale)


def global_scale_factor(data) -> float | None:
    """A `DataConfig`'s global factor: `latent_scale` when `latent_scaling` is global(_means), else None."""
    if data.latent_scaling not in GLOBAL_SCALINGS:
        return None
    if data.latent_scale is None:
        raise ReproError(f"data.latent_scaling is {data.latent_scaling} but data.latent_scale is null here: give the "
                         f"factor, or let step 7 read it from {SCALE_NAME} beside the shards")
    return float(data.latent_scale)


def write_scale_file(path: str | os.PathLike, record: dict) -> Path:
    """Write the record atomically (sorted JSON: equal factors give equal bytes)."""
    return atomic_write_json(path, record)
