"""Classifier-free guidance as LightningDiT applies it.

Upstream quirk (kept as the default): guidance is applied to the first 3 latent
channels only (`cfg_channels=3`); the other channels take the conditional output.
`cfg_channels=None` guides all channels (the standard formulation).
"""

from __future__ import annotations

from typing import Optional

import torch


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float,
                cfg_channels: Optional[int] = 3) -> torch.Tensor:
    """uncond + s * (cond - uncond) on channels [:cfg_channels]; the rest is `cond` (upstream)."""
    n = cond.shape[1] if cfg_channels is None else cfg_channels
    guided = uncond[:, :n] + cfg_scale * (cond[:, :n] - uncond[:, :n])
    if n >= cond.shape[1]:
        return guided
    return torch.cat([guided, cond[:, n:]], dim=1)


def guidance_active(t: float, cfg_scale: float, cfg_interval_start: float) -> bool:
    # CFG interval (Kynkäänniemi et al. 2024, as LightningDiT uses it): no guidance while t < start.
    return cfg_scale > 1.0 and t >= cfg_interval_start


def guided_velocity(model, x: torch.Tensor, t: float, y: torch.Tensor, *, cfg_scale: float = 1.0,
                    cfg_interval_start: float = 0.0, null_class: Optional[int] = None,
                    cfg_channels: Optional[int] = 3, stats: Optional[dict] = None) -> torch.Tensor:
    """Velocity at time `t` (a host float, so no device sync) for the batch x (N, C, H, W).

    Where guidance is off (scale 1, or t below the interval start) the unconditional half is
    not run at all: upstream's output there equals the conditional one, so the work halves.
    """
    n = x.shape[0]
    active = guidance_active(t, cfg_scale, cfg_interval_start)
    rows = 2 * n if active else n
    tt = torch.full((rows,), t, dtype=torch.float32, device=x.device)
    if stats is not None:
        stats["nfe"] = stats.get("nfe", 0) + 1
        stats["model_rows"] = stats.get("model_rows", 0) + rows
    if not active:
        return model(x, tt, y)
    if null_class is None:
        null_class = _null_class(model)
    y_null = torch.full_like(y, null_class)
    out = model(torch.cat([x, x]), tt, torch.cat([y, y_null]))
    cond, uncond = out.chunk(2, dim=0)
    return combine_cfg(cond, uncond, cfg_scale, cfg_channels)


def _null_class(model) -> int:
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    if hasattr(inner, "num_classes"):
        return int(inner.num_classes)
    raise ValueError("pass null_class= (the model has no num_classes attribute)")
