"""The tiny profile's weights served under the official names, for the tests of the real download path.

`configs/tiny.yaml` itself uses kit-local assets (`asset:tiny-dit`, ...: seeded stand-ins the kit writes,
never downloaded; repro.data.synthetic). The download tests need files that the real step 2 fetches, so
the local fake hub serves the same stand-ins, in the official formats, under the official repo ids and
file names, and `hub_tiny_config` writes the tiny preset with the official asset names; the kit's real
download/resolve/load code then runs unchanged on them:

- `lightningdit-xl-imagenet256-800ep.pt`: torch.save({"ema": state_dict}) of the tiny LightningDiT-T/1
  (32 input channels, 4x4 latents = 64 px / 16, 10 classes, seeded non-zero weights);
- `vavae-imagenet256-f16d32-dinov2.pt`: the narrow VA-VAE (AutoencoderKL(ch=32)) in the official
  Lightning layout {"state_dict": {...}} with a few training-only `foundation_model.*`/`loss.*`
  tensors that the loader must drop;
- `latents_stats.pt`: {"mean": (1, 32, 1, 1), "std": (1, 32, 1, 1)} float32.

    files = tiny_asset_files()            # {(repo_id, filename): bytes}
    with FakeHub(files=files) as hub: ... # HF_ENDPOINT=hub.endpoint
    step3_configs.main(base=str(hub_tiny_config(tmp_path)))
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import torch
import yaml

from repro.data import synthetic
from repro.resources import find_config

MODEL_REPO = ("hustvl/lightningdit-xl-imagenet256-800ep", "lightningdit-xl-imagenet256-800ep.pt")
VAE_REPO = ("hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt")
STATS_REPO = ("hustvl/vavae-imagenet256-f16d32-dinov2", "latents_stats.pt")
ASSET_NAMES = {"lightningdit-xl-800ep": MODEL_REPO, "vavae-f16d32": VAE_REPO, "latents-stats": STATS_REPO}
# configs/tiny.yaml's kit-local markers -> the official ones (what the fake hub serves)
HUB_MARKERS = {"ckpt_path": "asset:lightningdit-xl-800ep", "vae.ckpt_path": "asset:vavae-f16d32",
               "data.data_path": "asset-dir:latents-stats"}

TINY_MODEL = synthetic.TINY_DIT["name"]
TINY_CHANNELS = synthetic.TINY_DIT["in_channels"]
TINY_LATENT = synthetic.TINY_DIT["input_size"]  # 64 px / 16
TINY_CLASSES = synthetic.TINY_DIT["num_classes"]
TINY_VAE_CH = synthetic.TINY_VAE_CH


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """LightningDiT-T/1 as configs/tiny.yaml builds it, with seeded non-zero weights."""
    return synthetic.tiny_dit(seed)


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    return synthetic.tiny_vavae(seed)


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
    stats = synthetic.tiny_latent_stats(seed)
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


def hub_tiny_config(folder: str | os.PathLike) -> Path:
    """`folder/tiny_hub.yaml`: configs/tiny.yaml naming the official assets (served by the fake hub)."""
    raw = yaml.safe_load(find_config("tiny").read_text())
    for key, marker in HUB_MARKERS.items():
        section = raw
        *parents, leaf = key.split(".")
        for name in parents:
            section = section[name]
        section[leaf] = marker
    path = Path(folder) / "tiny_hub.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Reproduces: no number. configs/tiny.yaml with the official asset names (tests/tiny_assets.py)\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return path
