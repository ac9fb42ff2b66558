"""The per-image sampling plan: what image i is, independent of batches, processes and restarts.

Upstream (hustvl/LightningDiT inference.py) draws noise and labels from one global stream seeded
per process (`global_seed * world + rank`), so its images depend on the number of GPUs and cannot
be resumed exactly. Here:

- image i's noise comes from a CPU `torch.Generator` seeded from a hash of (seed, i), and its
  label from another hash of (seed, i) (uniform over the classes, as upstream's `randint`), or
  from a class-balanced list (exactly N / num_classes per class, shuffled by the seed), or from
  fixed labels (the demo);
- batch k always holds images kB ... kB+B-1 (the last one may be shorter), and process r runs the
  batches k = r (mod world), so a batch's content never depends on who runs it;
- a batch is done when all its PNGs exist (each written to a temp name, then renamed); resuming
  runs only the batches that are not done.

So the same command and batch size give byte-identical images on any number of processes and after
any interruption. Two limits, both measured: another batch size changes the batch composition, which
moves the model output by ~1e-6 (a few pixels by one level); and on CPU the number of torch threads
per process matters too (oneDNN splits convolution reductions by thread count, ~1e-7): torchrun
gives each process 1 thread, so compare it with a single process run under OMP_NUM_THREADS=1.

    labels = plan_labels(50_000, 1000, seed=0, mode="balanced")
    for k in my_batches(num_batches(50_000, 64), rank, world):
        idx = batch_indices(k, 64, 50_000)
        z = batch_noise(seed, idx, (32, 16, 16)); y = labels[idx.start:idx.stop]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from repro.errors import ReproError
from repro.utils.seeding import seed_from

# The official demo (upstream inference.py --demo): one sample for each of these ImageNet classes.
DEMO_LABELS = (975, 3, 207, 387, 388, 88, 979, 279)
LABEL_MODES = ("uniform", "balanced")


def _hash64(tag: str, seed: int, index: int) -> int:
    return seed_from("repro-sample", tag, int(seed), int(index))


def noise_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of image `index`'s noise."""
    return _hash64("noise", seed, index)


def image_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of image `index` (float32, CPU): depends only on (seed, index)."""
    g = torch.Generator(device="cpu").manual_seed(noise_seed(seed, index))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def batch_noise(seed: int, indices: range, shape: Sequence[int]) -> torch.Tensor:
    """(len(indices), *shape) noise, image by image (so a batch of any size holds the same images)."""
    return torch.stack([image_noise(seed, i, shape) for i in indices])


def image_label(seed: int, index: int, num_classes: int) -> int:
    """A uniform random label of image `index` (a 64-bit hash mod num_classes: bias < 1e-15)."""
    return _hash64("label", seed, index) % num_classes


def plan_labels(num_samples: int, num_classes: int, seed: int = 0, mode: str = "uniform",
                labels: Sequence[int] | None = None) -> torch.Tensor:
    """(N,) int64 labels of the whole run.

    mode "uniform": i.i.d. uniform (upstream); "balanced": exactly N / num_classes of each class,
    shuffled by `seed`; fixed `labels` (e.g. the demo's): image i gets labels[i % len(labels)].
    """
    if num_samples < 1:
        raise ReproError(f"--num-samples must be >= 1, got {num_samples}")
    if labels is not None and len(labels) > 0:
        check_labels(labels, num_classes)
        return torch.tensor([int(labels[i % len(labels)]) for i in range(num_samples)], dtype=torch.int64)
    if mode == "uniform":
        return torch.tensor([image_label(seed, i, num_classes) for i in range(num_samples)], dtype=torch.int64)
    if mode == "balanced":
        if num_samples % num_classes:
            lo = num_samples // num_classes * num_classes
            raise ReproError(f"--class-balanced needs --num-samples to be a multiple of data.num_classes "
                             f"({num_classes}); got {num_samples} (use {lo or num_classes} or "
                             f"{lo + num_classes})")
        # Class-balanced sampling (N / num_classes per class), the protocol of recent FID reports.
        base = torch.arange(num_samples, dtype=torch.int64) % num_classes
        g = torch.Generator(device="cpu").manual_seed(_hash64("balanced", seed, num_samples))
        return base[torch.randperm(num_samples, generator=g)]
    raise ReproError(f"unknown label mode '{mode}' (choose one of {', '.join(LABEL_MODES)})")


def check_labels(labels: Sequence[int], num_classes: int) -> None:
    for label in labels:
        if not isinstance(label, int) and not (isinstance(label, torch.Tensor) and label.dim() == 0):
            raise ReproError(f"label {label!r} is not an integer class index")
        if not 0 <= int(label) < num_classes:
            raise ReproError(f"label {int(label)} is outside [0, {num_classes}) (data.num_classes = {num_classes}); "
                             f"pass class indices between 0 and {num_classes - 1}")


def demo_labels(num_classes: int) -> tuple[list[int], str]:
    """The official demo labels; for a model with fewer classes (the tiny profile) taken mod num_classes."""
    if num_classes > max(DEMO_LABELS):
        return list(DEMO_LABELS), "the official demo labels"
    mapped = [label % num_classes for label in DEMO_LABELS]
    return mapped, f"the official demo labels mod {num_classes} (this model has {num_classes} classes)"


def num_batches(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def batch_indices(k: int, batch_size: int, num_samples: int) -> range:
    """Images of batch k: kB ... min(kB + B, N) - 1."""
    return range(k * batch_size, min((k + 1) * batch_size, num_samples))


def my_batches(total_batches: int, rank: int, world: int) -> list[int]:
    """Batches of process `rank`: k = rank (mod world)."""
    return list(range(rank, total_batches, world))


def image_path(images_dir: str | os.PathLike, index: int) -> Path:
    return Path(images_dir) / f"{index:06d}.png"  # upstream's name: {index:06d}.png


def existing_indices(images_dir: str | os.PathLike) -> set[int]:
    """Indices of complete PNGs (temp files start with '.', so they never count)."""
    folder = Path(images_dir)
    if not folder.is_dir():
        return set()
    out = set()
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext == ".png" and stem.isdigit():
            out.add(int(stem))
    return out


def pending_batches(batches: Sequence[int], batch_size: int, num_samples: int, done: set[int]) -> list[int]:
    """The batches of `batches` with at least one PNG missing (resume = run only these)."""
    return [k for k in batches if not all(i in done for i in batch_indices(k, batch_size, num_samples))]
