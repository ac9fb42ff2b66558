"""Typed config in the official LightningDiT YAML schema, defaults in one place.

Official configs (hustvl/LightningDiT `configs/*.yaml`) load unchanged: every
section is a dataclass whose fields are the upstream keys, plus a few of the
kit's own (marked "kit:"). Unknown keys and wrong types raise a ConfigError that
names the key and the nearest valid one (after nanoGPT's configurator.py).

    cfg = load_config("configs/lightningdit_xl_800ep.yaml", overrides=["sample.cfg_scale=4.0"])
    cfg.sample.cfg_scale            # 4.0
    save_config(cfg, "runs/x/config.yaml")

Every key is honoured as upstream honours it, or a value the kit does not implement is refused
(`repro.config_checks`; the table key -> upstream meaning -> kit behaviour is docs/config_keys.md).
The dataclass defaults are the values the official config files write; a key a YAML file leaves
out means what upstream train.py / inference.py make of a missing key (`latent_multiplier` 0.18215,
`in_chans` 4, `use_swiglu` false, ...: `config_checks.UPSTREAM_WHEN_MISSING`).

Presets may hold `asset:NAME` / `asset-dir:NAME` / `runs:REL` paths and `auto` precision and
batch sizes; `repro.setup.resolve.resolve_config` (step 3) makes them concrete. A resolved config
loads back with load_config unchanged, and resolving it again changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from repro.config_checks import check_supported, tokenizer_config_reason, with_upstream_defaults
from repro.errors import ConfigError
from repro.utils.io import atomic_write_text


# Precision names the kit understands; "auto" is resolved from runs/env.json by step 3 (repro.resolve).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# A per-process batch: a number, or "auto" (chosen for the GPU's memory by step 3).
Batch = Union[int, Literal["auto"]]


@dataclass
class DataConfig:
    data_path: Optional[str] = None  # folder with latent shards and/or latents_stats.pt
    fid_reference_file: Optional[str] = None  # ADM reference batch (VIRTUAL_imagenet256_labeled.npz)
    image_size: int = 256
    num_classes: int = 1000
    num_workers: int = 8
    latent_norm: bool = True
    latent_multiplier: float = 1.0
    valid_path: Optional[str] = None  # latent folder: validation loss at each checkpoint (repro.training.validation)
    raw_data_dir: Optional[str] = None  # kit: image folder / tar shards for step 6 extraction
    stats_subset: int = 10000  # kit: latents used for latents_stats.pt (upstream: 10,000)
    horizontal_flip: bool = True  # kit: train on `latents_flip` with p 0.5 (upstream); false for digits, text, scans


@dataclass
class VAEConfig:
    model_name: str = "vavae_f16d32"  # the official VA-VAE, or kit: `custom` = a tokenizer of step 9 (repro.tokenizer.loader)
    downsample_ratio: int = 16
    ckpt_path: Optional[str] = None  # kit: the VA-VAE weights file
    ch: int = 128  # kit: base width (128 official; 32 for CPU tests)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # kit: decode precision: fp32 keeps images within 1 level of upstream


@dataclass
class ModelConfig:
    model_type: str = "LightningDiT-XL/1"
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    in_chans: int = 32
    use_checkpoint: bool = False  # gradient checkpointing per block (upstream key)
    class_dropout_prob: float = 0.1  # kit: upstream constructor default
    learn_sigma: bool = False  # upstream inference.py key; true is refused (velocity prediction only)


@dataclass
class TrainConfig:
    max_steps: int = 80000
    global_batch_size: int = 1024
    global_seed: int = 0
    output_dir: str = "output"
    exp_name: str = "lightningdit_xl_vavae_f16d32"
    ckpt: Optional[str] = None  # checkpoint to initialise from (stage 1 continues stage 0)
    log_every: int = 100
    ckpt_every: int = 20000
    resume: bool = True  # resume from the newest complete checkpoint (upstream key, upstream default false)
    weight_init: Optional[str] = None  # upstream train.py: pretrained weights to start from (not a resume)
    use_checkpoint: bool = True  # upstream train.py only logs it; false is refused (see model.use_checkpoint)
    grad_accum_steps: int = 1  # VFM-VAE train.py: global batch = micro batch x processes x this
    wandb_project: Optional[str] = "lightningdit"  # VFM-VAE key: the W&B project when train.wandb (repro.training.log_backends)
    micro_batch_size: Optional[Batch] = None  # kit: per-process batch; None or "auto" = chosen for the hardware
    precision: Precision = "auto"  # kit: auto | fp32 | bf16 | fp16
    ema_decay: float = 0.9999
    keep_last: int = 3  # kit: checkpoints kept
    compile: Optional[bool] = None  # kit: torch.compile the model; null = on CUDA (falls back to eager on failure)
    sample_every: int = 0  # kit: EMA sample grid every N steps (0 = off)
    time_budget: Optional[float] = None  # kit: seconds; save a checkpoint and exit cleanly before this (--time-budget)
    ema_on_cpu: bool = False  # kit: keep the EMA in host memory (saves 4 bytes/parameter of GPU memory)
    deterministic: bool = False  # kit: torch.use_deterministic_algorithms for bitwise-repeatable runs
    sample_num: int = 8  # kit: images in the periodic EMA sample grid
    strategy: Literal["ddp", "fsdp"] = "ddp"  # kit: ddp = a full replica per process; fsdp = FSDP2, sharded per block
    fsdp_offload: bool = False  # kit: with fsdp, keep parameter/gradient/optimizer shards in host memory
    async_save: bool = True  # kit: write checkpoints on a background thread from a host copy (false: in the loop)
    tensorboard: bool = False  # kit: also log to TensorBoard (run folder/tensorboard; needs the tensorboard package)
    wandb: bool = False  # kit: also log to Weights & Biases, project train.wandb_project (opt-in; needs wandb)


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    fused: Optional[bool] = None  # kit: fused AdamW (None = when on CUDA)
    max_grad_norm: Optional[float] = None  # gradient clipping (upstream key; None = off)


@dataclass
class TransportConfig:
    path_type: str = "Linear"
    prediction: str = "velocity"
    loss_weight: Optional[str] = None
    sample_eps: Optional[float] = None
    train_eps: Optional[float] = None
    use_cosine_loss: bool = True
    use_lognorm: bool = True


@dataclass
class SampleConfig:
    mode: str = "ODE"
    sampling_method: str = "euler"
    atol: float = 1e-6
    rtol: float = 1e-3
    reverse: bool = False
    likelihood: bool = False
    num_sampling_steps: int = 250
    cfg_scale: float = 1.0
    per_proc_batch_size: Batch = 4  # "auto" = chosen for the GPU by step 3
    fid_num: int = 50000
    cfg_interval_start: float = 0.0
    timestep_shift: float = 0.0
    cfg_channels: Optional[int] = 3  # kit: guided channels; 3 = upstream quirk, null = all
    precision: Precision = "fp32"  # kit: fp32 (+TF32 on sm_80+) = upstream inference.py; auto | bf16 | fp16 opt in
    seed: int = 0  # kit: global sampling seed


@dataclass
class Config:
    ckpt_path: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building and checking


def _nearest(name: str, valid: list[str], prefix: str = "") -> str:
    if not prefix:  # a section key written at the top level ('cfg_scale: 4'): point at its section
        owners = [f"{section}.{name}" for section, keys in _section_keys().items() if name in keys]
        if owners:
            return f"; did you mean '{owners[0]}'?"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + v for v in sorted(valid))}"


def _section_keys() -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(Config)
    return {name: tuple(f.name for f in dataclasses.fields(tp)) for name, tp in hints.items()
            if dataclasses.is_dataclass(tp)}


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_tp_name(tp)}, got {value!r} ({type(value).__name__})"
                          + _nearest_choice(value, tp))
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp)):
            return value
        raise ConfigError(f"config key '{key}': expected {_tp_name(tp)}, got {value!r}" + _nearest_choice(value, tp))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads '1e-6' as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}': expected {_tp_name(tp)}, got {value!r} ({type(value).__name__})")


def _literal_choices(tp: Any) -> list[str]:
    if typing.get_origin(tp) is Literal:
        return [str(c) for c in typing.get_args(tp)]
    return [c for arg in typing.get_args(tp) for c in _literal_choices(arg)]


def _nearest_choice(value: Any, tp: Any) -> str:
    choices = _literal_choices(tp)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5) if isinstance(value, str) else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _tp_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _tp_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _validate(cfg: "Config") -> "Config":
    """Range checks that types cannot express; each names the key and a valid value."""
    positive = {"sample.per_proc_batch_size": cfg.sample.per_proc_batch_size,
                "sample.num_sampling_steps": cfg.sample.num_sampling_steps,
                "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.global_batch_size": cfg.train.global_batch_size,
                "train.grad_accum_steps": cfg.train.grad_accum_steps,
                "vae.downsample_ratio": cfg.vae.downsample_ratio,
                "data.image_size": cfg.data.image_size,
                "data.num_classes": cfg.data.num_classes}
    for key, value in positive.items():
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if cfg.data.image_size % cfg.vae.downsample_ratio:
        # upstream train.py asserts the same: the latent grid is image_size / downsample_ratio
        raise ConfigError(f"config key 'data.image_size' ({cfg.data.image_size}) must be divisible by "
                          f"'vae.downsample_ratio' ({cfg.vae.downsample_ratio})")
    if not 0.0 <= cfg.sample.cfg_interval_start <= 1.0:
        raise ConfigError(f"config key 'sample.cfg_interval_start' must be in [0, 1], got {cfg.sample.cfg_interval_start}")
    if cfg.sample.timestep_shift < 0:
        raise ConfigError(f"config key 'sample.timestep_shift' must be >= 0 (0 = no shift), got {cfg.sample.timestep_shift}")
    check_supported(cfg)  # values upstream accepts (or ignores) that the kit does not implement
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'{_nearest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], check: bool = True) -> Config:
    """Build a Config from a parsed mapping (keys and types always checked; values unless check=False)."""
    cfg = _build(Config, raw, "")
    return _validate(cfg) if check else cfg


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 4.0, true, null, 'text'."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply dotted `key=value` overrides (`sample.cfg_scale=4.0`) in place; returns cfg.

    All or nothing: the overrides go to a copy first, so a bad one leaves `cfg` untouched.
    """
    work = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. sample.cfg_scale=4.0)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        obj: Any = work
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            full = ".".join(parts[: i + 1])
            if part not in names:
                raise ConfigError(f"unknown config key '{full}' in override '{item}'"
                                  f"{_nearest(part, names, '.'.join(parts[:i]) + '.' if i else '')}")
            tp = _type_hints(type(obj))[part]
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"config key '{full}' is a value, not a section (override '{item}')")
                obj = getattr(obj, part)
            else:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"config key '{full}' is a section; set one of its keys (override '{item}')")
                setattr(obj, part, _coerce(_parse_value(text), tp, full))
    _validate(work)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(work, f.name))
    return cfg


