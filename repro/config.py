"""Typed config in the official LightningDiT YAML schema, defaults in one place.

Official configs (hustvl/LightningDiT `configs/*.yaml`) load unchanged: every
section is a dataclass whose fields are the upstream keys, plus a few of the
kit's own (marked "kit:"). Unknown keys and wrong types raise a ConfigError that
names the key and the nearest valid one; building, overrides and YAML are
`repro.config_builder`'s, shared with the tokenizer config.

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

import dataclasses
import os
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import yaml

from repro.config_builder import ConfigBuilder
from repro.config_checks import check_supported, tokenizer_config_reason, with_upstream_defaults
from repro.errors import ConfigError


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
    latent_scaling: Literal["channel", "global", "global_means"] = "channel"  # kit (issue 23): channel = latent_norm's per-channel statistics (upstream); global = x * 1/sigma, sigma over every latent element (SD, lightdiff); global_means = sigma over the posterior means
    latent_scale: Optional[float] = None  # kit (issue 23): the global factor 1/sigma; null = from latents_scale.json beside the shards (step 7 records it in the run's config)
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
    siglip_path: Optional[str] = None  # kit: SigLIP2 weights for VFM-VAE encoding when its checkpoint lacks them


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
    process: str = "flow"  # kit: flow (LightningDiT's flow matching) | ddpm (repro.transport.ddpm: ε or v, DDIM/DDPM)
    schedule: str = "linear"  # kit: ddpm noise schedule: linear | scaled_linear | cosine (Nichol & Dhariwal)
    num_timesteps: int = 1000  # kit: ddpm's T
    beta_start: float = 1e-4  # kit: ddpm's first β (linear, scaled_linear; Ho et al. 1e-4)
    beta_end: float = 0.02  # kit: ddpm's last β (linear, scaled_linear; Ho et al. 0.02)


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
    eta: float = 0.0  # kit: DDIM's η with transport.process ddpm (0 deterministic, 1 = DDPM with β̃)
    ddpm_variance: str = "beta_tilde"  # kit: sampling_method ddpm's fixed variance: beta | beta_tilde (Ho et al.)


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
        return ConfigBuilder.to_dict(self)


def _validate(cfg: Config) -> Config:
    """Range checks that types cannot express; each names the key and a valid value."""
    BUILDER.check_at_least(cfg, 1, ("sample.per_proc_batch_size", "sample.num_sampling_steps",
                                    "train.micro_batch_size", "train.global_batch_size", "train.grad_accum_steps",
                                    "vae.downsample_ratio", "data.image_size", "data.num_classes"))
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


# Keys, types, overrides and YAML as for every typed config of the kit (repro.config_builder).
BUILDER = ConfigBuilder(Config, "config", check=_validate, example="sample.cfg_scale=4.0")


def config_from_dict(raw: dict[str, Any], check: bool = True) -> Config:
    """Build a Config from a parsed mapping (keys and types always checked; values unless check=False)."""
    return BUILDER.from_dict(raw, check=check)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply dotted `key=value` overrides (`sample.cfg_scale=4.0`) in place; returns cfg.

    All or nothing: the overrides go to a copy first, so a bad one leaves `cfg` untouched.
    """
    return BUILDER.apply_overrides(cfg, overrides)


def flatten(cfg: Config, prefix: str = "") -> dict[str, Any]:
    """{'sample.cfg_scale': 6.7, 'ckpt_path': ..., ...}: dotted keys in schema order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        out.update(flatten(value, key + ".") if dataclasses.is_dataclass(value) else {key: value})
    return out


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set the dotted key `dotted` ('sample.cfg_scale') of `cfg` to `value`, in place."""
    *sections, leaf = dotted.split(".")
    setattr(reduce(getattr, sections, cfg), leaf, value)


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


class LoadedConfig(NamedTuple):
    """One config file, parsed once and built once (step 3 reports what the file and the overrides change)."""

    raw: dict[str, Any]  # the file's mapping as written ({} for the defaults)
    as_written: Config  # the file, missing keys taking upstream's meaning; values not checked
    config: Config  # as_written plus the overrides, checked


def load_config_file(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> LoadedConfig:
    """Read a YAML config (official schema) and apply overrides: the file, the config as written and the result.

    Keys the file leaves out take upstream's missing-key meaning (config_checks.UPSTREAM_WHEN_MISSING).
    Values are checked after the overrides, so `--set transport.path_type=Linear` repairs a file.
    """
    raw = read_config_file(path) if path is not None else {}
    if (why := tokenizer_config_reason(raw)) is not None:
        raise ConfigError(f"{path}: this is a tokenizer config ({why}), not a LightningDiT config: train it with "
                          f"step 9 (python -m steps.step9_train_tokenizer --config {path}), evaluate it with step 10")
    try:
        as_written = BUILDER.from_dict(with_upstream_defaults(raw) if path is not None else raw, check=False)
        return LoadedConfig(raw, as_written, BUILDER.with_overrides(as_written, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (official schema) and apply overrides. `path=None` gives the defaults."""
    return load_config_file(path, overrides).config


def config_to_yaml(cfg: Config, header: str | list[str] | None = None) -> str:
    """YAML in the official schema; `header` lines become leading comments (they survive load_config)."""
    return BUILDER.to_yaml(cfg, header)


def save_config(cfg: Config, path: str | os.PathLike, header: str | list[str] | None = None) -> Path:
    """Write the resolved config (atomically) so every run records what it ran with."""
    return BUILDER.save(cfg, path, header)
