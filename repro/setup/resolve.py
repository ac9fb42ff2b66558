"""Turn a preset into the config a run actually uses: asset paths filled, `auto` made concrete.

Presets never hold `path/to/...` placeholders. A path value is one of:

    asset:NAME          the file of asset NAME      (ckpt_path: asset:lightningdit-xl-800ep)
    asset-dir:NAME      the folder holding it       (data.data_path: asset-dir:latents-stats)
                        (kit-local names such as asset:tiny-dit are generated here, never downloaded:
                        repro.data.synthetic.LOCAL_ASSETS)
    runs:REL            REL under the runs folder   (train.output_dir: runs:output)
    anything else       used as written

Asset files come from `runs/assets.json` (step 2: `{"assets": {NAME: {"path": ...}}}`).
`precision: auto`, `per_proc_batch_size: auto` and `micro_batch_size: auto|null` come from the
`recommended` block of `runs/env.json` (step 1), or from a named hardware profile; an auto
micro-batch also switches on `model.use_checkpoint` / `train.ema_on_cpu` where the computed memory
budget needed them to reach that micro-batch (XL/1 on a 16 GB T4). Values set explicitly (in the
file or with --set) are never changed. Every change is returned as a line "key: old -> new (why)",
including each key the file leaves out, which takes upstream's missing-key value (repro.config_checks).
`sample.precision: auto` is an opt-in (the presets sample in fp32, as upstream inference.py); with an
explicit fp32 and an `auto` batch, step 1's half-precision batch estimate is halved.

    cfg, changes = resolve_file("configs/lightningdit_xl_800ep.yaml", ["sample.cfg_scale=4.0"])
    write_resolved(cfg, default_resolved_path("configs/lightningdit_xl_800ep.yaml"), base=..., changes=changes)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from repro import paths
from repro.resources import find_config  # a path, or a preset name: tiny -> configs/tiny.yaml
from repro.config import Config, config_diff, flatten, load_config_file, save_config, set_key
from repro.config_checks import describe_missing, missing_upstream_defaults
from repro.data.synthetic import LOCAL_ASSETS, local_asset
from repro.errors import ConfigError
from repro.setup import envinfo
from repro.utils.hardware import GiB

(ASSET, ASSET_DIR), RUNS = paths.ASSET_MARKERS, paths.RUNS_MARKER  # the markers, defined once in repro.paths

# Hardware a user may plan for without being on it (`--profile t4`): same decisions as step 1 makes.
HARDWARE_PROFILES: dict[str, list[envinfo.GPUInfo]] = {
    "cpu": [],
    "p100": [envinfo.GPUInfo("Tesla P100-PCIE-16GB", (6, 0), 17_071_734_784)],
    "t4": [envinfo.REFERENCE_CARDS[0]],  # torch's total_memory on Kaggle/Colab
    "t4x2": [dataclasses.replace(envinfo.REFERENCE_CARDS[0], index=i) for i in range(2)],  # Kaggle's "GPU T4 x2"
    "l4": [envinfo.GPUInfo("NVIDIA L4", (8, 9), 22 * GiB)],
    "a100-40gb": [envinfo.GPUInfo("NVIDIA A100-SXM4-40GB", (8, 0), 40 * GiB)],
    "a100-80gb": [envinfo.GPUInfo("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)],
    "h100-80gb": [envinfo.REFERENCE_CARDS[1]],
}


def default_resolved_path(base: str | os.PathLike) -> Path:
    return paths.runs_dir() / "configs" / f"{Path(base).stem}.resolved.yaml"


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: {fix}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} {path} is unreadable ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object: {fix}")
    return data


def _download_hint(*names: str) -> str:
    return f"run `python -m steps.step2_download --only {' '.join(names)}`"


class MissingAssetError(ConfigError):
    """An `asset:` marker whose file is not in the asset table (or no longer on disk)."""

    def __init__(self, name: str, key: str, detail: str):
        super().__init__(f"config key '{key}' needs asset '{name}', but {detail}: {_download_hint(name)}")
        self.name, self.key, self.detail = name, key, detail


def _asset_path(name: str, assets: Any, key: str) -> tuple[Path, str]:
    """(file path of asset `name`, where it was found) or a ConfigError that says how to get it."""
    if isinstance(assets, Mapping):
        entries, origin, folder, table = assets.get("assets", {}), "the given assets table", Path.cwd(), None
    else:
        entries, table = paths.read_asset_table(assets)
        origin, folder = str(table), table.parent
    if table is not None and not table.exists():  # step 2 has not written the asset table yet
        raise MissingAssetError(name, key, f"{table} does not exist yet")
    p = paths.recorded_asset_path(entries if isinstance(entries, Mapping) else {}, name, folder)
    if p is None or not p.exists():
        raise MissingAssetError(name, key, f"{origin} does not list it" if p is None
                                else f"{origin} points to {p}, which is gone")
    return p, origin


def _recommendation(env: Any, profile: Optional[str]) -> tuple[dict[str, Any], str]:
    """(recommended block, where it came from): a profile, env.json, or this machine detected now."""
    if profile is not None:
        if profile not in HARDWARE_PROFILES:
            raise ConfigError(f"unknown hardware profile '{profile}' (choose one of {', '.join(HARDWARE_PROFILES)})")
        return envinfo.recommend(HARDWARE_PROFILES[profile]), f"profile {profile}"
    if isinstance(env, Mapping):
        report, origin = env, "the given env report"
    else:
        src = Path(env) if env is not None else paths.env_json()
        if env is None and not src.exists():
            return envinfo.recommend(envinfo.detect_gpus()), \
                f"this machine, detected now ({src} missing: run `python -m steps.step1_install` to record it)"
        report = _read_json(src, "environment report", "run `python -m steps.step1_install` to write it")
        origin = str(src)
    rec = report.get("recommended")
    needed = ("precision", "sample_per_proc_batch_size", "train_micro_batch_size", "train_use_checkpoint",
              "train_ema_on_cpu")  # what step 1 writes
    if not isinstance(rec, Mapping) or any(k not in rec for k in needed):
        raise ConfigError(f"{origin} has no complete 'recommended' block ({', '.join(needed)}): "
                          "run `python -m steps.step1_install` again to rewrite it")
    return dict(rec), origin


def planned_gpus(env: Any = None, profile: Optional[str] = None) -> list[envinfo.GPUInfo]:
    """The GPUs a plan is for, as `_recommendation` finds them: the profile's, the env report's (step 1), or this
    machine's detected now (also when the report is missing or unreadable: the plan is only printed)."""
    if profile is not None:
        if profile not in HARDWARE_PROFILES:
            raise ConfigError(f"unknown hardware profile '{profile}' (choose one of {', '.join(HARDWARE_PROFILES)})")
        return HARDWARE_PROFILES[profile]
    try:
        report = env if isinstance(env, Mapping) else _read_json(Path(env) if env is not None else paths.env_json(),
                                                                 "environment report", "")
        return [envinfo.GPUInfo(g["name"], tuple(g["capability"]), int(g["total_memory_bytes"]), int(g.get("index", 0)))
                for g in report["gpus"]]
    except (ConfigError, KeyError, TypeError, ValueError):
        return envinfo.detect_gpus()


