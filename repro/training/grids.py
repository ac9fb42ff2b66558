"""Sample grids from the EMA model: periodic ones during training, and the notebook's final grid.

The same noise and labels every time (seeded), so grids of successive steps are comparable. Both
run the sampling engine (`repro.sampling.engine`) with the config's `sample` section: the periodic
grid around the EMA weights in memory (`sampler_from_parts`), the final one from a checkpoint file
(`build_sampler`). Without a VA-VAE (`vae.ckpt_path` unset) the periodic grid shows latent channels
0-2 as RGB instead of decoded images (said once).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from repro.sampling.engine import build_sampler, decode_to_uint8, sample_latents, sampler_from_parts
from repro.sampling.grid import grid_shape, save_grid


def grid_latents(setup, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) of `n` samples: fixed noise (n, C, h, w) of the sampler's latent shape and labels
    spread over its K classes (0, K/n, 2K/n, ...), sampled with the config's sampler."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *setup.latent_shape, generator=g)
    y = (torch.arange(n) * max(1, setup.num_classes // n)) % setup.num_classes
    return sample_latents(setup, z, y), y


def latent_visualisation(latents: torch.Tensor, min_side: int = 64) -> np.ndarray:
    """(N, C, h, w) normalised latents -> (N, H, W, 3) uint8: channels 0-2 as RGB on a fixed
    [-2.5, 2.5] scale (comparable across steps), enlarged to at least `min_side` pixels."""
    x = latents[:, :3].float()
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    img = ((x + 2.5) / 5.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    factor = max(1, math.ceil(min_side / img.shape[-1]))
    img = img.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def write_square_grid(images: np.ndarray, path: str | os.PathLike) -> Path:
    """(N, H, W, 3) uint8 -> one PNG grid, about square (atomic write)."""
    return save_grid(images, path, *grid_shape(len(images), cols=math.ceil(math.sqrt(len(images)))))


@contextlib.contextmanager
def weights_swapped_in(model: torch.nn.Module, params: list[torch.Tensor]):
    """Temporarily give `model` the values of `params` (e.g. a CPU-held EMA) in eval mode."""
    own = list(model.parameters())
    stash = [p.detach().to("cpu", copy=True) for p in own]
    was_training = model.training
    with torch.no_grad():
        for p, q in zip(own, params):
            p.copy_(q, non_blocking=True)
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, s in zip(own, stash):
                p.copy_(s)
        model.train(was_training)


class GridSampler:
    """Writes `samples/{step:07d}.png` under the run folder from the EMA model."""

    def __init__(self, cfg, *, stats, device: torch.device, precision: str, note: Callable[[str], None] = print):
        self.cfg, self.stats, self.device, self.precision, self.note = cfg, stats, device, precision, note

    @cached_property
    def decoder(self):
        """The VA-VAE decoder, loaded on first use; None without vae.ckpt_path (said once)."""
        if self.cfg.vae.ckpt_path is None:
            self.note("note: vae.ckpt_path is not set, so sample grids show latent channels 0-2 as RGB, "
                      "not decoded images (set vae.ckpt_path to the VA-VAE weights to see images)")
            return None
        from repro.tokenizer.loader import load_vae

        return load_vae(self.cfg.vae, device=self.device, encoder=False)  # decodes only (kit: issue 13)

    def __call__(self, model, step: int, run_dir: str | os.PathLike) -> Path:
        setup = sampler_from_parts(self.cfg, model, device=self.device, precision=self.precision, vae=self.decoder,
                                   stats=self.stats)
        latents, _ = grid_latents(setup, max(1, int(self.cfg.train.sample_num)), self.cfg.sample.seed)
        images = latent_visualisation(latents) if self.decoder is None else decode_to_uint8(setup, latents)
        return write_square_grid(images, Path(run_dir) / "samples" / f"{step:07d}.png")


def grid_from_checkpoint(cfg, checkpoint: str | os.PathLike, out_path: str | os.PathLike, n: int = 8,
                         device: Optional[str] = None) -> dict:
    """Sample `n` images from the EMA weights of a training checkpoint and write a grid PNG.

    Runs the sampling engine (`build_sampler`: strict EMA load, the VA-VAE of `vae.ckpt_path`,
    `latents_stats.pt` of `data.data_path`) with the `sample` section's settings.
    Returns {'grid': path, 'labels': [...], 'images': (n, H, W, 3) uint8}.
    """
    cfg = copy.deepcopy(cfg)
    cfg.ckpt_path = str(checkpoint)
    setup = build_sampler(cfg, device=device)
    latents, y = grid_latents(setup, n, cfg.sample.seed)
    images = decode_to_uint8(setup, latents)
    return {"grid": write_square_grid(images, out_path), "labels": y.tolist(), "images": images}
