"""Sample grids from the EMA model: periodic ones during training, and the notebook's final grid.

The same noise and labels every time (seeded), so grids of successive steps are comparable. Latents
are sampled with `repro.transport.sample_ode` and the `sample` section's settings, de-normalised as
upstream inference.py does (`x / latent_multiplier * std + mean`) and decoded with the VA-VAE of
`vae.ckpt_path`. Without a VA-VAE, the grid shows latent channels 0-2 as RGB instead (said once).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from repro.training.plan import autocast
from repro.transport import sample_ode


def grid_inputs(n: int, channels: int, latent_size: int, num_classes: int, seed: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise (n, C, h, w) and labels spread over the classes (0, K/n, 2K/n, ...)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, channels, latent_size, latent_size, generator=g)
    y = (torch.arange(n) * max(1, num_classes // n)) % num_classes
    return z.to(device), y.to(device)


@torch.no_grad()
def sample_latents(model, z: torch.Tensor, y: torch.Tensor, sample_cfg, precision: str = "fp32") -> torch.Tensor:
    """Run the `sample` section's ODE sampler on `model` (eval mode); normalised latents, float32."""
    with autocast(z.device, precision):
        out = sample_ode(model, z, y, method=sample_cfg.sampling_method, num_steps=sample_cfg.num_sampling_steps,
                         timestep_shift=sample_cfg.timestep_shift, cfg_scale=sample_cfg.cfg_scale,
                         cfg_interval_start=sample_cfg.cfg_interval_start, cfg_channels=sample_cfg.cfg_channels,
                         atol=sample_cfg.atol, rtol=sample_cfg.rtol)
    return out.float()


def denormalise(latents: torch.Tensor, stats: Optional[tuple[torch.Tensor, torch.Tensor]],
                multiplier: float) -> torch.Tensor:
    """Undo the dataset's `(x - mean) / std * multiplier` (upstream inference.py's order)."""
    x = latents / multiplier
    if stats is not None:
        mean, std = (s.to(x.device, x.dtype) for s in stats)
        x = x * std + mean
    return x


def latent_visualisation(latents: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """(N, C, h, w) normalised latents -> (N, H, W, 3) uint8: channels 0-2 as RGB on a fixed
    [-2.5, 2.5] scale (comparable across steps), enlarged to at least `min_side` pixels."""
    x = latents[:, :3].float()
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    img = ((x + 2.5) / 5.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    factor = max(1, math.ceil(min_side / img.shape[-1]))
    img = img.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return img.permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """VA-VAE decode of de-normalised latents -> (N, H, W, 3) uint8 (the kit's ADM conversion)."""
    from repro.tokenizer.images import to_uint8

    device = next(vae.parameters()).device
    return to_uint8(vae.decode(latents.to(device, torch.float32)).float()).cpu()


def save_grid(images: torch.Tensor, path: str | os.PathLike) -> Path:
    """(N, H, W, 3) uint8 -> one PNG grid, about square (repro.sampling.grid, atomic write)."""
    from repro.sampling.grid import grid_shape, save_grid as write_grid

    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    rows, cols = grid_shape(len(arr), cols=math.ceil(math.sqrt(len(arr))))
    return write_grid(arr, path, rows=rows, cols=cols)


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

    def __init__(self, cfg, *, channels: int, latent_size: int, stats, device: torch.device, precision: str,
                 note: Callable[[str], None] = print):
        self.cfg, self.channels, self.latent_size = cfg, channels, latent_size
        self.stats, self.device, self.precision, self.note = stats, device, precision, note
        self._vae = None
        self._said = False

    def _decoder(self):
        if self.cfg.vae.ckpt_path is None:
            if not self._said:
                self.note("note: vae.ckpt_path is not set, so sample grids show latent channels 0-2 as RGB, "
                          "not decoded images (set vae.ckpt_path to the VA-VAE weights to see images)")
                self._said = True
            return None
        if self._vae is None:
            from repro.tokenizer.vavae import load_vavae

            self._vae = load_vavae(self.cfg.vae.ckpt_path, ch=self.cfg.vae.ch, device=self.device)
        return self._vae

    def images(self, model) -> torch.Tensor:
        n = max(1, int(self.cfg.train.sample_num))
        z, y = grid_inputs(n, self.channels, self.latent_size, self.cfg.data.num_classes,
                           seed=self.cfg.sample.seed, device=self.device)
        latents = sample_latents(model, z, y, self.cfg.sample, self.precision)
        vae = self._decoder()
        if vae is None:
            return latent_visualisation(latents)
        return decode_images(vae, denormalise(latents, self.stats, self.cfg.data.latent_multiplier))

    def __call__(self, model, step: int, run_dir: str | os.PathLike) -> Path:
        return save_grid(self.images(model), Path(run_dir) / "samples" / f"{step:07d}.png")


def grid_from_checkpoint(cfg, checkpoint: str | os.PathLike, out_path: str | os.PathLike, n: int = 8,
                         device: Optional[str] = None) -> dict:
    """Sample `n` images from the EMA weights of a training checkpoint and write a grid PNG.

    Runs the kit's sampling engine (`repro.sampling.build_sampler`: strict EMA load, the VA-VAE of
    `vae.ckpt_path`, `latents_stats.pt` of `data.data_path`) with the `sample` section's settings.
    Returns {'grid': path, 'labels': [...], 'images': (n, H, W, 3) uint8}.
    """
    import copy

    from repro.sampling import build_sampler, decode_to_uint8
    from repro.sampling import sample_latents as engine_sample

    cfg = copy.deepcopy(cfg)
    cfg.ckpt_path = str(checkpoint)
    setup = build_sampler(cfg, device=device)
    c, h, _ = setup.latent_shape
    z, y = grid_inputs(n, c, h, setup.num_classes, seed=cfg.sample.seed)
    images = decode_to_uint8(setup, engine_sample(setup, z, y))
    return {"grid": save_grid(torch.from_numpy(images), out_path), "labels": y.tolist(), "images": images}
