"""Flow-matching training objective as LightningDiT/SiT define it.

Linear path (rectified flow): x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) noise at t = 0 and
x1 the data at t = 1; the model predicts the velocity u_t = x1 - x0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear_path(t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_t, u_t) for t of shape (N,)."""
    tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return tb * x1 + (1 - tb) * x0, x1 - x0


def sample_timesteps(n: int, lognorm: bool, generator: Optional[torch.Generator] = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps in [0, 1]: uniform, or logit-normal.

    Logit-normal sampling (Esser et al. 2024, SD3; LightningDiT's `use_lognorm`): t = sigmoid(u),
    u ~ N(0, 1), which concentrates training on mid-range t.
    """
    if lognorm:
        u = torch.randn(n, generator=generator, device=_gen_device(generator, device))
        t = torch.sigmoid(u)
    else:
        t = torch.rand(n, generator=generator, device=_gen_device(generator, device))
    return t.to(device)


def _gen_device(generator: Optional[torch.Generator], device) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def training_losses(model, x1: torch.Tensor, y: torch.Tensor, *, use_cosine_loss: bool = True,
                    use_lognorm: bool = True, generator: Optional[torch.Generator] = None,
                    t: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None) -> dict:
    """Per-sample losses (N,): `mse`, `cos` (or None) and `loss` = mse + cos.

    Noise and t come from `generator` (on x1's device, or CPU and moved) unless given.
    """
    n = x1.shape[0]
    if t is None:
        t = sample_timesteps(n, use_lognorm, generator, x1.device)
    if x0 is None:
        gdev = _gen_device(generator, x1.device)
        x0 = torch.randn(x1.shape, generator=generator, device=gdev, dtype=torch.float32).to(x1.device, x1.dtype)
    xt, ut = linear_path(t, x0, x1)
    pred = model(xt, t, y)
    mse = mean_flat((pred.float() - ut.float()) ** 2)
    out = {"mse": mse, "cos": None, "loss": mse, "t": t}
    if use_cosine_loss:
        # Cosine loss on the velocity direction along channels (LightningDiT, after FasterDiT).
        cos = mean_flat(1 - F.cosine_similarity(pred.float(), ut.float(), dim=1))
        out["cos"] = cos
        out["loss"] = mse + cos
    return out
