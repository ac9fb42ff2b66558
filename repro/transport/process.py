"""The config's process (`transport.process`: flow | ddpm) as the two things training and sampling need from it.

    loss = loss_function(cfg.transport)          # loss(model, x1, y, *, t, x0) -> {'loss', 'mse', 'cos', 't'}
    x = sample(model, z, y, cfg.transport, cfg.sample, null_class=K)   # flow's ODE or DDIM/DDPM

Flow matching is hustvl/LightningDiT's (repro.transport.path, .ode); DDPM is repro.transport.ddpm. Both read the
trainer's per-sample draws: t in [0, 1] (DDPM: k = floor(t T)) and the noise x0.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch

from repro.transport.ddpm import DiffusionSchedule, ddpm_losses, sample_ddpm
from repro.transport.ode import sample_ode
from repro.transport.path import training_losses


def is_ddpm(transport_cfg) -> bool:
    return getattr(transport_cfg, "process", "flow") == "ddpm"


def loss_function(transport_cfg) -> Callable:
    """The per-sample training loss of the process: flow matching's velocity MSE (+ cosine), or DDPM's ε/v MSE."""
    if is_ddpm(transport_cfg):
        return partial(ddpm_losses, schedule=DiffusionSchedule.from_config(transport_cfg))
    return partial(training_losses, use_cosine_loss=transport_cfg.use_cosine_loss)


def sample(model, z: torch.Tensor, y: torch.Tensor, transport_cfg, sample_cfg, *, null_class: Optional[int] = None,
           stats: Optional[dict] = None, generators: Optional[Sequence[torch.Generator]] = None,
           on_clean: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Latents from noise z with the config's sampler (`sample` section); `on_clean` is DDPM's x̂ per step."""
    s = sample_cfg
    if is_ddpm(transport_cfg):
        return sample_ddpm(model, z, y, schedule=DiffusionSchedule.from_config(transport_cfg),
                           method=s.sampling_method, num_steps=s.num_sampling_steps, eta=s.eta,
                           variance=s.ddpm_variance, cfg_scale=s.cfg_scale, null_class=null_class,
                           cfg_channels=s.cfg_channels, generators=generators, on_clean=on_clean, stats=stats)
    return sample_ode(model, z, y, method=s.sampling_method, num_steps=s.num_sampling_steps,
                      timestep_shift=s.timestep_shift, cfg_scale=s.cfg_scale, cfg_interval_start=s.cfg_interval_start,
                      null_class=null_class, cfg_channels=s.cfg_channels, atol=s.atol, rtol=s.rtol, stats=stats)
