"""A small, learnable stand-in for ImageNet and the VA-VAE, for the training notebook's CPU run.

`make_digits_folder` writes scikit-learn's bundled handwritten digits (offline, 10 classes) as a class
folder of RGB PNGs: real images, so notebook 04 can show that the whole own-data path learns.

`make_demo_images` draws an ImageNet-style class folder (one sub-folder per class, sorted names ->
labels): each class is one shape in one colour on a plain background, placed at a random position,
so a tiny model learns it in a few hundred steps. `make_narrow_vavae` writes a VA-VAE of base width
32 (official layout otherwise: f16, 32 latent channels) with seeded random weights as safetensors,
which step 6 loads like the real file. Neither stands for the real data: they exercise the real
extract -> train -> sample path end to end in seconds.

The tiny preset's weights are kit-local assets (`LOCAL_ASSETS`, `local_asset`): a seeded LightningDiT-T/1,
a VA-VAE of width 32 and their `latents_stats.pt`, written under the runs folder when a config names
them (`ckpt_path: asset:tiny-dit`), so `--config tiny` runs offline and never downloads the XL/1 files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from repro.errors import ReproError
from repro.utils.io import atomic_path, atomic_save_safetensors

_COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 190, 30), (160, 60, 200), (30, 190, 200),
            (240, 120, 20), (120, 120, 120)]
_SHAPES = ["square", "disc", "bar", "cross"]


def make_demo_images(folder: str | os.PathLike, num_classes: int = 4, per_class: int = 16, size: int = 64,
                     seed: int = 0) -> dict:
    """Write `folder/class_XX/img_YYY.png`; returns {'folder', 'num_images', 'classes'}."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    classes = []
    for c in range(num_classes):
        name = f"class_{c:02d}"
        classes.append(name)
        colour, shape = _COLOURS[c % len(_COLOURS)], _SHAPES[(c // len(_COLOURS) + c) % len(_SHAPES)]
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (245, 245, 240))
            draw = ImageDraw.Draw(img)
            r = size // 4
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape == "square":
                draw.rectangle(box, fill=colour)
            elif shape == "disc":
                draw.ellipse(box, fill=colour)
            elif shape == "bar":
                draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=colour)
            else:
                draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
                draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
            with atomic_path(folder / name / f"img_{i:03d}.png", suffix=".png") as tmp:
                img.save(tmp, format="PNG")
    return {"folder": str(folder), "num_images": num_classes * per_class, "classes": classes}


def make_digits_folder(folder: str | os.PathLike, size: int = 32, per_class: int = 160,
                       held_out: str | os.PathLike | None = None, held_out_per_class: int = 20) -> dict:
    """scikit-learn's 8x8 digits (0..16) as `folder/digit_C/NNNN.png`, RGB, `size` px (bilinear), white on black.

    The first `per_class` images of each class (in the data set's order) go to `folder`; the next
    `held_out_per_class`, if `held_out` is given, to `held_out` in the same layout (the tokenizer's evaluation set). Already written
    files are kept (a rerun writes nothing). Returns {'folder', 'num_images', 'classes', 'held_out', 'num_held_out'}.
    """
    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ReproError("scikit-learn's digits need scikit-learn: pip install 'repro-latent-kit[own-data]' "
                         "(or scikit-learn), or give your own image folder") from None

    digits = load_digits()
    classes = [f"digit_{c}" for c in range(10)]
    counts = {"train": 0, "held_out": 0}
    for c, name in enumerate(classes):
        idx = np.flatnonzero(digits.target == c)
        if len(idx) < per_class:
            raise ValueError(f"per_class={per_class}: scikit-learn's digits have only {len(idx)} images of digit {c}")
        for k, i in enumerate(idx):
            split = "train" if k < per_class else "held_out"
            if split == "held_out" and (held_out is None or k >= per_class + held_out_per_class):
                break
            path = Path(folder if split == "train" else held_out) / name / f"{i:04d}.png"
            counts[split] += 1
            if path.is_file():
                continue
            pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
            image = Image.fromarray(pixels, mode="L").resize((size, size), resample=Image.BILINEAR).convert("RGB")
            with atomic_path(path, suffix=".png") as tmp:
                image.save(tmp, format="PNG")
    return {"folder": str(folder), "num_images": counts["train"], "classes": classes,
            "held_out": str(held_out) if held_out is not None else None, "num_held_out": counts["held_out"]}


