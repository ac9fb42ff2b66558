"""The config step 4 samples with: step 3's resolved preset, running steps 2 and 3 when their
outputs are missing (and saying so), then the demo settings and the user's --set overrides.

A preset (`asset:`/`asset-dir:`/`runs:` paths or `auto` values) is resolved by step 3 into
runs/configs/<name>.resolved.yaml; that file is reused while it is newer than the preset and the
asset table and every file it names exists. A concrete config (real paths) is used as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from repro import paths
from repro.config import Config, apply_overrides, flatten, load_config
from repro.resolve import ASSET, ASSET_DIR, RUNS, default_resolved_path, find_config, resolve_config
from repro.utils import distributed as du
from repro.utils.distributed import print0

# What sampling reads from disk; other asset paths (the FID reference batch) are not needed here.
SAMPLING_PATH_KEYS = ("ckpt_path", "vae.ckpt_path", "data.data_path")
# Upstream inference.py --demo forces these whatever the config says (its steps and method are kept).
DEMO_OVERRIDES = ("sample.cfg_scale=9.0", "sample.cfg_interval_start=0.0", "sample.timestep_shift=0.0")


def _markers(cfg: Config) -> dict[str, str]:
    return {k: v for k, v in flatten(cfg).items() if isinstance(v, str) and v.startswith((ASSET, ASSET_DIR, RUNS))}


def _is_preset(cfg: Config) -> bool:
    return bool(_markers(cfg)) or any(v == "auto" for v in flatten(cfg).values())


def _have(name: str, table: tuple[dict, Path]) -> bool:
    entries, src = table
    p = paths.recorded_asset_path(entries, name, src.parent)
    return p is not None and p.exists()


def _reusable(resolved: Path, preset: Path, raw: Config) -> bool:
    if not resolved.is_file():
        return False
    newest_input = max(preset.stat().st_mtime, paths.assets_json().stat().st_mtime
                       if paths.assets_json().is_file() else 0.0)
    if resolved.stat().st_mtime < newest_input:
        return False
    try:
        cfg = load_config(resolved)
    except Exception:  # noqa: BLE001 -- an unreadable resolved file is simply made again
        return False
    values = flatten(cfg)
    return all(Path(str(values[k])).exists() for k in _markers(raw) if k in SAMPLING_PATH_KEYS and values.get(k))


def prepare_config(base: str, overrides: Optional[Sequence[str]] = None, demo: bool = False,
                   cuda: bool = False) -> tuple[Config, list[str]]:
    """(config to sample with, header lines saying where it came from)."""
    preset = find_config(base)
    raw = load_config(preset)
    header = [f"preset: {preset.resolve()}"]
    if not _is_preset(raw):
        cfg = raw
    else:
        resolved = default_resolved_path(preset)
        if _agree(_reusable(resolved, preset, raw)):
            print0(f"step 4: using {resolved} (step 3's output for {preset.name})")
            cfg = load_config(resolved)
        else:
            cfg = _run_steps_2_and_3(preset, raw, resolved)
        header.append(f"resolved: {resolved}")
        if raw.sample.per_proc_batch_size == "auto" and cuda:
            # issue 7: on a GPU the batch comes from the free memory measured now, not step 1's table
            cfg.sample.per_proc_batch_size = "auto"
    changes = []
    if demo:
        cfg = apply_overrides(cfg, list(DEMO_OVERRIDES))
        changes += [f"demo (upstream inference.py --demo): {o}" for o in DEMO_OVERRIDES]
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
        changes += [f"--set {o}" for o in overrides]
        if _markers(cfg):  # an override that names an asset: fill it like step 3 does
            cfg, more = resolve_config(cfg)
            changes += more
    for line in changes:
        print0(f"step 4: {line}")
    return cfg, header + changes


def _agree(value):
    """Rank 0's value on every process, so all take the same branch (and meet at the same barriers)."""
    if not du.is_initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_steps_2_and_3(preset: Path, raw: Config, resolved: Path) -> Config:
    from steps import step2_download, step3_configs

    markers = _markers(raw)
    table = paths.read_asset_table()
    needed = sorted({v.split(":", 1)[1] for k, v in markers.items()
                     if k in SAMPLING_PATH_KEYS and v.startswith((ASSET, ASSET_DIR))})
    missing = _agree([name for name in needed if not _have(name, table)])
    if missing:
        print0(f"step 4: asset(s) {', '.join(missing)} not downloaded yet: running step 2 "
               f"(python -m steps.step2_download --only {' '.join(missing)})")
        if du.is_main():
            step2_download.main(only=missing)
        du.barrier()
        table = paths.read_asset_table()
    # Asset paths sampling does not read (the FID reference batch) are left unset if absent.
    optional = _agree([f"{k}=null" for k, v in markers.items() if k not in SAMPLING_PATH_KEYS
                       and v.startswith((ASSET, ASSET_DIR)) and not _have(v.split(":", 1)[1], table)])
    if optional:
        print0(f"step 4: not needed for sampling and not downloaded, left unset: {', '.join(optional)}")
    print0(f"step 4: running step 3 (python -m steps.step3_configs --base {preset})")
    if not optional:
        if du.is_main():
            step3_configs.main(base=str(preset), out=str(resolved))
        du.barrier()
        return load_config(resolved)
    if du.is_main():
        return step3_configs.main(base=str(preset), set=optional, dry_run=True)["config"]
    from repro.resolve import resolve_file

    return resolve_file(preset, overrides=optional)[0]
