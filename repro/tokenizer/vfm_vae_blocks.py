"""VFM-VAE decoder building blocks (the StyleGAN-T-derived synthesis network of tianciB/VFM-VAE).

Written for the kit from the published architecture (arXiv 2510.18457, "Vision Foundation Models Can Be
Good Tokenizers for Latent Diffusion Models") and the state-dict names of the official checkpoint; no
upstream code is reused. Attribute names are the checkpoint's names (one of them, `seperate_upsample_conv`,
keeps the checkpoint's spelling) so `G_ema` loads strictly.

In the official f16d32 decoder every layer receives the same style vector w (the mapping output is
broadcast to all layers), so the blocks take one `w` each instead of StyleGAN's per-layer list.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Module):
    """StyleGAN's equalized-learning-rate linear layer: weights stored unscaled, scaled at run time.

    Stored as `weight` (out, in) and `bias` (out,); effective weight = weight * lr_mul / sqrt(in),
    effective bias = bias * lr_mul. `activation` is 'linear' or 'lrelu' (slope 0.2, no gain: as upstream)."""

    def __init__(self, in_features: int, out_features: int, *, activation: str = "linear", lr_mul: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return F.leaky_relu(x.matmul(w.t()) + b, negative_slope=0.2)


class StyleAffine(nn.Module):
    """w -> per-channel style a * b + c, the three parts from one projection (StyleGAN-T's split styles)."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.proj = ScaledLinear(w_dim, 3 * channels, bias_init=1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a, b, c = self.proj(w).chunk(3, dim=1)
        return a * b + c


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (matters only on the fp16 blocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, style: torch.Tensor, *, demodulate: bool) -> torch.Tensor:
    """Per-sample modulated (and optionally demodulated) unpadded convolution as one grouped conv."""
    batch, cin, height, width = x.shape
    cout, _, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        # rescale before the products so fp16 does not overflow; demodulation cancels the scale
        weight = weight * (1 / math.sqrt(cin * kh * kw)) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        style = style / style.norm(float("inf"), dim=1, keepdim=True)
    w = weight.unsqueeze(0) * style.view(batch, 1, cin, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().view(batch, cout, 1, 1, 1)
    out = F.conv2d(x.contiguous().view(1, batch * cin, height, width),
                   w.reshape(batch * cout, cin, kh, kw).to(x.dtype), groups=batch)
    return out.view(batch, cout, out.shape[-2], out.shape[-1])


class ModulatedPointwise(nn.Module):
    """1x1 modulated-demodulated convolution with a bias, the ConvNeXt layer's expansion."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1) * 0.02)
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return modulated_conv(x, self.weight, style, demodulate=True) + self.bias


class ConvNeXtLayer(nn.Module):
    """Residual ConvNeXt layer: depthwise conv, (legacy noise), GroupNorm, modulated 1x1 expansion x4, GELU,
    1x1 projection, layer scale. `legacy` keeps the constant noise map the 256px checkpoints were trained with
    (a stored buffer sized 8 * 2^block_index, resized bilinearly to the feature map on every call)."""

    def __init__(self, channels: int, w_dim: int, kernel_size: int, *, block_index: int, legacy: bool):
        super().__init__()
        self.legacy = legacy
        self.affine_pw1 = StyleAffine(w_dim, channels)
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        if legacy:
            side = 8 * 2 ** block_index
            self.register_buffer("noise_const", torch.randn(side, side))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.pwconv1 = ModulatedPointwise(channels, 4 * channels)
        self.pwconv2 = nn.Conv2d(4 * channels, channels, 1)
        self.norm = Fp32GroupNorm(min(32, channels // 4), channels)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full((1, channels, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dtype, residual = x.dtype, x
        style = self.affine_pw1(w)
        x = self.dwconv(x)
        if self.legacy:
            noise = (self.noise_const[None, None] * self.noise_strength).to(x.dtype)
            x = x + F.interpolate(noise, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x), style)))
        return (self.gamma * x + residual).to(dtype)


class ToRGB(nn.Module):
    """Modulated 1x1 convolution to image channels, no demodulation (StyleGAN's toRGB)."""

    def __init__(self, cin: int, cout: int, w_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1) * 0.1)
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))
        self.affine = StyleAffine(w_dim, cin)
        self.weight_gain = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return modulated_conv(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False) + self.bias


# binomial blur taps per kernel name (the upsampler blurs after the pixel shuffle)
BLUR_TAPS = {"3x3": (1, 2, 1), "4x4": (1, 3, 3, 1), "5x5": (1, 4, 6, 4, 1)}


