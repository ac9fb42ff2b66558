"""Tokenizer training configs (step 9): the kit's schema, defaults in one place, upstream's YAMLs loaded too.

A kit tokenizer config has four sections (every key below; unknown keys and wrong types are errors
naming the key; built, overridden and saved by repro.config_builder, as repro/config.py):

    model: {ch: 32, ch_mult: [1, 1, 2], num_res_blocks: 1, attn_resolutions: [], z_channels: 4, embed_dim: 4,
            resolution: 32, norm_groups: 32, init_from: null}
    loss:  {rec_loss: l1, kl_weight: 1.0e-6, perceptual_weight: 1.0, disc_start: 5001, vf: null, ...}
    data:  {image_folder: my_images, image_size: 32, crop: random, random_flip: false, valid_folder: null}
    train: {output_dir: runs:tokenizer, exp_name: digits, max_steps: 300, global_batch_size: 32, lr: 1.0e-3, ...}

Upstream's LDM-style VA-VAE configs (hustvl/LightningDiT `vavae/configs/*.yaml`, `tokenizer/configs/*.yaml`)
load unchanged: `load_tokenizer_config` recognises them and translates them key by key
(`repro.tokenizer_training.upstream`), refusing values the kit does not implement. The defaults here
are upstream's f16d32_vfdinov2.yaml where upstream has a value (ch 128, f16, 32 channels, Adam lr 1e-4
betas (0.5, 0.9), kl 1e-6, disc_start 5001, disc_weight 0.5, VF weight 0.1 adaptive, margins 0.5/0.25);
`docs/config_keys.md` (tokenizer section) lists each key with its upstream meaning.

Fine-tuning the official tokenizer on your images is one line: `model.init_from: asset:vavae-f16d32`
(the architecture must then be the official one, which the defaults are).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from repro.config import read_config_file
from repro.config_builder import ConfigBuilder
from repro.errors import ConfigError


@dataclass
class TokenizerModelConfig:
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # f = 2^(len - 1): [1,2,2] f4, 4 levels f8
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sides (at `resolution`) with attention
    z_channels: int = 32
    embed_dim: int = 32  # latent channels (what the DiT's model.in_chans must be)
    resolution: int = 256
    norm_groups: int = 32  # kit: GroupNorm groups (upstream 32); widths below 32 need fewer
    init_from: Optional[str] = None  # kit: start from these weights: asset:vavae-f16d32 or a tokenizer of step 9


@dataclass
class TokenizerLossSection:
    rec_loss: Literal["l1", "mse"] = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0  # LPIPS weight; 0 = off
    lpips_trunk: Optional[str] = "asset:lpips-vgg16"  # torchvision vgg16-397923af.pth; absent: a note, no LPIPS
    lpips_heads: Optional[str] = "asset:lpips-vgg-heads"  # LPIPS v0.1 vgg.pth
    disc_start: Optional[int] = 5001  # PatchGAN from this step on; null = no discriminator
    disc_weight: float = 0.5  # scale of the adaptive GAN weight
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_num_layers: int = 3
    vf: Optional[Literal["dinov2"]] = None  # VA-VAE's vision-foundation alignment (upstream use_vf)
    vf_weights: Optional[str] = "asset:dinov2-vitl14"  # DINOv2 ViT-L/14 weights (timm safetensors)
    vf_weight: float = 0.1
    adaptive_vf: bool = True
    cos_margin: float = 0.5
    distmat_margin: float = 0.25


@dataclass
class TokenizerDataConfig:
    image_folder: Optional[str] = None  # one sub-folder per class (or labels.txt / tar shards, as step 6)
    image_size: int = 256
    crop: Literal["random", "center"] = "random"  # after resizing the short side (upstream: random for training)
    random_flip: bool = False  # kit: horizontal flips (upstream's ImageNet loader does not flip)
    valid_folder: Optional[str] = None  # held-out images for step 10 (upstream: the validation split)
    num_workers: int = 0  # 0 reads in the training thread; > 0 reads ahead in one thread


@dataclass
class TokenizerTrainConfig:
    output_dir: str = "output"
    exp_name: str = "vavae"
    max_steps: Optional[int] = None  # one of max_steps / max_epochs
    max_epochs: Optional[int] = None  # upstream lightning.trainer.max_epochs (f16d32: 50)
    global_batch_size: int = 256  # upstream: 8 per GPU x 8 GPUs x 4 nodes
    micro_batch_size: Optional[int] = None  # per process per forward; None = global / processes
    lr: float = 1e-4  # upstream model.base_learning_rate (not scaled by the batch)
    beta1: float = 0.5
    beta2: float = 0.9
    warmup_steps: int = 0  # kit: linear warm-up (upstream: none)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # kit: cosine decays to 0 at the last step
    max_grad_norm: Optional[float] = None  # kit: gradient clipping of the autoencoder
    ema_decay: Optional[float] = None  # kit: EMA of the autoencoder (exported instead of the weights); null = none
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # upstream lightning precision 32
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 2
    time_budget: Optional[float] = None  # seconds: save and stop before this
    resume: bool = True
    # the one training engine's keys, meaning what they mean for step 7 (repro.training.engine)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # kit: fsdp = FSDP2, encoder/decoder/discriminator sharded
    fsdp_offload: bool = False  # kit: with fsdp, keep parameter/gradient/optimizer shards in host memory
    compile: Optional[bool] = None  # kit: torch.compile encode+decode; null = on CUDA (eager on failure)
    async_save: bool = True  # kit: write checkpoints on a background thread from a host copy
    deterministic: bool = False  # kit: torch.use_deterministic_algorithms for bitwise-repeatable runs
    ema_on_cpu: bool = False  # kit: keep the autoencoder's EMA in host memory
    tensorboard: bool = False  # kit: also log to TensorBoard (run folder/tensorboard)
    wandb: bool = False  # kit: also log to Weights & Biases, project train.wandb_project
    wandb_project: Optional[str] = "repro-tokenizer"  # kit: the W&B project when train.wandb


@dataclass
class TokenizerConfig:
    ckpt_path: Optional[str] = None  # upstream: the tokenizer to test; kit: step 10's default tokenizer file
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    loss: TokenizerLossSection = field(default_factory=TokenizerLossSection)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return ConfigBuilder.to_dict(self)

    def arch(self) -> dict[str, Any]:
        """The AutoencoderKL architecture (repro.tokenizer.loader.ARCH_FIELDS)."""
        from repro.tokenizer.loader import ARCH_FIELDS

        return {k: copy.deepcopy(getattr(self.model, k)) for k in ARCH_FIELDS}


def check_tokenizer_config(cfg: TokenizerConfig) -> TokenizerConfig:
    """Range and consistency checks that types cannot express; each error names the key."""
    from repro.tokenizer.loader import check_arch, downsample_ratio

    check_arch(cfg.arch(), where="tokenizer config section 'model'")
    t, d = cfg.train, cfg.data
    BUILDER.check_at_least(cfg, 1, ("train.global_batch_size", "data.image_size", "train.log_every",
                                    "train.ckpt_every", "loss.disc_num_layers"))
    BUILDER.check_at_least(cfg, 1, ("train.max_steps", "train.max_epochs", "train.micro_batch_size"), " or null")
    if t.max_steps is not None and t.max_epochs is not None:
        raise ConfigError(f"tokenizer config keys 'train.max_steps' ({t.max_steps}) and 'train.max_epochs' "
                          f"({t.max_epochs}) are both set: keep one (--set train.max_epochs=null)")
    ratio = downsample_ratio(cfg.arch())
    if d.image_size % ratio:
        raise ConfigError(f"tokenizer config key 'data.image_size' ({d.image_size}) must be a multiple of the "
                          f"downsampling factor {ratio} (2^(len(model.ch_mult) - 1))")
    BUILDER.check_at_least(cfg, 0, ("loss.kl_weight", "loss.perceptual_weight", "loss.disc_weight",
                                    "loss.vf_weight", "train.lr", "train.warmup_steps"))
    BUILDER.check_at_least(cfg, 0, ("loss.disc_start",), " or null (no GAN)")
    if t.ema_decay is not None and not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"tokenizer config key 'train.ema_decay' must be in [0, 1) or null, got {t.ema_decay}")
    return cfg


# Keys, types, overrides and YAML as for every typed config of the kit (repro.config_builder).
BUILDER = ConfigBuilder(TokenizerConfig, "tokenizer config", check=check_tokenizer_config,
                        example="train.max_steps=300")


def load_tokenizer_config(path: str | os.PathLike | None = None, overrides: Optional[list[str]] = None,
                          notes: Optional[list[str]] = None) -> TokenizerConfig:
    """A kit tokenizer YAML, or upstream's LDM-style VA-VAE YAML (translated), plus `--set` overrides.

    `notes` (a list) receives one line per translated upstream key whose meaning the kit adapts.
    """
    from repro.resources import find_config
    from repro.tokenizer_training.upstream import HOLES, is_upstream_config, translate_upstream

    raw: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)  # a path, or a preset such as tokenizer/digits_f4
        raw = read_config_file(path)
        if is_upstream_config(raw):
            raw = translate_upstream(raw, source=str(path), notes=notes)
    holes = raw.pop(HOLES, {})  # upstream keys the file leaves empty: a --set must fill each
    given = {item.split("=", 1)[0].strip() for item in overrides or []}
    for kit_key, upstream_key in holes.items():
        if kit_key not in given:
            raise ConfigError(f"{path}: upstream config key '{upstream_key}' is empty (the file's comment may give one "
                              f"value per training stage): write it in, or pass --set {kit_key}=VALUE")
        # the --set fills it on the typed config; its empty value must not reach the type check first
        section, key = kit_key.split(".", 1)
        raw.get(section, {}).pop(key, None)
    try:
        # types are checked as the file is read, values once the overrides are in (--set may repair one)
        return BUILDER.with_overrides(BUILDER.from_dict(raw, check=False), overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_tokenizer_config(cfg: TokenizerConfig, path: str | os.PathLike, header: str | list[str] | None = None) -> Path:
    return BUILDER.save(cfg, path, header)
