"""Colour class folders made offline, for checking the own-data path beyond the digits (benchmarks, demos).

Two kinds, both written as `folder/CLASS/NNNN.png` (RGB) plus a disjoint held-out folder in the same layout:

- `make_photo_patches`: square patches cut at random positions and scales from four photographs that
  installed packages ship (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg, and
  matplotlib's Jacksboro fault elevation model rendered as a shaded relief map), one class per photograph.
  The training patches come from the top 80% of each picture and the held-out ones from the bottom 20%,
  so held-out images are never crops of training pixels.
- `make_textured_shapes`: procedural objects (striped disc, checkered square, dotted triangle, ring) in
  random colours on a random smooth background: the class is the shape and texture, never the colour.

Neither uses scikit-image's data folder (held back by the team for its own checks). Existing files are kept,
so a rerun writes nothing. Each returns {'folder', 'held_out', 'classes', 'num_images', 'num_held_out'}.

    make_photo_patches("runs/photos", size=32, per_class=360, held_out_per_class=40)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from repro.utils.io import atomic_path

PHOTOS = ("china", "flower", "grace_hopper", "relief")
SHAPES = ("striped_disc", "checkered_square", "dotted_triangle", "ring")
TRAIN_SHARE = 0.8  # of each photograph's height: training patches above, held-out patches below


def _photo(name: str) -> np.ndarray:
    """One of PHOTOS as uint8 (H, W, 3)."""
    if name in ("china", "flower"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            from repro.errors import ReproError

            raise ReproError("the photo-patch sets use scikit-learn's sample photos: pip install "
                             "'repro-latent-kit[own-data]'") from None

        return np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.uint8)
    from matplotlib import cbook

    if name == "grace_hopper":
        from PIL import Image

        with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if name == "relief":  # matplotlib's shaded-relief example: elevation through a terrain colour map
        from matplotlib import colormaps
        from matplotlib.colors import LightSource

        dem = cbook.get_sample_data("jacksboro_fault_dem.npz")
        z = np.asarray(dem["elevation"], dtype=np.float64)
        rgb = LightSource(azdeg=315, altdeg=45).shade(z, cmap=colormaps["gist_earth"], blend_mode="overlay",
                                                     vert_exag=0.05)
        return np.round(rgb[..., :3] * 255).astype(np.uint8)
    raise ValueError(f"unknown photograph {name!r}; choose one of {', '.join(PHOTOS)}")


def _write(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def make_photo_patches(folder: str | os.PathLike, held_out: str | os.PathLike, size: int = 32, per_class: int = 360,
                       held_out_per_class: int = 40, scale: tuple[float, float] = (1.0, 3.0), seed: int = 0) -> dict:
    """Patches of side size * U(scale) px (resized to `size`, bicubic) from the four PHOTOS, one class each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = {"train": 0, "held_out": 0}
    for name in PHOTOS:
        photo = _photo(name)
        h, w = photo.shape[:2]
        cut = int(h * TRAIN_SHARE)
        for split, count, (top, bottom) in (("train", per_class, (0, cut)), ("held_out", held_out_per_class, (cut, h))):
            root = Path(folder if split == "train" else held_out)
            for i in range(count):
                side = int(min(size * rng.uniform(*scale), bottom - top, w))
                y, x = int(rng.integers(top, bottom - side + 1)), int(rng.integers(0, w - side + 1))
                path = root / name / f"{i:04d}.png"
                counts[split] += 1
                if path.is_file():
                    continue
                patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
                _write(path, np.asarray(patch))
    return {"folder": str(folder), "held_out": str(held_out), "classes": list(PHOTOS),
            "num_images": counts["train"], "num_held_out": counts["held_out"]}


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """A small 2-D grid bilinearly interpolated to (size, size)."""
    from PIL import Image

    return np.asarray(Image.fromarray(grid.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random colour gradient with low-frequency noise: (size, size, 3) float in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    a, b = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    coarse = rng.normal(0, 0.06, (3, 4, 4))
    noise = np.stack([_upsample(c, size) for c in coarse], axis=-1)
    return np.clip(a * (1 - t[..., None]) + b * t[..., None] + noise, 0, 1)


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(object mask, texture mask) as bool (size, size): where the shape is, and its textured part."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = size * rng.uniform(0.28, 0.4)
    cx, cy = rng.uniform(r, size - r, 2)
    dx, dy = xx - cx, yy - cy
    period = size / rng.uniform(5, 7)
    if kind == "striped_disc":
        angle = rng.uniform(0, np.pi)
        return dx ** 2 + dy ** 2 <= r ** 2, np.sin((np.cos(angle) * dx + np.sin(angle) * dy) * 2 * np.pi / period) > 0
    if kind == "checkered_square":
        half = r * 0.85
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        return inside, ((np.floor(dx / period * 2) + np.floor(dy / period * 2)) % 2) == 0
    if kind == "dotted_triangle":  # apex up: inside the three half-planes
        inside = (dy <= r * 0.7) & (np.abs(dx) <= (dy + r) * 0.6)
        return inside, ((dx % period - period / 2) ** 2 + (dy % period - period / 2) ** 2) <= (period / 4) ** 2
    if kind == "ring":
        d = np.sqrt(dx ** 2 + dy ** 2)
        return (d <= r) & (d >= r * 0.55), np.zeros_like(d, dtype=bool)
    raise ValueError(f"unknown shape {kind!r}; choose one of {', '.join(SHAPES)}")


def textured_shape(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of class `kind`: uint8 (size, size, 3), drawn at 2x and box-downsampled (anti-aliased)."""
    big = 2 * size
    image = _smooth_background(rng, big)
    inside, texture = _shape_mask(kind, rng, big)
    colour, second = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    image[inside] = colour
    image[inside & texture] = second
    image = image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.round(image * 255).astype(np.uint8)


def make_textured_shapes(folder: str | os.PathLike, held_out: str | os.PathLike, size: int = 32, per_class: int = 360,
                         held_out_per_class: int = 40, seed: int = 0) -> dict:
    """The four SHAPES, `per_class` images each in `folder` and `held_out_per_class` in `held_out`."""
    counts = {"train": 0, "held_out": 0}
    for c, kind in enumerate(SHAPES):
        for split, count in (("train", per_class), ("held_out", held_out_per_class)):
            rng = np.random.default_rng([seed, c, split == "train"])
            root = Path(folder if split == "train" else held_out)
            for i in range(count):
                pixels = textured_shape(kind, rng, size)  # drawn even when the file exists: same draws on a rerun
                counts[split] += 1
                path = root / kind / f"{i:04d}.png"
                if not path.is_file():
                    _write(path, pixels)
    return {"folder": str(folder), "held_out": str(held_out), "classes": list(SHAPES),
            "num_images": counts["train"], "num_held_out": counts["held_out"]}


SETS = {"photo_patches": make_photo_patches, "textured_shapes": make_textured_shapes}


def make_sample_set(name: str, root: str | os.PathLike, size: int = 32, per_class: int = 360,
                    held_out_per_class: int = 40) -> dict:
    """`root/train` and `root/held_out` of set `name` (one of SETS)."""
    if name not in SETS:
        raise ValueError(f"unknown sample set {name!r}; choose one of {', '.join(SETS)}")
    root = Path(root)
    return SETS[name](root / "train", root / "held_out", size=size, per_class=per_class,
                      held_out_per_class=held_out_per_class)