def flatten(cfg: Config) -> dict[str, Any]:
    """{'sample.cfg_scale': 6.7, 'ckpt_path': ..., ...}: dotted keys in schema order."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def config_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key that differs."""
    a, b = flatten(old), flatten(new)
    return [(k, a[k], b[k]) for k in a if a[k] != b[k] or type(a[k]) is not type(b[k])]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed YAML mapping of a config file, or a ConfigError naming the file and the fix."""
    from repro.resources import find_config

    p = find_config(path)  # a path, or a preset ('tiny', 'configs/train/tiny_stage_0.yaml') from any folder
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (official schema) and apply overrides. `path=None` gives the defaults.

    Keys the file leaves out take upstream's missing-key meaning (config_checks.UPSTREAM_WHEN_MISSING).
    Values are checked after the overrides, so `--set transport.path_type=Linear` repairs a file.
    """
    raw = read_config_file(path) if path is not None else {}
    if (why := tokenizer_config_reason(raw)) is not None:
        raise ConfigError(f"{path}: this is a tokenizer config ({why}), not a LightningDiT config: train it with "
                          f"step 9 (python -m steps.step9_train_tokenizer --config {path}), evaluate it with step 10")
    raw = with_upstream_defaults(raw) if path is not None else raw
    try:
        return apply_overrides(_build(Config, raw, ""), overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_to_yaml(cfg: Config, header: str | list[str] | None = None) -> str:
    """YAML in the official schema; `header` lines become leading comments (they survive load_config)."""
    lines = header.splitlines() if isinstance(header, str) else list(header or [])
    comments = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    return comments + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike, header: str | list[str] | None = None) -> Path:
    """Write the resolved config (atomically) so every run records what it ran with."""
    return atomic_write_text(path, config_to_yaml(cfg, header))
