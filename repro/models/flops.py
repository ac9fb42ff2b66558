"""Analytic model FLOPs for MFU (a multiply-add is 2 FLOPs); equal to torch's FlopCounterMode.

Per image-forward: 2 x (weights applied to every token) x tokens, plus 2 x (weights applied once per
image: the adaLN modulation and the timestep MLP act on the conditioning vector), plus attention's
QK^T and AV (4 T^2 D per block). LightningDiT-XL/1 at 16x16 latents: ~237 GFLOP. Counting the 223M
adaLN parameters once per token instead gives the ~354 GFLOP sometimes quoted.
"""

from __future__ import annotations

import torch.nn as nn


def forward_flops(model: nn.Module) -> float:
    """FLOPs of one image's forward pass through a LightningDiT (works on a `meta`-device model)."""
    tokens = model.x_embedder.num_patches
    per_token = per_image = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if "adaLN_modulation" in name or name.startswith("t_embedder"):
                per_image += mod.weight.numel()
            else:
                per_token += mod.weight.numel()
        elif isinstance(mod, nn.Conv2d):  # patch embedding: one kernel application per token
            per_token += mod.weight.numel()
    attention = 4 * tokens * tokens * model.hidden_size * len(model.blocks)
    return float(2 * tokens * per_token + 2 * per_image + attention)