def make_narrow_vavae(path: str | os.PathLike, ch: int = 32, seed: int = 0) -> Path:
    """A VA-VAE f16d32 of base width `ch` with seeded random weights, saved as safetensors."""
    from repro.tokenizer.vavae import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(ch=ch)
    return atomic_save_safetensors(vae.state_dict(), path)


# ---------------------------------------------------------------------------------------------------
# Kit-local assets: the tiny preset's weights (configs/tiny.yaml), made here and never downloaded, so
# `--config tiny` runs offline and never fetches the real XL/1 files. Seeded random weights: the images
# they give are coloured noise that differs per label, enough to run every step end to end.

TINY_DIT = dict(name="LightningDiT-T/1", input_size=4, in_channels=32, num_classes=10)  # 64 px / 16, 10 classes
TINY_VAE_CH = 32
# name used after `asset:` / `asset-dir:` in a config -> file written under <runs>/local_assets/<name>/
LOCAL_ASSETS = {"tiny-dit": "lightningdit-t1-tiny.safetensors", "tiny-vavae": "vavae-f16d32-ch32-tiny.safetensors",
                "tiny-latents-stats": "latents_stats.pt"}


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    """LightningDiT-T/1 as configs/tiny.yaml builds it, with seeded non-zero weights (upstream's
    initialisation zeroes adaLN and the output layer, which would make every image the same)."""
    from repro.models.lightningdit import create_model

    torch.manual_seed(seed)
    model = create_model(TINY_DIT["name"], input_size=TINY_DIT["input_size"], in_channels=TINY_DIT["in_channels"],
                         num_classes=TINY_DIT["num_classes"], use_swiglu=True, use_rope=True, use_rmsnorm=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue  # fixed sin-cos table, as in real checkpoints
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if "adaLN_modulation" in name or "y_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # labels and time must matter
    return model.eval()


def tiny_vavae(seed: int = 0) -> torch.nn.Module:
    """The VA-VAE f16d32 layout at base width 32, seeded."""
    from repro.tokenizer.vavae import AutoencoderKL

    torch.manual_seed(seed + 2)
    return AutoencoderKL(ch=TINY_VAE_CH).eval()


def tiny_latent_stats(seed: int = 0) -> dict[str, torch.Tensor]:
    """`latents_stats.pt` content for 32 channels: {'mean', 'std'}, each (1, 32, 1, 1) float32."""
    g = torch.Generator().manual_seed(seed + 3)
    channels = TINY_DIT["in_channels"]
    return {"mean": (torch.randn(1, channels, 1, 1, generator=g) * 0.1).float(),
            "std": (0.5 + torch.rand(1, channels, 1, 1, generator=g)).float()}


def _local_path(name: str, runs: str | os.PathLike | None = None) -> Path:
    from repro import paths

    return Path(runs if runs is not None else paths.runs_dir()) / "local_assets" / name / LOCAL_ASSETS[name]


def local_asset_exists(name: str, runs: str | os.PathLike | None = None) -> bool:
    return _local_path(name, runs).is_file()


def local_asset(name: str, runs: str | os.PathLike | None = None) -> Path:
    """The file of kit-local asset `name` under `<runs>/local_assets/<name>/`, written (atomically) if missing."""
    from repro.data.stats import write_stats

    path = _local_path(name, runs)
    if path.is_file():
        return path.absolute()
    if name == "tiny-dit":
        atomic_save_safetensors(tiny_dit().state_dict(), path)
    elif name == "tiny-vavae":
        atomic_save_safetensors(tiny_vavae().state_dict(), path)
    else:
        write_stats(path, tiny_latent_stats(), backup=False)
    return path.absolute()
