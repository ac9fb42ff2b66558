"""A small, learnable stand-in for ImageNet and the VA-VAE, for the training notebook's CPU run.

`make_demo_images` draws an ImageNet-style class folder (one sub-folder per class, sorted names ->
labels): each class is one shape in one colour on a plain background, placed at a random position,
so a tiny model learns it in a few hundred steps. `make_narrow_vavae` writes a VA-VAE of base width
32 (official layout otherwise: f16, 32 latent channels) with seeded random weights as safetensors,
which step 6 loads like the real file. Neither stands for the real data: they exercise the real
extract -> train -> sample path end to end in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

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


def make_narrow_vavae(path: str | os.PathLike, ch: int = 32, seed: int = 0) -> Path:
    """A VA-VAE f16d32 of base width `ch` with seeded random weights, saved as safetensors."""
    from repro.tokenizer.vavae import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(ch=ch)
    return atomic_save_safetensors(vae.state_dict(), path)