def resolve_config(cfg: Config, assets: Any = None, env: Any = None, profile: Optional[str] = None,
                   runtime_batch: bool = False) -> tuple[Config, list[str]]:
    """A resolved copy of `cfg` and the list of changes, "key: old -> new (why)".

    assets: path of assets.json or its parsed dict (default runs/assets.json), read only when a
    marker needs it. env: path of env.json or its parsed dict (default runs/env.json; when that is
    missing this machine is detected now). profile: a HARDWARE_PROFILES name, instead of env.
    runtime_batch: leave `sample.per_proc_batch_size: auto` for the sampler to measure on the GPU
    it runs on (step 4 on CUDA) instead of taking step 1's estimate.
    """
    out = copy.deepcopy(cfg)
    return out, _fill_paths(out, assets) + _fill_auto(out, env, profile, runtime_batch)


def _fill_paths(out: Config, assets: Any) -> list[str]:
    """`asset:`, `asset-dir:` and `runs:` values -> paths, in place; every missing asset in one error."""
    changes: list[str] = []
    missing: list[MissingAssetError] = []
    for key, value in flatten(out).items():
        if not isinstance(value, str) or not value.startswith((ASSET, ASSET_DIR)):
            continue
        kind, name = (part.strip() for part in value.split(":", 1))
        if not name:
            raise ConfigError(f"config key '{key}': '{value}' names no asset (write e.g. asset:vavae-f16d32)")
        try:  # the tiny preset's stand-in weights (LOCAL_ASSETS) are made here, never fetched
            path, origin = ((local_asset(name), "kit-local asset, generated on first use") if name in LOCAL_ASSETS
                            else _asset_path(name, assets, key))
        except MissingAssetError as e:
            missing.append(e)  # report every missing asset at once, with one command that fetches them all
            continue
        new = str(path.parent if kind == "asset-dir" else path)
        changes.append(f"{key}: {value} -> {new} ({origin})")
        set_key(out, key, new)
    changes += [f"{change} (runs folder)" for change in paths.resolve_runs_markers(out)]  # runs:REL, as every step
    if len(missing) == 1:
        raise missing[0]
    if missing:
        names = list(dict.fromkeys(e.name for e in missing))
        raise ConfigError(f"{len(names)} assets this config needs are not downloaded: "
                          + "; ".join(f"'{e.name}' for '{e.key}' ({e.detail})" for e in missing)
                          + f" -- {_download_hint(*names)}")
    return changes


_AUTO_KEYS = ("train.micro_batch_size", "train.precision", "sample.per_proc_batch_size", "sample.precision")


def _sample_precision_reason(rec: Mapping[str, Any]) -> str:
    """Why `sample.precision: auto` became rec's precision, true for sampling (step 1's reason is training's)."""
    if rec["precision"] == "fp32":
        return f"{rec.get('precision_reason', '')}; fp32, as upstream inference.py samples"
    return (f"the fastest for this hardware ({rec.get('precision_reason', '')}), an opt-in: upstream inference.py "
            "samples in fp32 + TF32 and half precision moves the latents (README); set sample.precision=fp32 "
            "to reproduce")


