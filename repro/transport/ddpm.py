"""The DDPM process beside flow matching: noise schedules, the ε (or v) objective, DDPM and DDIM samplers.

Conventions (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): timestep index k in 0..T-1, k = 0
nearly clean, k = T-1 nearly pure noise; x_k = sqrt(ᾱ_k) x + sqrt(1 - ᾱ_k) ε with ᾱ_k = prod_{j<=k} (1 - β_j).
The model is called as for flow matching, `model(x_k, k, y)`, with k a float index (as facebookresearch/DiT
and explainingai-code/DiT-PyTorch feed the integer timestep to the sinusoidal embedding). The kit's training
draws t ~ U[0, 1) per sample (`repro.training.data_order`, the same draw flow matching uses); DDPM turns it
into k = floor(t T), so the data order, the noise and the resume rules are the flow trainer's. With
`transport.use_lognorm` t is logit-normal instead (Esser et al. 2024, LightningDiT's flow draw): training
concentrates on the middle indices, around ᾱ = 0.5 on the cosine schedule, where flow's draw puts it.

Schedules: `linear` (β from beta_start to beta_end, Ho et al.: 1e-4 -> 0.02 over 1,000 steps), `scaled_linear`
(sqrt(β) linear, the latent-diffusion schedule), `cosine` (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17:
ᾱ(k) = f(k)/f(0), f(k) = cos²(((k/T) + s)/(1 + s) · π/2), s = 0.008, β clamped at 0.999).
Predictions: `noise` (ε, Ho et al.) or `velocity` (v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x, Salimans & Ho 2022).

Samplers, one signature (`sample_ddpm`): `ddim` (Song et al. 2021, eq. 12; η = 0 deterministic, η > 0
stochastic, η = 1 is DDPM with β̃) and `ddpm` ancestral with fixed variance β or β̃ (Ho et al. §3.2), both on any
number of steps: a sub-sequence of the T timesteps, evenly spaced from T-1 down to 0, with the β of each jump
recomputed from ᾱ (Nichol & Dhariwal's respacing). The last step goes to ᾱ = 1, so every sampler ends on the
model's predicted clean latent x̂ (lightdiff's DDIM stops at the latent noised at k = 0 instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from repro.transport.guidance import guided_velocity
from repro.transport.path import mean_flat

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("noise", "velocity")
DDPM_METHODS = ("ddim", "ddpm")
VARIANCES = ("beta", "beta_tilde")
COSINE_S = 0.008  # Nichol & Dhariwal 2021: the offset that keeps β_0 from being too small
MAX_BETA = 0.999  # ... and the clamp that keeps the last β away from 1


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_0 .. β_{T-1}, float64."""
    T = int(num_timesteps)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        def f(k: torch.Tensor) -> torch.Tensor:
            return torch.cos((k / T + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        k = torch.arange(T + 1, dtype=torch.float64)
        alpha_bar = f(k) / f(torch.zeros((), dtype=torch.float64))  # ᾱ(0) .. ᾱ(T); ᾱ(0) = 1
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass
class DiffusionSchedule:
    """β and ᾱ of one schedule (float64 on the CPU; gathered values are cast to the data's dtype and device)."""

    betas: torch.Tensor
    prediction: str = "noise"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    @classmethod
    def from_config(cls, transport_cfg) -> "DiffusionSchedule":
        t = transport_cfg
        return cls(make_betas(t.schedule, t.num_timesteps, t.beta_start, t.beta_end), prediction=t.prediction)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def index_of(self, t: torch.Tensor) -> torch.Tensor:
        """k = floor(t T) for the trainer's t in [0, 1) (int64, t's device)."""
        return (t.double() * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)

    def _gather(self, values: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(k.device)[k].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, data: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_k = sqrt(ᾱ_k) x + sqrt(1 - ᾱ_k) ε (Ho et al. eq. 4)."""
        a = self._gather(self.alphas_cumprod, k, data)
        return a.sqrt() * data + (1 - a).sqrt() * noise

    def target(self, data: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model learns to output: ε, or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x."""
        if self.prediction == "noise":
            return noise
        a = self._gather(self.alphas_cumprod, k, data)
        return a.sqrt() * noise - (1 - a).sqrt() * data


def split_prediction(out: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction: str):
    """(x̂, ε̂) from the model output at a point with ᾱ = alpha_bar (a host float)."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction == "noise":
        return (x - s * out) / a, out
    return a * x - s * out, s * x + a * out  # v-prediction (Salimans & Ho 2022, appendix D)


def ddpm_losses(model, x1: torch.Tensor, y: torch.Tensor, *, schedule: DiffusionSchedule,
                t: torch.Tensor, x0: torch.Tensor) -> dict:
    """Per-sample losses (N,) with the flow losses' keys: MSE on ε (or v), no cosine term.

    `x1` is the data and `x0` the noise, as the kit's micro-batches name them; `t` in [0, 1) picks k = floor(t T).
    """
    k = schedule.index_of(t)
    xk = schedule.q_sample(x1, k, x0)
    pred = model(xk, k.to(torch.float32), y)
    mse = mean_flat((pred.float() - schedule.target(x1, k, x0).float()) ** 2)
    return {"mse": mse, "cos": None, "loss": mse, "t": t}


def sampling_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The sampler's timesteps, descending from T-1 to 0, evenly spaced (all T when num_steps == T)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the process has {num_timesteps} timesteps), "
                         f"got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    return [round((num_timesteps - 1) * (1 - i / (num_steps - 1))) for i in range(num_steps)]


def step_coefficients(alpha_bar: float, alpha_bar_prev: float, method: str, eta: float, variance: str):
    """(c_x̂, c_ε̂, σ) of one jump from ᾱ to ᾱ_prev: x_prev = c_x̂ x̂ + c_ε̂ ε̂ + σ z.

    DDIM (Song et al. eq. 12): σ = η sqrt((1 - ᾱ_prev)/(1 - ᾱ)) sqrt(1 - ᾱ/ᾱ_prev), c_x̂ = sqrt(ᾱ_prev),
    c_ε̂ = sqrt(1 - ᾱ_prev - σ²). DDPM (Ho et al. eq. 7): the posterior mean μ̃ = sqrt(ᾱ_prev) β/(1 - ᾱ) x̂
    + sqrt(1 - β)(1 - ᾱ_prev)/(1 - ᾱ) x_k, written in x̂ and ε̂ through x_k = sqrt(ᾱ) x̂ + sqrt(1 - ᾱ) ε̂; σ² = β
    or β̃ = β (1 - ᾱ_prev)/(1 - ᾱ), with β = 1 - ᾱ/ᾱ_prev the jump's β.
    """
    beta = 1 - alpha_bar / alpha_bar_prev
    if method == "ddim":
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * beta)
        return math.sqrt(alpha_bar_prev), math.sqrt(max(1 - alpha_bar_prev - sigma ** 2, 0.0)), sigma
    c_data = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
    c_xk = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    sigma = math.sqrt(beta if variance == "beta" else beta_tilde) if alpha_bar_prev < 1 else 0.0
    return c_data + c_xk * math.sqrt(alpha_bar), c_xk * math.sqrt(1 - alpha_bar), sigma


def _step_noise(x: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(x, dtype=torch.float32)
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(x.device)


@torch.no_grad()
def sample_ddpm(model, z: torch.Tensor, y: torch.Tensor, *, schedule: DiffusionSchedule, method: str = "ddim",
                num_steps: int = 50, eta: float = 0.0, variance: str = "beta_tilde", cfg_scale: float = 1.0,
                null_class: Optional[int] = None, cfg_channels: Optional[int] = None,
                generators: Optional[Sequence[torch.Generator]] = None,
                callback: Optional[Callable[[int, int], None]] = None,
                on_clean: Optional[Callable[[int, torch.Tensor], None]] = None,
                stats: Optional[dict] = None) -> torch.Tensor:
    """Denoise z (N, C, H, W) ~ N(0, I) at k = T-1 to the predicted clean latents.

    `cfg_scale > 1` guides the model output (ε or v) with the null label on the first `cfg_channels` channels
    (None = all), as `repro.transport.guidance`. Stochastic steps (ddpm, or ddim with η > 0) draw their noise
    from `generators` (one per image: the image's noise then does not depend on its batch) or the global RNG.
    `callback(step, total)` after each step; `on_clean(step, x̂)` with the predicted clean latents of each step.
    """
    if method not in DDPM_METHODS:
        raise ValueError(f"unknown sampling method '{method}' for the DDPM process; choose one of "
                         f"{', '.join(DDPM_METHODS)}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    ks = sampling_timesteps(schedule.num_timesteps, num_steps)
    abar = schedule.alphas_cumprod.tolist()
    x = z.float()
    for i, k in enumerate(ks):
        a, a_prev = abar[k], (abar[ks[i + 1]] if i + 1 < len(ks) else 1.0)
        out = guided_velocity(model, x, float(k), y, cfg_scale=cfg_scale, null_class=null_class,
                              cfg_channels=cfg_channels, stats=stats).float()
        data_hat, eps_hat = split_prediction(out, x, a, schedule.prediction)
        if on_clean is not None:
            on_clean(i, data_hat)
        c_data, c_eps, sigma = step_coefficients(a, a_prev, method, eta, variance)
        x = c_data * data_hat + c_eps * eps_hat
        if sigma > 0:
            x = x + sigma * _step_noise(x, generators)
        if callback is not None:
            callback(i + 1, len(ks))
    return x
