"""Flow matching (linear path, velocity losses, ODE samplers, classifier-free guidance) and the DDPM process."""

from repro.transport.guidance import combine_cfg, guidance_active, guided_velocity
from repro.transport.path import linear_path, mean_flat, sample_timesteps, training_losses
from repro.transport.ode import METHODS, model_rows_per_sample, sample_ode, time_grid
from repro.transport.ddpm import (DDPM_METHODS, PREDICTIONS, SCHEDULES, VARIANCES, DiffusionSchedule, ddpm_losses,
                                  make_betas, sample_ddpm, sampling_timesteps)
from repro.transport.process import is_ddpm, loss_function

__all__ = [
    "combine_cfg", "guidance_active", "guided_velocity", "linear_path", "mean_flat", "sample_timesteps",
    "training_losses", "METHODS", "model_rows_per_sample", "sample_ode", "time_grid",
    "DDPM_METHODS", "PREDICTIONS", "SCHEDULES", "VARIANCES", "DiffusionSchedule", "ddpm_losses", "make_betas",
    "sample_ddpm", "sampling_timesteps", "is_ddpm", "loss_function",
]
