"""ODE samplers for the flow-matching velocity model, one signature for every method
(after k-diffusion's sampling.py).

Upstream behaviour reproduced by default (hustvl/LightningDiT transport/integrators.py):
- Time grid: `linspace(0, 1, num_steps)`, so `num_steps=250` means 249 Euler steps ("Euler grid
  without the final step": the grid has num_steps points, not num_steps intervals).
- Timestep shift (after FLUX; upstream `timestep_shift`): t' = s t / (1 + (s - 1) t) when s > 0;
  s < 1 spends more steps near t = 0 (noise).
- Fixed-grid steppers match torchdiffeq's `euler`, `midpoint`, `heun2` and `rk4` (its 3/8-rule
  variant) operation for operation; `dopri5` is torchdiffeq's adaptive solver.
- CFG on the first 3 channels and the interval rule: see `repro.transport.guidance`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from repro.transport.guidance import guided_velocity

FIXED_METHODS = ("euler", "midpoint", "heun2", "rk4")
ADAPTIVE_METHODS = ("dopri5",)
METHODS = FIXED_METHODS + ADAPTIVE_METHODS
_ONE_THIRD = 1 / 3
_TWO_THIRDS = 2 / 3


def time_grid(num_steps: int, timestep_shift: float = 0.0) -> torch.Tensor:
    """The float32 CPU grid from t = 0 (noise) to t = 1 (data), shifted as upstream."""
    t = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float32)
    if timestep_shift > 0:
        # Upstream computes s*t / (1 + (s-1)*t) in float32 per element; the same ops vectorised.
        t = timestep_shift * t / (1 + (timestep_shift - 1) * t)
    return t


def model_rows_per_sample(num_steps: int, method: str = "euler", timestep_shift: float = 0.0,
                          cfg_scale: float = 1.0, cfg_interval_start: float = 0.0) -> tuple[int, int]:
    """(rows run by this sampler, rows run by upstream's always-doubled path) per image, fixed grids."""
    from repro.transport.guidance import guidance_active

    grid = time_grid(num_steps, timestep_shift)
    ours = theirs = 0
    per_call = 2 if cfg_scale > 1.0 else 1
    for t in _fixed_eval_times(grid, method):
        ours += 2 if guidance_active(t, cfg_scale, cfg_interval_start) else 1
        theirs += per_call
    return ours, theirs


def _fixed_eval_times(grid: torch.Tensor, method: str) -> list[float]:
    times = []
    for i in range(len(grid) - 1):
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        if method == "euler":
            times += [float(t0)]
        elif method == "midpoint":
            times += [float(t0), float(t0 + 0.5 * dt)]
        elif method == "heun2":
            times += [float(t0), float(t0 + dt * 1.0)]
        elif method == "rk4":
            times += [float(t0), float(t0 + dt * _ONE_THIRD), float(t0 + dt * _TWO_THIRDS), float(t1)]
    return times


@torch.no_grad()
def sample_ode(model, z: torch.Tensor, y: torch.Tensor, *, method: str = "euler", num_steps: int = 250,
               timestep_shift: float = 0.0, cfg_scale: float = 1.0, cfg_interval_start: float = 0.0,
               null_class: Optional[int] = None, cfg_channels: Optional[int] = 3, atol: float = 1e-6,
               rtol: float = 1e-3, callback: Optional[Callable[[int, int], None]] = None,
               stats: Optional[dict] = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t, y) from z (t = 0, noise) to t = 1 (data); return the final latents.

    z: (N, C, H, W) noise, y: (N,) labels. `cfg_scale > 1` guides with the null label `null_class`
    (default: the model's num_classes) on the first `cfg_channels` channels (None = all), only
    where t >= cfg_interval_start. `callback(step, total)` is called after each fixed step.
    `stats`, if given, accumulates `nfe` and `model_rows`. dopri5 ignores num_steps (grid [0, 1]).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method '{method}'; choose one of {', '.join(METHODS)}")

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, x, t, y, cfg_scale=cfg_scale, cfg_interval_start=cfg_interval_start,
                               null_class=null_class, cfg_channels=cfg_channels, stats=stats)

    if method == "dopri5":
        return _sample_adaptive(velocity, z, timestep_shift, atol, rtol)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 for '{method}' (the grid has num_steps points), got {num_steps}")
    grid = time_grid(num_steps, timestep_shift)
    step = _STEPPERS[method]
    x = z
    total = len(grid) - 1
    for i in range(total):
        t0, t1 = grid[i], grid[i + 1]
        x = x + step(velocity, x, t0, t1 - t0, t1)
        if callback is not None:
            callback(i + 1, total)
    return x


# Each stepper returns dy for one interval; time arithmetic in float32 on CPU as torchdiffeq does,
# then handed to the model as a host float (no device synchronisation in the loop).

def _euler(v, x, t0, dt, t1):
    return float(dt) * v(x, float(t0))


def _midpoint(v, x, t0, dt, t1):
    half = 0.5 * dt
    f0 = v(x, float(t0))
    return float(dt) * v(x + f0 * float(half), float(t0 + half))


def _heun2(v, x, t0, dt, t1):
    f0 = v(x, float(t0))
    f1 = v(x + float(dt) * f0 * 1.0, float(t0 + dt * 1.0))
    return float(dt) * (f0 * 0.5 + f1 * 0.5)


def _rk4(v, x, t0, dt, t1):
    # torchdiffeq's `rk4` is the 3/8-rule variant (rk4_alt_step_func).
    d = float(dt)
    k1 = v(x, float(t0))
    k2 = v(x + d * k1 * _ONE_THIRD, float(t0 + dt * _ONE_THIRD))
    k3 = v(x + d * (k2 - k1 * _ONE_THIRD), float(t0 + dt * _TWO_THIRDS))
    k4 = v(x + d * (k1 - k2 + k3), float(t1))
    return (k1 + 3 * (k2 + k3) + k4) * d * 0.125


_STEPPERS = {"euler": _euler, "midpoint": _midpoint, "heun2": _heun2, "rk4": _rk4}


def _sample_adaptive(velocity, z: torch.Tensor, timestep_shift: float, atol: float, rtol: float) -> torch.Tensor:
    from torchdiffeq import odeint

    grid = time_grid(2, timestep_shift).to(z.device)

    def fn(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity(x, float(t))

    return odeint(fn, z, grid, method="dopri5", atol=[atol], rtol=[rtol])[-1]
