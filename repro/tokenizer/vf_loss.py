"""VF loss: VA-VAE's alignment of the latent space with a frozen vision foundation model.

Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma with Visual Tokenizer
Aligned Diffusion Models" (VA-VAE); facts from hustvl/LightningDiT `vavae/ldm/modules/losses/
contperceptual.py`, `vavae/ldm/models/autoencoder.py` and `vavae/configs/f16d32_vfdinov2.yaml`:

- The sampled latent z (N, embed_dim, h, w) goes through a 1x1 conv to the foundation feature width
  (`reverse_proj: true`, the default: Conv2d(embed_dim, D, 1, bias=False), trained with the autoencoder).
  The foundation features f (N, D, h, w) come from the frozen model (DINOv2 ViT-L/14 patch tokens of the
  image resized to 224, so 16x16 for a 256 image at f16) without gradients.
- Margin cosine term: mean over (n, h, w) of relu(1 - cos_margin - cos(z'_nhw, f_nhw)), cosine along
  channels; zero once every position's cosine similarity exceeds 1 - cos_margin (upstream 0.5).
- Margin distance-matrix term: flatten to (N, C, h*w), unit-normalise along C, Gram matrices
  (N, hw, hw) of z' and of f, then mean relu(|G_z - G_f| - distmat_margin) (upstream 0.25).
- vf_loss = distmat_weight * distmat + cos_weight * cos (both 1.0).
- Weight: adaptive, like the GAN weight but at the encoder's last conv (encoder.conv_out.weight):
  vf_weight * clamp(|grad nll| / (|grad vf| + 1e-4), 0, 1e8), vf_weight = 0.1 (`adaptive_vf: true`);
  with `adaptive_vf: false` the weight is vf_weight itself.

    vf = VFLoss(embed_dim=32, feature_dim=1024)
    feats = foundation_features(dinov2, images, grid=z.shape[-2:])   # frozen, no grad
    terms = vf(z, feats)                                               # dict(loss, cos, distmat)
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro.tokenizer.discriminator import adaptive_weight

# upstream f16d32_vfdinov2.yaml / LPIPSWithDiscriminator defaults
COS_MARGIN = 0.5
DISTMAT_MARGIN = 0.25
VF_WEIGHT = 0.1
VF_ADAPTIVE_MAX = 1e8


def margin_cosine_loss(z: torch.Tensor, features: torch.Tensor, margin: float = COS_MARGIN) -> torch.Tensor:
    """mean relu(1 - margin - cos(z, f)) over all (n, h, w); cosine along channels. z, f (N, D, h, w)."""
    _check_pair(z, features)
    cos = F.cosine_similarity(features, z, dim=1)  # (N, h, w)
    return F.relu(1.0 - margin - cos).mean()


def margin_distmat_loss(z: torch.Tensor, features: torch.Tensor, margin: float = DISTMAT_MARGIN) -> torch.Tensor:
    """mean relu(|G_z - G_f| - margin), G = cosine-similarity matrix between positions (N, hw, hw)."""
    _check_pair(z, features)
    zn = F.normalize(z.flatten(2), dim=1)  # (N, D, hw), unit columns
    fn = F.normalize(features.flatten(2), dim=1)
    gram_z = torch.einsum("nci,ncj->nij", zn, zn)  # (N, hw, hw)
    gram_f = torch.einsum("nci,ncj->nij", fn, fn)
    return F.relu((gram_z - gram_f).abs() - margin).mean()


def _check_pair(z: torch.Tensor, features: torch.Tensor) -> None:
    if z.shape != features.shape:
        raise ValueError(f"VF loss needs the projected latent and the foundation features in the same shape; "
                         f"got {tuple(z.shape)} and {tuple(features.shape)} (project z, resize the features)")


class VFLoss(nn.Module):
    """The trainable projection z -> D and the two margin terms (upstream `reverse_proj: true`)."""

    def __init__(self, embed_dim: int, feature_dim: int, cos_margin: float = COS_MARGIN,
                 distmat_margin: float = DISTMAT_MARGIN, cos_weight: float = 1.0, distmat_weight: float = 1.0):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, feature_dim, kernel_size=1, bias=False)
        self.cos_margin, self.distmat_margin = cos_margin, distmat_margin
        self.cos_weight, self.distmat_weight = cos_weight, distmat_weight

    def forward(self, z: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """z (N, embed_dim, h, w) sampled latents, features (N, D, h, w) frozen -> dict(loss, cos, distmat)."""
        projected = self.proj(z)  # (N, D, h, w)
        features = features.detach()
        cos = margin_cosine_loss(projected, features, self.cos_margin)
        distmat = margin_distmat_loss(projected, features, self.distmat_margin)
        return {"loss": self.distmat_weight * distmat + self.cos_weight * cos, "cos": cos, "distmat": distmat}


def vf_weight(nll_loss: torch.Tensor, vf_loss: torch.Tensor, encoder_last_layer: torch.Tensor,
              weight: float = VF_WEIGHT, adaptive: bool = True) -> torch.Tensor | float:
    """The VF loss's weight: adaptive (gradient-norm ratio at encoder.conv_out.weight, max 1e8) or fixed."""
    if not adaptive:
        return weight
    return adaptive_weight(nll_loss, vf_loss, encoder_last_layer, scale=weight, max_value=VF_ADAPTIVE_MAX)


@torch.no_grad()
def foundation_features(network: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        grid: Sequence[int], input_size: Optional[int] = None) -> torch.Tensor:
    """Frozen features (N, D, *grid) of images (N,3,H,W) in [-1,1].

    `network` maps images to a (N, D, h', w') map (e.g. DINOv2 patch tokens reshaped). `input_size`, if
    given, resizes the images first (upstream: bilinear to 224 for DINOv2). Upstream hands DINOv2 the
    [-1,1] images as they are (no ImageNet mean/std normalisation); so does this function. Where the map's grid differs
    from the latent grid (small images, other downsampling factors), it is resized bilinearly to `grid`:
    a kit extension; upstream's f16 at 256 gives matching 16x16 grids.
    """
    if input_size is not None and tuple(images.shape[-2:]) != (input_size, input_size):
        images = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False)
    feats = network(images)
    if feats.ndim != 4:
        raise ValueError(f"the foundation network must return (N, D, h, w) feature maps; got {tuple(feats.shape)}")
    if tuple(feats.shape[-2:]) != tuple(grid):
        feats = F.interpolate(feats, size=tuple(grid), mode="bilinear", align_corners=False)
    return feats.float()


class FrozenFeatureNet(nn.Module):
    """Wraps a feature network so it is frozen and always in eval mode (it never trains with the VAE)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrozenFeatureNet":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


class TokenGridFeatures(nn.Module):
    """ViT tokens (N, prefix + s*s, D) -> frozen feature map (N, D, s, s), as upstream reads DINOv2.

    `network(images)` must return the final normalised tokens (timm: `forward_features`); the first
    `prefix_tokens` (upstream DINOv2: 1, the class token) are dropped, the rest form the patch grid.
    """

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], prefix_tokens: int = 1):
        super().__init__()
        self.network = network
        self.prefix_tokens = prefix_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.network(images)[:, self.prefix_tokens:]  # (N, s*s, D)
        n, count, dim = tokens.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} patch tokens do not form a square grid; is prefix_tokens "
                             f"({self.prefix_tokens}) right for this network?")
        return tokens.transpose(1, 2).reshape(n, dim, side, side)