def _fill_auto(out: Config, env: Any, profile: Optional[str], runtime_batch: bool) -> list[str]:
    """`auto` precision and batch sizes -> the hardware's recommendation, in place."""
    changes: list[str] = []
    auto = {k: v for k, v in flatten(out).items() if k in _AUTO_KEYS and v == "auto"}
    if out.train.micro_batch_size is None:  # null keeps its old meaning: chosen for the hardware
        auto["train.micro_batch_size"] = None
    if runtime_batch and auto.pop("sample.per_proc_batch_size", None) == "auto":
        changes.append("sample.per_proc_batch_size: auto kept (measured from free GPU memory when sampling starts)")
    explicit_half = {k: v for k, v in (("sample.precision", out.sample.precision),
                                       ("train.precision", out.train.precision)) if v in ("bf16", "fp16")}
    if not auto and not explicit_half:
        return changes
    rec, origin = _recommendation(env, profile)
    if out.train.strategy == "fsdp":  # kit (issue 16): the memory plan of sharded state
        rec = envinfo.fsdp_recommendation(rec)

    # Every auto value takes the recommendation (a micro-batch never exceeds the global batch).
    picks = {"sample.precision": (rec["precision"], _sample_precision_reason(rec)),
             "train.precision": (rec["precision"], rec.get("precision_reason", "")),
             "sample.per_proc_batch_size": (int(rec["sample_per_proc_batch_size"]), rec.get("sample_batch_reason", "")),
             "train.micro_batch_size": (int(rec["train_micro_batch_size"]), rec.get("train_batch_reason", ""))}
    for key in sorted(auto, key=_AUTO_KEYS.index):
        new, why = picks[key]
        if key == "train.micro_batch_size" and new > out.train.global_batch_size:
            new, why = out.train.global_batch_size, f"capped at train.global_batch_size; {why}"
        if key == "sample.per_proc_batch_size" and out.sample.precision == "fp32" and rec["precision"] != "fp32":
            # step 1 sized the batch for half precision; fp32 activations take twice the memory per image
            new, why = max(1, new // 2), f"halved for sample.precision fp32; {why}"
        set_key(out, key, new)
        changes.append(f"{key}: {auto[key]} -> {new} ({why}; from {origin})")

    # The micro-batch was chosen with these memory savers on: turn them on with it (never off).
    if "train.micro_batch_size" in auto:
        for key, rec_key in (("model.use_checkpoint", "train_use_checkpoint"), ("train.ema_on_cpu", "train_ema_on_cpu")):
            if rec[rec_key] and not flatten(out)[key]:
                set_key(out, key, True)
                changes.append(f"{key}: False -> True (needed for train.micro_batch_size "
                               f"{out.train.micro_batch_size}; from {origin})")

    # Explicit half precision is kept, with a warning where the hardware recommends otherwise.
    for key, value in explicit_half.items():
        if value != rec["precision"] and not (value == "fp16" and rec["precision"] == "bf16"):
            changes.append(f"warning: {key}: {value} kept as set, but {origin} recommends {rec['precision']} "
                           f"({rec.get('precision_reason', '')}); set {key}=auto to follow it")
    return changes


def resolve_file(base: str | os.PathLike, overrides: Optional[list[str]] = None, assets: Any = None,
                 env: Any = None, profile: Optional[str] = None,
                 runtime_batch: bool = False) -> tuple[Config, list[str], Path]:
    """Load a preset (path or name), apply --set overrides, resolve. Returns (config, changes, base path).

    Overrides go in before resolving, so a value given with --set is explicit and wins over `auto`
    (and an `asset:` marker given with --set is filled like any other).
    """
    path = find_config(base)
    # one parse, one build: the file as written and, checked after the overrides (--set may repair a
    # refused value), the config to resolve
    raw, as_written, overridden = load_config_file(path, overrides)
    set_keys = {o.split("=", 1)[0].strip() for o in overrides or []}
    filled = {k: v for k, v in missing_upstream_defaults(raw).items() if k not in set_keys}
    changes = describe_missing(filled, path.name)
    changes += [f"{k}: {old} -> {new} (--set)" for k, old, new in config_diff(as_written, overridden)]
    cfg, resolved = resolve_config(overridden, assets=assets, env=env, profile=profile, runtime_batch=runtime_batch)
    return cfg, changes + resolved, path


def write_resolved(cfg: Config, path: str | os.PathLike, base: str | os.PathLike | None = None,
                   changes: Optional[list[str]] = None) -> Path:
    """Write the resolved config atomically, headed by where it came from and what changed."""
    header = [f"Resolved config written by repro.setup.resolve on {time.strftime('%Y-%m-%d %H:%M:%S')}",
              f"base: {Path(base).resolve() if base is not None else '(in memory)'}",
              "changes:" if changes else "changes: none", *(f"  {c}" for c in changes or [])]
    return save_config(cfg, path, header=header)
