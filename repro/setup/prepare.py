"""The config step 4 samples with: the preset resolved now (fetching the assets sampling needs when they
are missing, and saying so), then the demo settings and the user's --set overrides.

A preset (`asset:`/`asset-dir:`/`runs:` paths or `auto` values) is resolved as step 3 resolves it
(`repro.setup.resolve`) and the result is written where step 3 writes it,
runs/configs/<name>.resolved.yaml. Every process runs the same code on the same inputs: rank 0
fetches what is missing (step 2's `repro.hub.fetch_assets`), all wait, then each resolves for itself.
A concrete config (real paths) is used as written: give step 4 the file step 3 wrote (`--config
runs/configs/<name>.resolved.yaml`, as notebook 00 does) and step 3's `--profile` and `--set` choices hold.
"""

from __future__ import annotations

from typing import Optional, Sequence

from repro import paths
from repro.config import Config, apply_overrides, flatten, load_config
from repro.data.synthetic import LOCAL_ASSETS, local_asset, local_asset_exists
from repro.setup.resolve import (ASSET, ASSET_DIR, RUNS, default_resolved_path, find_config, resolve_config,
                                 resolve_file, write_resolved)
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


def sampling_assets(base: str) -> list[str]:
    """The downloadable assets (step 2's names) that sampling with preset `base` reads; kit-local ones
    (the tiny preset's generated weights) are not among them, so `tiny` needs no download at all."""
    return [name for name in _sampling_asset_names(load_config(base)) if name not in LOCAL_ASSETS]


def _sampling_asset_names(raw: Config) -> list[str]:
    """The asset names (asset:NAME, asset_dir:NAME) of the config keys sampling reads, sorted."""
    return sorted({v.split(":", 1)[1].strip() for k, v in _markers(raw).items()
                   if k in SAMPLING_PATH_KEYS and v.startswith((ASSET, ASSET_DIR))})


def _downloaded(name: str) -> bool:
    if name in LOCAL_ASSETS:
        return local_asset_exists(name)
    entries, src = paths.read_asset_table()
    p = paths.recorded_asset_path(entries, name, src.parent)
    return p is not None and p.exists()


def prepare_config(base: str, overrides: Optional[Sequence[str]] = None, demo: bool = False,
                   cuda: bool = False) -> tuple[Config, list[str]]:
    """(config to sample with, header lines saying where it came from). `cuda`: the batch size `auto`
    is left for the sampler to measure on the GPU."""
    preset = find_config(base)
    raw = load_config(preset)
    header = [f"preset: {preset.resolve()}"]
    cfg = raw
    if _is_preset(raw):
        resolved = default_resolved_path(preset)
        cfg = _resolve_preset(preset, raw, resolved, cuda)
        header.append(f"resolved: {resolved}")
    else:  # step 3's resolved file (its --profile and --set choices kept), or a config written by hand
        print0(f"step 4: {preset} is a resolved config (no asset: markers, no auto values): used as written, "
               "step 3 is not run again")

    # The demo's fixed settings, then the user's overrides (an override naming an asset is filled too).
    changes = []
    if demo:
        cfg = apply_overrides(cfg, list(DEMO_OVERRIDES))
        changes += [f"demo (upstream inference.py --demo): {o}" for o in DEMO_OVERRIDES]
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
        changes += [f"--set {o}" for o in overrides]
        if _markers(cfg):
            cfg, more = resolve_config(cfg, runtime_batch=cuda)
            changes += more
    for line in changes:
        print0(f"step 4: {line}")
    return cfg, header + changes


def _fetch_for_step4(names: list[str], preset) -> None:
    """Step 2's fetch; without network (or offline) the advice names what step 4 users can run, not step 2's
    flags (--offline, --dest), which step 4 does not take."""
    from repro.hub import NetworkError, OfflineError, fetch_assets

    try:
        fetch_assets(names=names)
    except (NetworkError, OfflineError) as e:
        fact = ("offline mode (HF_HUB_OFFLINE=1) and not on disk" if isinstance(e, OfflineError)
                else str(e).split("; ", 1)[0])
        raise type(e)(f"step 4 needs {', '.join(names)} for {getattr(preset, 'name', preset)}: {fact}; fetch them "
                      f"where the network is reachable with `python -m steps.step2_download --only {' '.join(names)}` "
                      f"(step 2 takes --dest DIR, and --offline to use files already on disk), then run step 4 "
                      f"again; or sample offline now with `python -m steps.step4_inference --config tiny` "
                      f"(generated stand-in weights, no download)") from None


def _resolve_preset(preset, raw: Config, resolved, cuda: bool) -> Config:
    markers = _markers(raw)
    needed = _sampling_asset_names(raw)

    # Fetch the assets sampling reads, on rank 0, while every other process waits (kit-local ones are made).
    missing = du.broadcast_object([name for name in needed if not _downloaded(name)])
    local, missing = [n for n in missing if n in LOCAL_ASSETS], [n for n in missing if n not in LOCAL_ASSETS]
    if local:
        print0(f"step 4: generating the kit-local asset(s) {', '.join(local)} (seeded stand-in weights, no download)")
        if du.is_main():
            for name in local:
                local_asset(name)
        du.barrier()
    if missing:
        print0(f"step 4: asset(s) {', '.join(missing)} not downloaded yet: running step 2 "
               f"(python -m steps.step2_download --only {' '.join(missing)})")
        if du.is_main():
            _fetch_for_step4(missing, preset)
        du.barrier()

    # Asset paths sampling does not read (the FID reference batch) are left unset if absent.
    optional = du.broadcast_object([f"{k}=null" for k, v in markers.items() if k not in SAMPLING_PATH_KEYS
                                    and v.startswith((ASSET, ASSET_DIR)) and not _downloaded(v.split(":", 1)[1])])
    if optional:
        print0(f"step 4: not needed for sampling and not downloaded, left unset: {', '.join(optional)}")

    # Resolve as step 3 does, on every process; rank 0 writes step 3's file.
    print0(f"step 4: running step 3 (python -m steps.step3_configs --config {preset})")
    cfg, changes, _ = resolve_file(preset, overrides=optional, runtime_batch=cuda)
    for line in changes:
        print0(f"  {line}")
    if du.is_main():
        write_resolved(cfg, resolved, base=preset, changes=changes)
    du.barrier()
    return cfg
