"""LightningDiT: DiT/SiT with RMSNorm, SwiGLU, 2-D RoPE and (optional) QK-norm.

State-dict names and shapes are exactly those of hustvl/LightningDiT
(`models/lightningdit.py`), so official checkpoints load with strict=True.
Time convention (SiT/LightningDiT): t = 0 is noise, t = 1 is data; the model
predicts the velocity x1 - x0.

Paper: Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma
in Latent Diffusion Models" (VA-VAE + LightningDiT), CVPR 2025.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    # adaLN modulation; `wo_shift` (LightningDiT option) drops the shift term.
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one fused kernel


# RMSNorm (Zhang & Sennrich 2019), computed in float32 as upstream (LLaMA-style, eps 1e-6).
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FUSED_RMS_NORM and x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one kernel, same float32 math
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


_FUSED_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


# SwiGLU feed-forward (Shazeer 2020) with a fused w12 projection, as DINOv2's SwiGLUFFN used upstream.
class SwiGLUFFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1).mul_(x2))  # in place: one hidden-size buffer fewer


class Mlp(nn.Module):
    """timm's Mlp layout (fc1 -> GELU(tanh) -> fc2), used when SwiGLU is off."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed layout: a strided conv, tokens in row-major (h, w) order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


# 2-D rotary position embedding (EVA-02 VisionRotaryEmbeddingFast, used upstream): the first half of
# each head's channels rotates with the row index, the second half with the column; pairs are interleaved.
class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim: int, pt_seq_len: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        pos = torch.arange(pt_seq_len).float()
        f = torch.repeat_interleave(pos[:, None] * freqs[None], 2, dim=-1)  # (S, dim)
        grid = torch.cat(
            [f[:, None, :].expand(pt_seq_len, pt_seq_len, dim), f[None, :, :].expand(pt_seq_len, pt_seq_len, dim)],
            dim=-1,
        )  # (S, S, 2*dim)
        self.register_buffer("freqs_cos", grid.cos().reshape(-1, 2 * dim))
        self.register_buffer("freqs_sin", grid.sin().reshape(-1, 2 * dim))
        # rotate_half(x) * sin == swap_pairs(x) * (sin with every even entry negated); not in the state dict.
        self.register_buffer("pair_sign", torch.tensor([-1.0, 1.0]).repeat(dim), persistent=False)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...), upstream's interleaved rotation."""
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * cos + rotate_half(x) * sin in three kernels (flip, mul, addcmul) instead of six.
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        out = torch.addcmul(x * self.freqs_cos, swapped, self.freqs_sin * self.pair_sign)
        # Keep q/k in their compute dtype under autocast so SDPA can pick the fused bf16/fp16 kernels.
        return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and SDPA (flash/efficient kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        assert dim % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        norm = RMSNorm if use_rmsnorm else (lambda d: nn.LayerNorm(d, eps=1e-5))
        # QK-norm (Dehghani et al. 2023), optional upstream for training stability.
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[nn.Module] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(torch.stack([q, k])).unbind(0)  # rotate q and k in one pass
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (fractional, in [0, 1]) then a 2-layer MLP, as DiT."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        # Cached sinusoid frequencies (not in the state dict), so no host-to-device copy per call.
        half = frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.freqs.float()[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with an extra 'null' row (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class LightningDiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=False,
                 use_rmsnorm=False, wo_shift=False):
        super().__init__()
        if use_rmsnorm:
            self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        # SwiGLU keeps the parameter count of a 4x GELU MLP with a 2/3-width hidden layer (upstream).
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[nn.Module] = None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # Gated residuals x + g * f(x), each as one fused addcmul.
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = (RMSNorm(hidden_size) if use_rmsnorm
                           else nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, use_qknorm=False,
                 use_swiglu=False, use_rope=False, use_rmsnorm=False, wo_shift=False, use_checkpoint=False):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_classes = num_classes
        self.input_size = input_size
        self.use_checkpoint = use_checkpoint
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos position embedding (MAE/DiT), stored as a frozen parameter as upstream.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.feat_rope = (VisionRotaryEmbeddingFast(hidden_size // num_heads // 2, input_size // patch_size)
                          if use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, zeroed adaLN and output layers (training starts at identity)."""
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            pe = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size)
            self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) in [0, 1] (0 = noise), y: (N,) labels -> (N, C, H, W) velocity."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p^2
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p^2 * C_out)
        x = self.unpatchify(x)  # (N, C_out, H, W)
        if self.learn_sigma:
            x, _ = x.chunk(2, dim=1)
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=False, cfg_interval_start=0.0, cfg_channels=3):
        """Upstream's doubled-batch CFG forward: x = [x_half, anything], y = [labels, null].

        Returns the doubled batch as upstream does. Sampling uses `repro.transport.guided_velocity`,
        which runs the unconditional half only where guidance is on.
        """
        from repro.transport.guidance import combine_cfg

        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2, dim=0)
        if cfg_interval and float(t[0]) < cfg_interval_start:
            guided = cond
        else:
            guided = combine_cfg(cond, uncond, cfg_scale, cfg_channels)
        # Channels past cfg_channels of each half keep that half's own output (upstream behaviour).
        n = guided.shape[1] if cfg_channels is None else cfg_channels
        second = torch.cat([guided[:, :n], uncond[:, n:]], dim=1)
        return torch.cat([guided, second], dim=0)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE 2-D sin-cos embedding (grid_size^2, embed_dim): first half encodes the column, second the row."""
    gh, gw = np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_a = _1d_sincos(embed_dim // 2, grid[0])
    emb_b = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                          LightningDiT size registry                           #
#################################################################################

def _size(depth: int, hidden_size: int, patch_size: int, num_heads: int):
    def make(**kwargs) -> LightningDiT:
        return LightningDiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)
    return make


LIGHTNINGDIT_MODELS = {
    "LightningDiT-B/1": _size(12, 768, 1, 12),
    "LightningDiT-B/2": _size(12, 768, 2, 12),
    "LightningDiT-L/2": _size(24, 1024, 2, 16),
    "LightningDiT-XL/1": _size(28, 1152, 1, 16),
    "LightningDiT-XL/2": _size(28, 1152, 2, 16),
    "LightningDiT-1p0B/1": _size(24, 1536, 1, 24),
    "LightningDiT-1p0B/2": _size(24, 1536, 2, 24),
    "LightningDiT-1p6B/1": _size(28, 1792, 1, 28),
    "LightningDiT-1p6B/2": _size(28, 1792, 2, 28),
    # Kit-only: a tiny model for CPU tests and smoke runs.
    "LightningDiT-T/1": _size(2, 64, 1, 4),
    # Kit-only: a small model for your own small images on a CPU (notebook 04: 32 px digits, f4 latents, 1.3M).
    "LightningDiT-Mini/2": _size(4, 128, 2, 4),
    # Kit-only: the same on a 16x16 latent grid (notebook 04 with f2 at 32 px): 4x4 patches keep 16 tokens.
    "LightningDiT-Mini/4": _size(4, 128, 4, 4),
}


def create_model(name: str, **kwargs) -> LightningDiT:
    """Build a registry size by its upstream name, e.g. create_model("LightningDiT-XL/1", input_size=16)."""
    from repro.errors import ConfigError

    if name not in LIGHTNINGDIT_MODELS:
        import difflib

        close = difflib.get_close_matches(name, list(LIGHTNINGDIT_MODELS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(LIGHTNINGDIT_MODELS)}"
        raise ConfigError(f"unknown model.model_type '{name}'{hint}")
    return LIGHTNINGDIT_MODELS[name](**kwargs)


def build_model(model_cfg, input_size: int, num_classes: int, **overrides) -> LightningDiT:
    """Build from the config's `model` section (official keys), as upstream train.py/inference.py do."""
    kwargs = dict(
        input_size=input_size, in_channels=model_cfg.in_chans, num_classes=num_classes,
        use_qknorm=model_cfg.use_qknorm, use_swiglu=model_cfg.use_swiglu, use_rope=model_cfg.use_rope,
        use_rmsnorm=model_cfg.use_rmsnorm, wo_shift=model_cfg.wo_shift, use_checkpoint=model_cfg.use_checkpoint,
        class_dropout_prob=model_cfg.class_dropout_prob,
    )
    kwargs.update(overrides)
    return create_model(model_cfg.model_type, **kwargs)
