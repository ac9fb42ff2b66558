"""VFM-VAE tokenizer (f16d32, frozen SigLIP2 encoder): encode and decode, checkpoint-exact.

The model of tianciB/VFM-VAE ("Vision Foundation Models Can Be Good Tokenizers for Latent Diffusion Models",
arXiv 2510.18457), written for the kit from its published architecture and the official checkpoint's state-dict
names and shapes; no upstream code is reused (upstream is NVIDIA Non-Commercial licensed, see NOTICE).

    encoder: images x2 (bilinear) -> frozen SigLIP2 vision tower (transformers) -> features of layers
             [0, 12, -1] -> per-layer attention projection 1024 -> 64 + pixel-unshuffle to 1/16 ->
             attention projection 768 -> 2 * 32 = posterior mean and log-variance (N, 32, 16, 16)
    decoder: attention projection 32 -> 512 per latent pixel; its global average -> mapping MLP -> style w;
             six x2 blocks (8 .. 256 px) of blur upsampling, ConvNeXt layers modulated by w, self-attention,
             with the latent concatenated (unshuffled/shuffled) at blocks 0-3; toRGB of the summed skips

The architecture is upstream's `G_kwargs` (configs/vfm_vae_f16d32_siglip2_stage_*.yaml) read key by key by
`check_g_kwargs`; a value the kit does not implement is refused. `OFFICIAL_G_KWARGS` is the official f16d32.
Loading (checkpoint, SigLIP2 weights): `repro.tokenizer.vfm_vae_load`.

    vae = load_vfm_vae("vfm_vae_f16d32_...legacy.pth", with_encoder=False)   # decode only: no SigLIP needed
    images = vae.decode(z)                    # z (N,32,16,16) -> (N,3,256,256) in about [-1,1]
    post = vae.encode(images)                 # images in [-1,1]; post.mean / .logvar / .sample(generator)
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repro.errors import ConfigError, ReproError
from repro.tokenizer.vavae import DiagonalGaussian
from repro.tokenizer.vfm_vae_blocks import ScaledLinear, SynthesisBlock, concat_z_branch

# google/siglip2-large-patch16-512's vision tower (its config.json on the Hugging Face hub)
SIGLIP2_LARGE_512 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "num_channels": 3, "image_size": 512, "patch_size": 16,
                     "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0}

# G_kwargs of the official f16d32 stage-3 YAML, plus the keys upstream's tools set before building
# (img_resolution 256, conditional False, label_type cls2text); vfm_name names the hub repository.
OFFICIAL_G_KWARGS: dict[str, Any] = {
    "vfm_name": "google/siglip2-large-patch16-512", "scale_factor": 2.0,
    "patch_from_layers": [0, 12, -1], "patch_in_dimensions": [1024, 1024, 1024], "patch_out_dimensions": [64, 64, 64],
    "compression_mode": "continuous", "how_to_compress": "attnproj", "how_to_decompress": "attnproj",
    "decompress_factor": 16, "attnproj_quant_layers": 1, "attnproj_post_quant_layers": 1,
    "resolution_compression_factor": 16, "z_dimension": 32, "z_pooled_resolution": 1, "z_dim_for_mapping_mlp_output": 512,
    "concat_z_block_indices": [0, 1, 2, 3], "concat_z_mapped_dims": [512, 256, 128, 128],
    "how_to_process_concat_z": "unshuffle", "activation_for_concat_z": "lrelu",
    "attn_block_indices": [0, 1, 2], "attn_depths": [2, 2, 2], "use_self_attn": True, "use_cross_attn": False,
    "use_convnext": True, "use_gaussian_blur": True, "add_additional_convnext": True,
    "num_blocks": 6, "num_fp16_res": 3, "img_channels": 3, "img_resolution": 256, "legacy": True,
    "synthesis_kwargs": {"channel_base": 32768, "channel_max": 512, "num_res_blocks": 2, "architecture": "skip"},
    "conditional": False, "label_type": "cls2text",
}

# keys with a fixed value the kit implements (anything else is refused, never ignored)
_FIXED = {"compression_mode": "continuous", "how_to_compress": "attnproj", "how_to_decompress": "attnproj",
          "how_to_process_concat_z": "unshuffle", "activation_for_concat_z": "lrelu", "use_cross_attn": False,
          "use_convnext": True, "conditional": False, "use_multiscale_output": True, "img_channels": 3}
# keys read into the architecture (with their defaults where upstream's Generator has one)
_ARCH_DEFAULTS = {"scale_factor": None, "patch_from_layers": None, "patch_in_dimensions": None,
                  "patch_out_dimensions": None, "decompress_factor": None, "attnproj_quant_layers": 1,
                  "attnproj_post_quant_layers": 1, "resolution_compression_factor": 16, "z_dimension": 32,
                  "z_pooled_resolution": 1, "z_dim_for_mapping_mlp_output": 128, "concat_z_block_indices": [],
                  "concat_z_mapped_dims": [], "attn_block_indices": [], "attn_depths": [], "use_self_attn": True,
                  "use_gaussian_blur": True, "add_additional_convnext": True, "num_blocks": 6, "num_fp16_res": 3,
                  "img_resolution": 256, "legacy": False, "synthesis_kwargs": {},
                  "vfm_name": "google/siglip2-large-patch16-512"}  # kit: names the tower; its config comes separately
# keys that only shape training (losses, trainable layers, augmentations) or the discrete mode, or that only
# name the run; they have no effect on encode/decode in the continuous mode
_NO_EFFECT = {"class_name", "label_type", "label_dim", "distmat_margin", "cos_margin", "distmat_weight", "cos_weight",
              "use_kl_loss", "use_vf_loss", "use_adaptive_vf_loss", "use_equivariance_regularization",
              "equivariance_regularization_p_prior", "equivariance_regularization_p_prior_scale", "train_mode",
              "conv_clamp", "vocab_width", "vocab_size", "vocab_beta", "use_entropy_loss", "entropy_temp",
              "num_codebooks"}
_SYNTHESIS_KEYS = {"channel_base": 32768, "channel_max": 512, "num_res_blocks": 3, "architecture": "skip"}


def check_g_kwargs(g_kwargs: dict[str, Any], where: str = "G_kwargs") -> dict[str, Any]:
    """Upstream's G_kwargs -> the kit's architecture dict (defaults filled); a ConfigError names a key the kit
    does not know or a value it does not implement."""
    out: dict[str, Any] = {}
    for key, value in g_kwargs.items():
        if key in _FIXED:
            if value != _FIXED[key]:
                raise ConfigError(f"{where}: {key}={value!r} is not implemented by the kit's VFM-VAE "
                                  f"(only {_FIXED[key]!r}, the official f16d32 value)")
        elif key not in _ARCH_DEFAULTS and key not in _NO_EFFECT:
            raise ConfigError(f"{where}: unknown key {key!r} for the VFM-VAE generator")
    for key, default in _ARCH_DEFAULTS.items():
        value = g_kwargs.get(key, default)
        if value is None:
            raise ConfigError(f"{where}: key {key!r} is missing (upstream's Generator has no default for it)")
        out[key] = copy.deepcopy(value)
    synth = dict(out["synthesis_kwargs"])
    unknown = sorted(set(synth) - set(_SYNTHESIS_KEYS))
    if unknown:
        raise ConfigError(f"{where}: synthesis_kwargs.{unknown[0]} is not implemented by the kit's VFM-VAE")
    synth = {k: synth.get(k, d) for k, d in _SYNTHESIS_KEYS.items()}
    if synth["architecture"] != "skip":
        raise ConfigError(f"{where}: synthesis_kwargs.architecture={synth['architecture']!r}; the kit implements 'skip'")
    out["synthesis_kwargs"] = synth
    if 0 not in out["concat_z_block_indices"]:
        raise ConfigError(f"{where}: concat_z_block_indices must include 0 (the kit has no Fourier-feature input layer)")
    if len(out["concat_z_mapped_dims"]) <= max(out["concat_z_block_indices"]):
        raise ConfigError(f"{where}: concat_z_mapped_dims needs an entry for every block index in concat_z_block_indices")
    if len(out["attn_depths"]) != len(out["attn_block_indices"]):
        raise ConfigError(f"{where}: attn_depths and attn_block_indices differ in length")
    return out


def block_channels(arch: dict[str, Any]) -> list[int]:
    """Channels per decoder block: channel_base / (side scaled to 256 px), at most channel_max."""
    synth, res, n = arch["synthesis_kwargs"], arch["img_resolution"], arch["num_blocks"]
    scale = res / 256
    sides = [res // 2 ** (n - 1) * 2 ** i for i in range(n)]
    return [min(synth["channel_base"] // int(side / scale), synth["channel_max"]) for side in sides]


class LayerNormTimm(nn.LayerNorm):
    """LayerNorm with eps 1e-6 (timm's default, used inside the projection MLP)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)


class ProjAttention(nn.Module):
    """Attention whose output width differs from its input (UniTok's projection attention): narrowing averages the
    heads (then pools to the width if needed), widening concatenates them; no key bias."""

    def __init__(self, cin: int, cout: int, heads: int):
        super().__init__()
        width = max(cin, cout)
        self.cin, self.cout, self.heads, self.head_dim = cin, cout, heads, width // heads
        self.qkv = nn.Linear(cin, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        if self.cin > self.cout:
            out = out.mean(dim=1)
            if self.head_dim != self.cout:
                out = F.adaptive_avg_pool1d(out, self.cout)
        else:
            out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class GeGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = LayerNormTimm(dim)
        self.act = nn.GELU(approximate="tanh")
        self.w0, self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(self.act(self.w0(x)) * self.w1(x))


class ProjBlock(nn.Module):
    """x -> linear(norm(x)) + attention(norm(x)), then + GeGLU MLP (ratio 2) on the new width."""

    def __init__(self, cin: int, cout: int, heads: int):
        super().__init__()
        self.norm1, self.norm3, self.norm2 = nn.LayerNorm(cin), nn.LayerNorm(cin), nn.LayerNorm(cout)
        self.attn = ProjAttention(cin, cout, heads)
        self.proj = nn.Linear(cin, cout)
        self.mlp = GeGLU(cout, 2 * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttnProjection(nn.Module):
    """A stack of ProjBlocks; compressing stacks change width in the last block, expanding ones in the first."""

    def __init__(self, cin: int, cout: int, layers: int, compress: bool):
        super().__init__()
        heads = max(1, cin // cout) if compress else max(1, cout // cin)
        widths = ([(cin, cin)] * (layers - 1) + [(cin, cout)]) if compress else ([(cin, cout)] + [(cout, cout)] * (layers - 1))
        self.blocks = nn.ModuleList(ProjBlock(a, b, heads) for a, b in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class LatentAdapter(nn.Module):
    """SigLIP features -> posterior moments (encode) and latent -> decoder features (decode)."""

    def __init__(self, arch: dict[str, Any], patch_side: int, z_side: int):
        super().__init__()
        self.patch_side, self.z_side = patch_side, z_side
        self.factor = patch_side // z_side
        self.patch_quants = nn.ModuleList(
            nn.Sequential(AttnProjection(cin, cout, arch["attnproj_quant_layers"], compress=True))
            for cin, cout in zip(arch["patch_in_dimensions"], arch["patch_out_dimensions"]))
        total = sum(c * self.factor ** 2 for c in arch["patch_out_dimensions"])
        self.final_quant = AttnProjection(total, 2 * arch["z_dimension"], arch["attnproj_quant_layers"], compress=True)
        self.post_quant = AttnProjection(arch["z_dimension"], arch["z_dimension"] * arch["decompress_factor"],
                                         arch["attnproj_post_quant_layers"], compress=False)

    def moments(self, features: list[torch.Tensor]) -> torch.Tensor:
        parts = []
        for x, quant in zip(features, self.patch_quants):
            x = quant(x)  # (N, side*side, d) tokens in row-major order
            if self.factor > 1:
                n, _, d = x.shape
                x = F.pixel_unshuffle(x.transpose(1, 2).reshape(n, d, self.patch_side, self.patch_side), self.factor)
                x = x.flatten(2).transpose(1, 2)
            parts.append(x)
        x = self.final_quant(torch.cat(parts, dim=-1))
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.z_side, self.z_side)

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        n, _, h, w = z.shape
        x = self.post_quant(z.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(n, -1, h, w)


class Mapping(nn.Module):
    """Style network: 2nd-moment-normalized pooled latent -> LeakyReLU MLP (lr multiplier 0.01) -> w."""

    def __init__(self, cin: int, cout: int, layers: int = 2):
        super().__init__()
        self.mlp = nn.Module()
        widths = [cin] * layers + [cout]
        for i in range(layers):
            setattr(self.mlp, f"fc{i}", ScaledLinear(widths[i], widths[i + 1], lr_mul=0.01,
                                                     activation="linear" if i == layers - 1 else "lrelu"))
        self.layers = layers
        self.register_buffer("x_avg", torch.zeros(cout))  # training-time running average (truncation); unused here

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.layers):
            x = getattr(self.mlp, f"fc{i}")(x)
        return x


class Synthesis(nn.Module):
    def __init__(self, arch: dict[str, Any], z_channels: int, z_side: int, w_dim: int):
        super().__init__()
        n, res = arch["num_blocks"], arch["img_resolution"]
        synth = arch["synthesis_kwargs"]
        channels = block_channels(arch)
        sides = [res // 2 ** (n - 1) * 2 ** i for i in range(n)]
        self.concat = list(arch["concat_z_block_indices"])
        self.fp16_start = n - arch["num_fp16_res"]
        self.z_convs = nn.ModuleDict({str(i): concat_z_branch(z_channels, z_side, sides[i], arch["concat_z_mapped_dims"][i])
                                      for i in self.concat})
        depth = dict(zip(arch["attn_block_indices"], arch["attn_depths"])) if arch["use_self_attn"] else {}
        self.blocks = nn.ModuleDict()
        for i in range(n):
            cin = (channels[i - 1] if i else 0) + (arch["concat_z_mapped_dims"][i] if i in self.concat else 0)
            self.blocks[str(i)] = SynthesisBlock(
                i, cin, channels[i], channels[i - 1] if i else None, w_dim, img_channels=3,
                num_res_blocks=synth["num_res_blocks"], attn_depth=depth.get(i, 0), blur=arch["use_gaussian_blur"],
                extra_convnext=arch["add_additional_convnext"], legacy=arch["legacy"])

    def forward(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = x_sum = img = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks.values()):
            # kit option `num_fp16_res`: the highest-resolution blocks in float16 on CUDA, as upstream trains
            half = z.device.type == "cuda" and i >= self.fp16_start
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                if i in self.concat:
                    zc = self.z_convs[str(i)](z)
                    x = zc if x is None else torch.cat([x, zc], dim=1)
                x = x.to(torch.float16 if half else torch.float32)
                x, x_sum, img = block(x, x_sum, w, last=i == last)
                x = x.to(torch.float16 if half else torch.float32)
        return img


class SiglipFeatures(nn.Module):
    """The frozen SigLIP2 vision tower (transformers) and the layers the adapter reads.

    The tower sits at `vision_model.vision_model` so the state-dict names are the checkpoint's (transformers 4.x
    named SiglipVisionModel's inner transformer `vision_model`; 5.x flattened it, so the kit adds the level)."""

    def __init__(self, siglip_config: dict[str, Any], layers: list[int], scale_factor: float):
        super().__init__()
        try:
            from transformers import SiglipVisionConfig, SiglipVisionModel
        except ImportError:
            from repro.errors import ConfigError

            raise ConfigError("vae.model_name vfm_vae_f16d32 builds its SigLIP2 encoder with transformers: pip install "
                              "'repro-latent-kit[vfm-vae]' (or pip install 'transformers>=4.50')") from None
        tower = SiglipVisionModel(SiglipVisionConfig(**siglip_config))
        tower = getattr(tower, "vision_model", tower)  # transformers 4.x: the inner transformer
        self.vision_model = nn.Module()
        self.vision_model.vision_model = tower
        self.layers, self.scale_factor = list(layers), float(scale_factor)
        self.patch_size = int(siglip_config["patch_size"])
        self.precision = "fp32"  # kit option "bf16": upstream's CUDA setting (autocast), which moves latents

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images + 1) / 2  # upstream resizes [0, 1] images, then normalizes with mean = std = 0.5
        if self.scale_factor != 1.0:
            x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False,
                              antialias=self.scale_factor < 1.0)
        x = (x - 0.5) / 0.5
        bf16 = self.precision == "bf16" and x.device.type == "cuda"
        tower = self.vision_model.vision_model
        n_layers = len(tower.encoder.layers)
        # upstream's layer index: 0 the embeddings, k the output of layer k, -1 after the final LayerNorm, -k the
        # output of layer n - k + 2. Read with hooks: transformers 5 changed what hidden_states[-1] holds.
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for i in self.layers:
            if i == -1:
                continue
            layer = i if i >= 0 else n_layers + i + 2
            module = tower.embeddings if layer == 0 else tower.encoder.layers[layer - 1]
            hooks.append(module.register_forward_hook(
                lambda _m, _inp, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                last = tower(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        return [(last if i == -1 else captured[i]).float() for i in self.layers]


class VFMVAE(nn.Module):
    """The generator's inference part under the checkpoint's names: `vfm_encoder` (absent when built for decoding
    only), `ldm_adapter`, `mapping`, `synthesis`."""

    def __init__(self, g_kwargs: dict[str, Any] = OFFICIAL_G_KWARGS, *, siglip_config: dict[str, Any] | None = None,
                 with_encoder: bool = True):
        super().__init__()
        arch = check_g_kwargs(g_kwargs)
        self.arch = arch
        siglip_config = dict(siglip_config or SIGLIP2_LARGE_512)
        patch = int(siglip_config["patch_size"])
        side = arch["img_resolution"] * arch["scale_factor"]
        if side % patch:
            raise ConfigError(f"img_resolution x scale_factor = {side:g} is not a multiple of the SigLIP patch size {patch}")
        self.img_resolution = arch["img_resolution"]
        self.z_side = arch["img_resolution"] // arch["resolution_compression_factor"]
        self.embed_dim = arch["z_dimension"]
        self.downsample_ratio = arch["resolution_compression_factor"]
        if with_encoder:
            self.vfm_encoder = nn.Module()
            self.vfm_encoder.encoder = SiglipFeatures(siglip_config, arch["patch_from_layers"], arch["scale_factor"])
        self.ldm_adapter = LatentAdapter(arch, int(side // patch), self.z_side)
        z_wide = arch["z_dimension"] * arch["decompress_factor"]
        self.mapping = Mapping(z_wide * arch["z_pooled_resolution"] ** 2, arch["z_dim_for_mapping_mlp_output"])
        self.synthesis = Synthesis(arch, z_wide, self.z_side, arch["z_dim_for_mapping_mlp_output"])

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "vfm_encoder")

    def set_fp16_blocks(self, num_fp16_res: int) -> None:
        """Run the `num_fp16_res` highest-resolution decoder blocks in float16 on CUDA (upstream's training
        setting; its decode tools use 0, the kit's default)."""
        self.synthesis.fp16_start = len(self.synthesis.blocks) - int(num_fp16_res)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (N,3,S,S) in [-1,1], S = img_resolution -> posterior over (N, z_dimension, S/16, S/16)."""
        if not self.has_encoder:
            raise ReproError("this VFM-VAE was loaded for decoding only (with_encoder=False); load it with "
                             "with_encoder=True (needs the SigLIP2 weights) to encode images")
        s = self.img_resolution
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ReproError(f"VFM-VAE encode expects images of shape (N, 3, {s}, {s}); got {tuple(images.shape)}: "
                             "crop or resize the images first")
        features = self.vfm_encoder.encoder(images.float())
        return DiagonalGaussian(self.ldm_adapter.moments(features))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, z_dimension, h, w) -> images (N, 3, 16h, 16w), about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim or tuple(z.shape[2:]) != (self.z_side, self.z_side):
            raise ReproError(f"VFM-VAE decode expects latents of shape (N, {self.embed_dim}, {self.z_side}, "
                             f"{self.z_side}); got {tuple(z.shape)}")
        wide = self.ldm_adapter.decompress(z.float())
        pooled = F.adaptive_avg_pool2d(wide, self.arch["z_pooled_resolution"]).flatten(1)
        return self.synthesis(wide, self.mapping(pooled))


def parameter_count(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
