"""A UNet denoiser for latents: the second denoiser family, beside LightningDiT (size registry at the bottom).

The ADM-style UNet of Ho et al. 2020 / Dhariwal & Nichol 2021 (and the latent UNet of lightdiff, whose widths are
the `UNet-L` entry): ResNet blocks with group norm and a time embedding added per block, self-attention where the
feature map is input_size / f for f in `attn_factors` and in the middle, skip connections from every down block
to the mirrored up block, optional class embedding with a null class (index num_classes) for classifier-free
guidance; `num_classes=0` is unconditional (labels are ignored).

Called as LightningDiT is: `model(x, t, y)`, x (N, C, H, W) latents, t (N,) floats, y (N,) int64 -> (N, C, H, W).
The time embedding is sinusoidal in `t * time_scale`: the DDPM process passes the timestep index (0..T-1, scale 1);
flow matching passes t in [0, 1], so `build_denoiser` sets time_scale 1000 (the same frequencies either way).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups where the width allows (ADM)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim) sinusoidal features (Vaswani et al.; cos then sin, as ADM/DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, + the embedding's projection, GN -> SiLU -> dropout -> conv, plus the (1x1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.drop = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM's zero_module)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual (ADM's AttentionBlock)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.heads = num_heads if channels % num_heads == 0 else 1
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)  # (N, heads, d, HW)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Sequential):
    """Layers that all take (x, emb): one ResBlock with its attention, or a resampler."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index num_classes) for guidance; drops labels with `dropout_prob` in training
    (the kit's trainer turns that off and drops them from each sample's own generator instead)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.dropout_prob, self.num_classes, y)
        return self.embedding_table(y)


class UNet(nn.Module):
    def __init__(self, input_size: int = 8, in_channels: int = 4, num_classes: int = 10,
                 channels: Sequence[int] = (64, 128, 256), num_res_blocks: int = 2, attn_factors: Sequence[int] = (2, 4),
                 time_dim: int = 128, num_heads: int = 4, dropout: float = 0.0, class_dropout_prob: float = 0.1,
                 time_scale: float = 1.0):
        super().__init__()
        if input_size % 2 ** (len(channels) - 1):
            raise ValueError(f"the UNet halves its input {len(channels) - 1} times: input_size {input_size} must be a "
                             f"multiple of {2 ** (len(channels) - 1)}")
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, in_channels
        self.num_classes, self.time_dim, self.time_scale = num_classes, time_dim, float(time_scale)
        emb_dim = 4 * time_dim
        self.t_embedder = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.y_embedder = LabelEmbedder(num_classes, emb_dim, class_dropout_prob) if num_classes > 0 else None
        self.input_conv = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        # Down path: num_res_blocks blocks per level, a stride-2 conv between levels; every output is a skip.
        self.down, skips, ch, factor = nn.ModuleList(), [channels[0]], channels[0], 1
        for level, width in enumerate(channels):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, width, emb_dim, dropout)]
                ch = width
                if factor in attn_factors:
                    layers.append(AttentionBlock(ch, num_heads))
                self.down.append(Stage(*layers))
                skips.append(ch)
            if level < len(channels) - 1:
                self.down.append(Stage(Downsample(ch)))
                skips.append(ch)
                factor *= 2
        self.middle = Stage(ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch, num_heads),
                            ResBlock(ch, ch, emb_dim, dropout))
        # Up path: the mirror, one more block per level (it takes the resampler's skip), then a nearest-neighbour x2.
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), width, emb_dim, dropout)]
                ch = width
                if factor in attn_factors:
                    layers.append(AttentionBlock(ch, num_heads))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.up.append(Stage(*layers))
        self.out_norm, self.out_conv = group_norm(ch), nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # the untrained model predicts 0
        nn.init.zeros_(self.out_conv.bias)

    @property
    def blocks(self) -> list[nn.Module]:
        """The FSDP units (each stage), as LightningDiT's transformer blocks."""
        return [*self.down, self.middle, *self.up]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.t_embedder(timestep_embedding(t * self.time_scale, self.time_dim))  # (N, 4 time_dim)
        if self.y_embedder is not None:
            emb = emb + self.y_embedder(y)
        h = self.input_conv(x)  # (N, channels[0], H, W)
        hs = [h]
        for stage in self.down:  # (N, channels[l], H / 2^l, W / 2^l)
            h = stage(h, emb)
            hs.append(h)
        h = self.middle(h, emb)  # (N, channels[-1], H / 2^(L-1), W / 2^(L-1))
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))  # (N, C, H, W)


#################################################################################
#                              UNet size registry                               #
#################################################################################

def _size(channels: Sequence[int], num_res_blocks: int, attn_factors: Sequence[int], time_dim: int):
    def make(**kwargs) -> UNet:
        return UNet(channels=tuple(channels), num_res_blocks=num_res_blocks, attn_factors=tuple(attn_factors),
                    time_dim=time_dim, **kwargs)
    return make


UNET_MODELS = {
    # tests: two levels of width 16 and 32
    "UNet-T": _size((16, 32), 1, (2,), 32),
    # small latents on a CPU (notebook 04: 8x8 f4 latents of 32 px digits), attention at 4x4 and 2x2; 1.3M parameters,
    # LightningDiT-Mini/2's size
    "UNet-Mini": _size((32, 64, 64), 1, (2, 4), 64),
    "UNet-S": _size((64, 128, 256), 2, (2, 4), 128),
    "UNet-B": _size((128, 256, 512), 2, (2, 4), 256),
    # lightdiff's UNET_CFG widths: 128 -> 256 -> 512 -> 1024, 3 ResNet blocks per level, time_dim 512, middle attention
    "UNet-L": _size((128, 256, 512, 1024), 3, (), 512),
}
