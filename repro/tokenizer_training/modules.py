"""The tokenizer's modules, what step 9 trains and trains with: the autoencoder (fresh or fine-tuned) and the
loss with its LPIPS, PatchGAN and VF network.

- `asset:NAME` values (model.init_from, loss.lpips_*, loss.vf_weights) are files of step 2's asset table
  (`runs/assets.json`); `runs:REL` is a path under the runs folder (both through
  `repro.paths.resolve_file_value`). `model.init_from: asset:vavae-f16d32` fetches the official tokenizer
  when the table lacks it (as step 4 fetches what sampling needs).
- LPIPS weights absent: one note, and training goes on without LPIPS (`repro.tokenizer.lpips.build_lpips`).
- `loss.vf: dinov2`: DINOv2 ViT-L/14 through timm (upstream's own loader; `pip install timm`) with the
  weights of `loss.vf_weights`, frozen; tests hand a small frozen network to `train_tokenizer` instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from repro import paths
from repro.errors import CheckpointError, ConfigError
from repro.tokenizer.discriminator import NLayerDiscriminator
from repro.tokenizer.loader import OFFICIAL_ARCH, build_tokenizer, check_arch, load_tokenizer, read_tokenizer_header
from repro.tokenizer.losses import TokenizerLoss, TokenizerLossConfig
from repro.tokenizer.lpips import LPIPS_HEADS_MD5, build_lpips
from repro.tokenizer.vf_loss import FrozenFeatureNet, TokenGridFeatures, VFLoss
from repro.tokenizer_training.config import TokenizerConfig

DINOV2_TIMM_NAME = "vit_large_patch14_dinov2.lvd142m"  # upstream foundation_models.py (timm hub name)
DINOV2_INPUT = 224  # upstream resizes the images to 224 for DINOv2


def build_autoencoder(cfg: TokenizerConfig, note: Callable[[str], None] = print, initial: bool = True) -> torch.nn.Module:
    """The AutoencoderKL of `model.*`, seeded by train.seed, or loaded from `model.init_from` (strict; only
    when `initial`: a resumed run loads its checkpoint instead)."""
    arch = check_arch(cfg.arch(), where="tokenizer config section 'model'")
    torch.manual_seed(cfg.train.seed)
    vae = build_tokenizer(arch)
    source = cfg.model.init_from
    if not source or not initial:
        return vae
    path = paths.resolve_file_value(source, "model.init_from")
    if path is None and (name := paths.asset_name(source)) is not None:  # an asset not on disk yet: step 2's fetch
        from repro.hub import fetch_assets

        print(f"model.init_from: {source} is not on disk yet: fetching it (step 2)", flush=True)
        path = Path(fetch_assets([name])[0].path)
        path = path if path.is_file() else None
    if path is None or not path.is_file():
        raise CheckpointError(f"model.init_from {source}: file not found ({path}); fix the path, or run "
                              f"`python -m steps.step2_download --only NAME` for an asset")
    # a tokenizer of step 9: its own architecture must be this config's
    if (header := read_tokenizer_header(path)) is not None:
        if check_arch(header.get("arch") or {}, where=f"{path} header") != arch:
            raise ConfigError(f"model.init_from {path} has architecture {header['arch']}, the config's model section "
                              f"says {arch}: make them equal (the file's header has the values)")
        loaded, _ = load_tokenizer(path)
    else:  # the official VA-VAE file (training-only tensors dropped and counted)
        if arch != OFFICIAL_ARCH:
            diff = {k: arch[k] for k in arch if arch[k] != OFFICIAL_ARCH[k]}
            raise ConfigError(f"model.init_from {path} is the official VA-VAE f16d32 layout, but the config's model "
                              f"section differs ({diff}): use the official values {OFFICIAL_ARCH}")
        from repro.tokenizer.vavae import load_vavae

        loaded = load_vavae(path, ch=arch["ch"])
    vae.load_state_dict(loaded.state_dict(), strict=True)
    note(f"autoencoder initialised from {path} (model.init_from)")
    return vae


def build_loss(cfg: TokenizerConfig, device: torch.device, feature_net: Optional[torch.nn.Module] = None,
               note: Callable[[str], None] = print) -> tuple[TokenizerLoss, Optional[torch.nn.Module], Optional[int]]:
    """(the loss with its optional LPIPS / PatchGAN / VF parts, the frozen feature network, its input size)."""
    lo = cfg.loss
    lpips = None
    if lo.perceptual_weight > 0:
        trunk = paths.resolve_file_value(lo.lpips_trunk, "loss.lpips_trunk")
        heads = paths.resolve_file_value(lo.lpips_heads, "loss.lpips_heads")
        if trunk is None or heads is None:
            note(f"note: LPIPS weights absent (loss.lpips_trunk {lo.lpips_trunk}, loss.lpips_heads {lo.lpips_heads}): "
                 "training goes on without LPIPS; `python -m steps.step2_download --only lpips-vgg16 "
                 "lpips-vgg-heads` fetches them")
        else:
            lpips = build_lpips(trunk, heads, device=device, heads_md5=LPIPS_HEADS_MD5)
    discriminator = None
    if lo.disc_start is not None:
        torch.manual_seed(cfg.train.seed + 1)
        discriminator = NLayerDiscriminator(n_layers=lo.disc_num_layers).to(device)
    vf, input_size = None, None
    if lo.vf is not None or feature_net is not None:
        if feature_net is None:
            feature_net = dinov2_features(paths.resolve_file_value(lo.vf_weights, "loss.vf_weights"), lo.vf_weights)
            input_size = DINOV2_INPUT
        feature_net = FrozenFeatureNet(feature_net).to(device) if not isinstance(feature_net, FrozenFeatureNet) \
            else feature_net.to(device)
        with torch.no_grad():
            probe = feature_net(torch.zeros(1, 3, input_size or cfg.data.image_size, input_size or cfg.data.image_size,
                                            device=device))
        if probe.ndim != 4:
            raise ConfigError(f"the VF feature network returns shape {tuple(probe.shape)}, not (N, D, h, w) maps")
        torch.manual_seed(cfg.train.seed + 2)
        vf = VFLoss(cfg.model.embed_dim, int(probe.shape[1]), cos_margin=lo.cos_margin,
                    distmat_margin=lo.distmat_margin).to(device)
    # every TokenizerLossConfig field is the section's key of that name; disc_start 0 without a PatchGAN
    same = {f.name: getattr(lo, f.name) for f in dataclasses.fields(TokenizerLossConfig)}
    loss_cfg = TokenizerLossConfig(**{**same, "disc_start": lo.disc_start if lo.disc_start is not None else 0})
    return TokenizerLoss(loss_cfg, lpips=lpips, discriminator=discriminator, vf=vf), feature_net, input_size


def dinov2_features(path: Optional[Path], value: Optional[str]) -> torch.nn.Module:
    """DINOv2 ViT-L/14 (timm) with the weights file `path`, as a (N, 1024, 16, 16) feature map at 224 px."""
    if path is None or not path.is_file():
        raise ConfigError(f"loss.vf is dinov2 but loss.vf_weights {value} is not on disk: run "
                          "`python -m steps.step2_download --only dinov2-vitl14`, or set loss.vf: null")
    try:
        import timm
    except ImportError:
        raise ConfigError("loss.vf: dinov2 builds DINOv2 with timm, as upstream does: pip install timm") from None
    from repro.models.checkpoint import read_state_dict

    net = timm.create_model(DINOV2_TIMM_NAME, pretrained=False, dynamic_img_size=True)
    state = read_state_dict(path)
    if set(state) != (expected := set(net.state_dict())):
        raise CheckpointError(f"{path} is not timm's {DINOV2_TIMM_NAME} weights (missing "
                              f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    net.load_state_dict(state, strict=True)
    return TokenGridFeatures(net.forward_features, prefix_tokens=int(getattr(net, "num_prefix_tokens", 1)))
