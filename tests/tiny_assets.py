"""The tiny profile's assets (configs/tiny.yaml), written in the official formats under the official names.

The real files (7 GB) cannot be fetched in CI, so the tests serve these through the local fake hub
under the official repo ids and file names; the kit's real download/resolve/load code then runs
unchanged on them:

- `lightningdit-xl-imagenet256-800ep.pt`: torch.save({"ema": state_dict}) of a LightningDiT-T/1
  (32 input channels, 4x4 latents = 64 px / 16, 10 classes), seeded non-zero weights (upstream's
  initialisation zeroes adaLN and the output layer, which would make every image the same);
- `vavae-imagenet256-f16d32-dinov2.pt`: a narrow VA-VAE (AutoencoderKL(ch=32)) in the official
  Lightning layout {"state_dict": {...}} with a few training-only `foundation_model.*`/`loss.*`
  tensors that the loader must drop;
- `latents_stats.pt`: {"mean": (1, 32, 1, 1), "std": (1, 32, 1, 1)} float32.

    files = tiny_asset_files()            # {(repo_id, filename): bytes}
    with FakeHub(files=files) as hub: ... # HF_ENDPOINT=hub.endpoint
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import torch

MODEL_REPO = ("hustvl/lightningdit-xl-imagenet256-800ep", "lightningdit-xl-imagenet256-800ep.pt")
VAE_REPO = ("hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt")
STATS_REPO = ("hustvl/vavae-imagenet256-f16d32-dinov2", "latents_stats.pt")
ASSET_NAMES = {"lightningdit-xl-800ep": MODEL_REPO, "vavae-f16d32": VAE_REPO, "latents-stats": STATS_REPO}

TINY_MODEL = "LightningDiT-T/1"
TINY_CHANNELS = 32
TINY_LATENT = 4  # 64 px / 16
TINY_CLASSES = 10
TINY_VAE_CH = 32


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """LightningDiT-T/1 as configs/tiny.yaml builds it, with seeded non-zero weights."""
    from repro.models.lightningdit import create_model

    torch.manual_seed(seed)
    model = create_model(TINY_MODEL, input_size=TINY_LATENT, in_channels=TINY_CHANNELS, num_classes=TINY_CLASSES,
                         use_swiglu=True, use_rope=True, use_rmsnorm=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue  # fixed sin-cos table, as in real checkpoints
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if "adaLN_modulation" in name or "y_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # labels and time must matter
    return model.eval()


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    from repro.tokenizer.vavae import AutoencoderKL

    torch.manual_seed(seed + 2)
    return AutoencoderKL(ch=TINY_VAE_CH).eval()


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def _files(seed: int) -> tuple[tuple[tuple[str, str], bytes], ...]:
    ema = {k: v.clone() for k, v in tiny_model(seed).state_dict().items()}
    vae_sd = {k: v.clone() for k, v in tiny_vae(seed).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 3)
    # training-only parts of the official VA-VAE file (DINOv2 alignment model, GAN loss)
    vae_sd.update({
        "foundation_model.model.cls_token": torch.randn(1, 1, 8, generator=g),
        "foundation_model.model.blocks.0.norm1.weight": torch.ones(8),
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4, generator=g),
    })
    stats = {"mean": (torch.randn(1, TINY_CHANNELS, 1, 1, generator=g) * 0.1).float(),
             "std": (0.5 + torch.rand(1, TINY_CHANNELS, 1, 1, generator=g)).float()}
    return ((MODEL_REPO, _save({"ema": ema})),
            (VAE_REPO, _save({"state_dict": vae_sd})),
            (STATS_REPO, _save(stats)))


def tiny_asset_files(seed: int = 0) -> dict[tuple[str, str], bytes]:
    """{(repo_id, filename): file bytes} for FakeHub(files=...)."""
    return dict(_files(seed))


def write_tiny_assets(folder: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the three files under `folder` (official file names); returns {asset name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = tiny_asset_files(seed)
    out = {}
    for name, key in ASSET_NAMES.items():
        path = folder / key[1]
        path.write_bytes(files[key])
        out[name] = path
    return out
