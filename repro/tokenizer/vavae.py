"""VA-VAE tokenizer (f16d32): the LDM AutoencoderKL that LightningDiT trains on.

Module names and shapes follow upstream hustvl/LightningDiT `tokenizer/autoencoder.py` so the
official `vavae-imagenet256-f16d32-dinov2.pt` loads with strict=True. Only the inference part
lives here (encoder, decoder, quant_conv, post_quant_conv); the DINOv2 alignment model, the
loss and projection weights in the official file are training-only and dropped (and counted)
by `extract_inference_state_dict`.

    vae = load_vavae("vavae-imagenet256-f16d32-dinov2.pt", device="cuda")
    z = vae.encode(images).sample(generator=g)   # images (N,3,256,256) in [-1,1] -> (N,32,16,16)
    x = vae.decode(z)                            # back to (N,3,256,256), roughly in [-1,1]
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro.errors import CheckpointError, ConfigError, ReproError
from repro.models.checkpoint import read_state_dict
from repro.utils.distributed import print0

# State-dict prefixes of the inference part; everything else in the official file is training-only.
INFERENCE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    # upstream Normalize(): 32 groups, eps 1e-6 (kit: `norm_groups` lets small models use fewer groups)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a residual; no timestep input (temb_ch is 0 in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0.0 upstream: omitted
        if hasattr(self, "nin_shortcut"):  # in_channels != out_channels
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections, scale c^-0.5."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = _group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (b, c, h, w) -> (b, 1 head, h*w tokens, c)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale is c^-0.5, as upstream
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # upstream Downsample: asymmetric zero pad (right and bottom only), then stride-2 conv
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, each followed by attention where the level has it."""

    def __init__(self, channels_in: int, channels_out: int, num_blocks: int, with_attn: bool, norm_groups: int):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(ResnetBlock(channels_in, channels_out, norm_groups))
            channels_in = channels_out
            if with_attn:
                self.attn.append(AttnBlock(channels_out, norm_groups))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (N,3,H,W) -> moments (N, 2*z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 z_channels: int, resolution: int, norm_groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)  # RGB in
        self.down = nn.ModuleList()
        channels = ch
        for level, mult in enumerate(ch_mult):
            level_res = resolution // 2 ** level  # side at a `resolution` input: decides attention
            stage = _Level(channels, ch * mult, num_res_blocks, level_res in attn_resolutions, norm_groups)
            channels = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(channels)
            self.down.append(stage)
        self.mid = _Mid(channels, norm_groups)
        self.norm_out = _group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, 2 * z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (N, z_channels, h, w) -> image (N,3,h*2^(L-1),w*2^(L-1))."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 z_channels: int, resolution: int, norm_groups: int = 32):
        super().__init__()
        channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels, norm_groups)
        levels: list[_Level | None] = [None] * len(ch_mult)
        for level in reversed(range(len(ch_mult))):  # built from the lowest resolution up
            stage = _Level(channels, ch * ch_mult[level], num_res_blocks + 1,
                           (resolution // 2 ** level) in attn_resolutions, norm_groups)
            channels = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(channels)
            levels[level] = stage
        self.up = nn.ModuleList(levels)  # indexed by level, 0 = full resolution, as upstream
        self.norm_out = _group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)  # RGB out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments (N, 2C, h, w) split along channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        # upstream DiagonalGaussianDistribution clamps logvar to [-30, 20]
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn with `generator` (which must live on the posterior's device)."""
        device = self.mean.device
        if generator is not None and generator.device.type != device.type:
            raise ReproError(f"the sampling generator is on {generator.device} but the posterior is on "
                             f"{device}: create it with torch.Generator(device={str(device)!r})")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The VA-VAE / LDM KL autoencoder (inference part). Official: ch 128, f16, 32 latent channels.

    `attn_resolutions` counts the feature-map side at a `resolution`-sized input (16 = the
    deepest level at 256), so the layout is the same whatever size the images really are.
    Kit options for other tokenizers (the defaults are the official layout): the downsampling factor is
    2^(len(ch_mult) - 1) (f4: 3 levels, f8: 4, f16: 5), and `norm_groups` (default 32, as upstream)
    lets widths below 32 (e.g. ch=16) use fewer GroupNorm groups; no parameter shapes depend on it.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), z_channels: int = 32, embed_dim: int = 32,
                 resolution: int = 256, norm_groups: int = 32):
        super().__init__()
        if norm_groups <= 0 or ch <= 0 or ch % norm_groups != 0:
            raise ConfigError(f"vae.ch={ch} is not a positive multiple of {norm_groups} (GroupNorm uses "
                              f"{norm_groups} groups); use 128 for the official VA-VAE, or a smaller norm_groups")
        layout = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                      attn_resolutions=tuple(attn_resolutions), z_channels=z_channels, resolution=resolution,
                      norm_groups=norm_groups)
        self.encoder = Encoder(**layout)
        self.decoder = Decoder(**layout)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsample_ratio = 2 ** (len(ch_mult) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (N,3,H,W) in [-1,1], H and W multiples of the downsample ratio -> posterior."""
        ratio = self.downsample_ratio
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % ratio or images.shape[3] % ratio:
            raise ReproError(f"VA-VAE encode expects images of shape (N, 3, H, W) with H and W multiples "
                             f"of {ratio}; got {tuple(images.shape)}: crop or resize the images first")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, embed_dim, h, w) -> images (N, 3, h*ratio, w*ratio), roughly in [-1,1]."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ReproError(f"VA-VAE decode expects latents of shape (N, {self.embed_dim}, h, w); "
                             f"got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------------------------------------
# Loading the official weights file


def extract_inference_state_dict(sd: dict) -> tuple[dict[str, torch.Tensor], int]:
    """Keep the inference tensors of a VA-VAE state dict; return them and how many were dropped.

    Accepts the Lightning-style `{"state_dict": {...}}` wrapper of the official file.
    """
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    kept = {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(INFERENCE_PREFIXES)}
    return kept, len(sd) - len(kept)


def _check_against_model(kept: dict, expected: dict[str, tuple], path: Path, ch: int) -> None:
    for key, value in kept.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    missing = [k for k in expected if k not in kept]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{path} lacks {len(missing)} VA-VAE inference tensor(s): {shown}; "
                              "is this the VA-VAE f16d32 file?")
    unexpected = [k for k in kept if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path} has VA-VAE tensor(s) this layout does not: {', '.join(unexpected[:5])}; "
                              "the file's ch_mult / num_res_blocks differ from the official f16d32 layout")
    for key, shape in expected.items():
        found = tuple(kept[key].shape)
        if found != tuple(shape):
            file_ch = kept.get("encoder.conv_in.weight", torch.empty(0)).shape[:1]
            file_hint = f"; the file has ch={file_ch[0]}" if file_ch else ""
            raise CheckpointError(f"{path}: {key} has shape {found}, expected {tuple(shape)} for vae.ch={ch}"
                                  f"{file_hint}; is vae.ch right? 128 for the official VA-VAE")


def load_frozen(build: Callable[[], AutoencoderKL], tensors: dict, check: Callable[[dict, dict], None],
                device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> AutoencoderKL:
    """The tail every tokenizer load shares (the official file here, a step-9 file in repro.tokenizer.loader):
    `build()` on the meta device (no random init of weights that are overwritten at once), `check(tensors,
    expected shapes)` raising a CheckpointError that names the file and the fix, a strict load, then the model
    on `device` (and `dtype`; None keeps the file's) in eval mode with frozen parameters (the tokenizer is fixed
    while the DiT trains)."""
    with torch.device("meta"):
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check(tensors, expected)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vavae(path: str | os.PathLike, ch: int = 128, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Build the VA-VAE, load the inference weights of `path` with strict=True, return it in eval mode.

    Parameters are frozen (requires_grad False): the tokenizer is fixed while the DiT trains.
    """
    path = Path(path)
    # Safe read (weights_only / safetensors), `state_dict` wrapper removed; the official file is a
    # Lightning-style checkpoint, so its run-metadata classes may be read as inert placeholders.
    raw = read_state_dict(path, metadata_placeholders=True)
    kept, dropped = extract_inference_state_dict(raw)
    model = load_frozen(lambda: AutoencoderKL(ch=ch), kept, lambda tensors, expected:
                        _check_against_model(tensors, expected, path, ch), device=device, dtype=dtype)
    if dropped:
        inner = raw["state_dict"] if isinstance(raw.get("state_dict"), dict) else raw
        groups = Counter(str(k).split(".")[0] for k in inner if k not in kept)
        detail = ", ".join(f"{name}.* x{n}" for name, n in sorted(groups.items()))
        print0(f"VA-VAE {path.name}: loaded {len(kept)} tensors, dropped {dropped} training-only ({detail})")
    return model