class BlurUpsample(nn.Module):
    """x2 upsampling: GroupNorm (before, or after on the first block), depthwise 3x3, 1x1 to 4 * cout, pixel
    shuffle, then a fixed normalized binomial blur with replicate padding (a stored buffer)."""

    def __init__(self, cin: int, cout: int, *, pre_normalize: bool = True, blur: bool = True, taps: str = "3x3"):
        super().__init__()
        self.pre_normalize, self.blur, self.cout = pre_normalize, blur, cout
        norm_ch = cin if pre_normalize else cout
        self.norm = nn.GroupNorm(min(32, norm_ch // 4), norm_ch)
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout * 4, 1, bias=False)
        self.shuffle = nn.PixelShuffle(2)
        if blur:
            k = torch.tensor(BLUR_TAPS[taps], dtype=torch.float32)
            k2 = k[:, None] * k[None, :]
            k2 = k2 / k2.sum()
            size = k2.shape[0]
            lo = (size - 1) // 2
            self.pad = (lo, lo + (size % 2 == 0), lo, lo + (size % 2 == 0))
            self.register_buffer("blur_weight", k2[None, None].repeat(cout, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_normalize:
            x = self.shuffle(self.pointwise(self.depthwise(self.norm(x))))
        else:
            x = self.norm(self.shuffle(self.pointwise(self.depthwise(x))))
        if self.blur:
            x = F.conv2d(F.pad(x, self.pad, mode="replicate"), self.blur_weight.to(x.dtype), groups=self.cout)
        return x


class ChannelRMSNorm(nn.Module):
    """L2-normalize over channels, times sqrt(C) and a learned per-channel gain (GigaGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class SelfAttention(nn.Module):
    """Multi-head attention over the pixels with one learned null key/value per head (GigaGAN-style)."""

    def __init__(self, channels: int, heads: int = 8):
        super().__init__()
        self.heads, head_dim = heads, channels // heads
        self.norm = ChannelRMSNorm(channels)
        # 1x1 projections without bias; the names and shapes are the checkpoint's (a strict load needs them)
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, nn.Conv2d(channels, heads * head_dim, 1, bias=False))
        # the null key and value every query may attend to: a placeholder here, the checkpoint's after a load
        self.null_kv = nn.Parameter(torch.zeros(2, heads, head_dim).normal_(std=0.02))
        self.to_out = nn.Conv2d(heads * head_dim, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (b, heads*d, H, W) -> (b, heads, H*W, d)
            return t.reshape(b, self.heads, -1, height * width).transpose(2, 3)

        q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        null_k, null_v = (t.to(k.dtype).unsqueeze(0).unsqueeze(2).expand(b, -1, 1, -1) for t in self.null_kv)
        out = F.scaled_dot_product_attention(q, torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2))
        out = out.transpose(2, 3).reshape(b, -1, height, width)
        return self.to_out(out)


class AttentionBlock(nn.Module):
    """x + attention(x), then x + feed-forward(x) (channel RMSNorm, 1x1 conv x4, GELU, 1x1 conv)."""

    def __init__(self, channels: int, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.attn = SelfAttention(channels, heads)
        self.ff = nn.Sequential(ChannelRMSNorm(channels), nn.Conv2d(channels, channels * ff_mult, 1), nn.GELU(),
                                nn.Conv2d(channels * ff_mult, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


class SynthesisBlock(nn.Module):
    """One resolution of the decoder: x2 blur upsampling, ConvNeXt layers, self-attention, and the multiscale
    skip path (previous features upsampled and added) with its toRGB."""

    def __init__(self, index: int, cin: int, cout: int, prev_out: int | None, w_dim: int, *, img_channels: int,
                 num_res_blocks: int, attn_depth: int, blur: bool, extra_convnext: bool, legacy: bool):
        super().__init__()
        kernel = 5 if index <= 1 else 7  # smaller kernels at the low resolutions (upstream's choice)
        taps = "3x3" if index <= 2 else "5x5"
        self.seperate_upsample_conv = BlurUpsample(cin, cout, pre_normalize=index > 0, blur=blur, taps=taps)
        self.conv0 = ConvNeXtLayer(cout, w_dim, kernel, block_index=index, legacy=legacy)
        per_res = 3 if index <= 3 and extra_convnext else 2
        self.convs1 = nn.ModuleList(ConvNeXtLayer(cout, w_dim, kernel, block_index=index, legacy=legacy)
                                    for _ in range(num_res_blocks * per_res))
        self.torgb = ToRGB(cout, img_channels, w_dim)
        if prev_out is not None:
            self.last_upsample_conv = BlurUpsample(prev_out, cout, blur=blur, taps=taps)
        self.self_attns = nn.ModuleList(AttentionBlock(cout) for _ in range(attn_depth)) if attn_depth else None

    def forward(self, x: torch.Tensor, x_sum: torch.Tensor | None, w: torch.Tensor, *, last: bool):
        x = self.conv0(self.seperate_upsample_conv(x), w)
        for conv in self.convs1:
            x = conv(x, w)
        for attn in self.self_attns or ():
            x = attn(x)
        x_sum = x if x_sum is None else self.last_upsample_conv(x_sum) + x
        # only the last block's image is the output; the others are training-time multiscale targets
        img = self.torgb(x_sum, w).float() if last else None
        return x, x_sum, img


def concat_z_branch(z_channels: int, z_side: int, block_side: int, out_dim: int) -> nn.Sequential:
    """Brings the decompressed latent to a block's input side: pixel-unshuffle (smaller), nothing (equal) or
    pixel-shuffle (larger), with a separable 3x3 conv + GroupNorm + LeakyReLU and a 1x1 conv + GroupNorm.
    The Sequential indices are the checkpoint's (`z_convs.<block>.<i>...`)."""

    def sep3x3(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
                             Fp32GroupNorm(min(32, cout), cout), nn.LeakyReLU(0.2))

    def pw1x1(c: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c, c, 1, bias=False), Fp32GroupNorm(min(32, c), c))

    input_side = block_side // 2  # the block upsamples x2 first
    if input_side < z_side:
        factor = z_side // input_side
        return nn.Sequential(nn.PixelUnshuffle(factor), sep3x3(z_channels * factor ** 2, out_dim), pw1x1(out_dim))
    if input_side == z_side:
        return nn.Sequential(sep3x3(z_channels, out_dim), pw1x1(out_dim))
    factor = input_side // z_side
    return nn.Sequential(sep3x3(z_channels, out_dim * factor ** 2), nn.PixelShuffle(factor), pw1x1(out_dim))
