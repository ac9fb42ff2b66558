"""Sample grids: the official demo's 2x4 PNG, and a labelled matplotlib figure for notebooks.

Upstream (hustvl/LightningDiT inference.py --demo) tiles its 8 demo samples row by row into a
2 x 4 grid with no padding and saves `demo_images/demo_samples.png`; `make_grid` does the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from repro.errors import ReproError
from repro.utils.io import atomic_path


def make_grid(images: np.ndarray, rows: int = 2, cols: int = 4) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (rows*H, cols*W, 3); image k goes to row k // cols, column k % cols.

    Fewer than rows*cols images leave black cells; more is an error.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ReproError(f"make_grid expects (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if n > rows * cols:
        raise ReproError(f"{n} images do not fit a {rows}x{cols} grid")
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[k]
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, rows: int = 2, cols: int = 4) -> Path:
    """Tile `images` with `make_grid` and write a PNG atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(make_grid(images, rows, cols)).save(tmp, format="PNG")
    return Path(path)


def load_images(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Stack PNG files into (N, H, W, 3) uint8."""
    from repro.sampling.writer import read_png

    return np.stack([read_png(p) for p in paths])


def grid_shape(n: int, cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return -(-n // cols), cols


def show_samples(images: np.ndarray, labels: Optional[Sequence[int]] = None,
                 class_names: Optional[Sequence[str]] = None, cols: int = 4, max_images: int = 8,
                 title: Optional[str] = None, size: float = 2.2):
    """A matplotlib Figure of the first `max_images` samples, each titled with its class.

    Uses `matplotlib.figure.Figure` (no pyplot state): in a notebook `display(fig)` shows it,
    elsewhere `fig.savefig(path)`.
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)[:max_images]
    if len(images) == 0:
        raise ReproError("show_samples: no images to show")
    rows, cols = grid_shape(len(images), cols)
    fig = Figure(figsize=(size * cols, size * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(images[k], interpolation="nearest")
        if labels is not None:
            label = int(labels[k])
            name = class_names[label] if class_names is not None and label < len(class_names) else None
            ax.set_title(f"{label}: {name}" if name else f"class {label}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_preview(images: np.ndarray, labels: Optional[Sequence[int]], path: str | os.PathLike,
                 title: Optional[str] = None, class_names: Optional[Sequence[str]] = None) -> Path:
    """`show_samples` written to a PNG (atomically): the labelled preview a headless run leaves behind."""
    fig = show_samples(images, labels, class_names=class_names, title=title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)
