"""The tokenizer's training objective: reconstruction + KL + LPIPS + PatchGAN + VF, as VA-VAE trains it.

Upstream: hustvl/LightningDiT `vavae/ldm/modules/losses/contperceptual.py` (`LPIPSWithDiscriminator`,
after LDM/taming) with `vavae/configs/f16d32_vfdinov2.yaml`. Reductions follow upstream exactly, because
the weights (kl_weight 1e-6, ...) only mean something with them:

- rec (N,3,H,W) = |x - x_rec| (or squared, the kit's `mse` option) + perceptual_weight * LPIPS(x, x_rec)
  broadcast over every pixel (so LPIPS counts 3*H*W times in the sum, as upstream);
- nll = sum(rec) / N. Upstream divides by exp(logvar) and adds logvar, but VA-VAE never gives that
  parameter to an optimiser, so it stays 0 and nll = rec: it is left out here;
- kl = sum over (C, h, w) of 0.5 * (mu^2 + var - 1 - logvar), averaged over the batch (LDM);
- loss = nll + kl_weight * kl + d_weight * disc_factor * g_loss + vf_weight * vf_loss, where d_weight and
  vf_weight are the adaptive gradient-norm ratios (see `discriminator.py`, `vf_loss.py`).

    loss_fn = TokenizerLoss(TokenizerLossConfig(), lpips=build_lpips(...), discriminator=NLayerDiscriminator(),
                            vf=VFLoss(embed_dim, 1024))
    loss, log = loss_fn.autoencoder_loss(x, x_rec, posterior, step, vae.decoder.conv_out.weight,
                                         z=z, features=feats, encoder_last_layer=vae.encoder.conv_out.weight)
    d_loss, d_log = loss_fn.discriminator_loss(x, x_rec, step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from repro.errors import ConfigError
from repro.tokenizer.discriminator import (D_LOSSES, adaptive_weight, disc_factor, discriminator_step_loss,
                                           generator_loss)
from repro.tokenizer.vf_loss import COS_MARGIN, DISTMAT_MARGIN, VF_WEIGHT, VFLoss, vf_weight

REC_LOSSES = ("l1", "mse")


def kl_divergence(posterior) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) per sample (N,), summed over (C, h, w) (LDM DiagonalGaussianDistribution.kl).

    `posterior` has `.mean` and `.logvar` (the clamped logvar), e.g. AutoencoderKL.encode(x).
    """
    terms = posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar  # (N, C, h, w)
    return 0.5 * terms.sum(dim=(1, 2, 3))


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element reconstruction error (N,3,H,W): |x - x_rec| (upstream) or (x - x_rec)^2."""
    if kind == "l1":
        return (images - reconstructions).abs()
    if kind == "mse":
        return (images - reconstructions).pow(2)
    raise ConfigError(f"unknown reconstruction loss '{kind}'; choose one of {', '.join(REC_LOSSES)}")


@dataclass
class TokenizerLossConfig:
    """Weights of the tokenizer objective; defaults are upstream VA-VAE f16d32_vfdinov2.yaml."""

    rec_loss: str = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0  # used only when an LPIPS module is given
    disc_start: int = 5001
    disc_weight: float = 0.5  # scale of the adaptive GAN weight
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    vf_weight: float = VF_WEIGHT
    adaptive_vf: bool = True
    cos_margin: float = COS_MARGIN
    distmat_margin: float = DISTMAT_MARGIN

    def __post_init__(self) -> None:
        if self.rec_loss not in REC_LOSSES:
            raise ConfigError(f"rec_loss '{self.rec_loss}' is not one of {', '.join(REC_LOSSES)}")
        if self.disc_loss not in D_LOSSES:
            raise ConfigError(f"disc_loss '{self.disc_loss}' is not one of {', '.join(D_LOSSES)}")


class TokenizerLoss(nn.Module):
    """The VA-VAE objective with optional parts: LPIPS (None = off), PatchGAN (None = off), VF (None = off).

    Holds the discriminator and the VF projection (both trained: the projection with the autoencoder's
    optimiser, the discriminator with its own), never the frozen LPIPS or foundation network's gradients.
    """

    def __init__(self, config: Optional[TokenizerLossConfig] = None, lpips: Optional[nn.Module] = None,
                 discriminator: Optional[nn.Module] = None, vf: Optional[VFLoss] = None):
        super().__init__()
        self.config = config or TokenizerLossConfig()
        self.lpips = lpips
        self.discriminator = discriminator
        self.vf = vf

    def autoencoder_loss(self, images: torch.Tensor, reconstructions: torch.Tensor, posterior, global_step: int,
                         decoder_last_layer: Optional[torch.Tensor] = None, *, z: Optional[torch.Tensor] = None,
                         features: Optional[torch.Tensor] = None,
                         encoder_last_layer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """The autoencoder's loss for one step (taming's optimizer_idx == 0 branch) and a log of floats.

        images, reconstructions (N,3,H,W) in [-1,1]; posterior from encode(images); z the sampled latent
        that was decoded (needed with VF); features (N, D, h, w) frozen foundation features (with VF);
        decoder_last_layer = vae.decoder.conv_out.weight (with the GAN), encoder_last_layer =
        vae.encoder.conv_out.weight (with adaptive VF).
        """
        cfg = self.config
        n = images.shape[0]
        # Pixel reconstruction plus LPIPS, summed per image and averaged over the batch, then the KL term:
        # the VAE's negative ELBO as taming writes it (a sum over pixels, so the weights keep their meaning).
        rec = reconstruction_loss(images, reconstructions, cfg.rec_loss)  # (N,3,H,W)
        log: dict[str, float] = {"rec_loss": rec.detach().mean().item()}
        if self.lpips is not None and cfg.perceptual_weight > 0:
            p_loss = self.lpips(images, reconstructions).view(n, 1, 1, 1)  # broadcast over pixels, as upstream
            rec = rec + cfg.perceptual_weight * p_loss
            log["p_loss"] = p_loss.detach().mean().item()
        nll = rec.sum() / n
        kl = kl_divergence(posterior).sum() / n
        loss = nll + cfg.kl_weight * kl
        log.update(nll_loss=nll.item(), kl_loss=kl.item())

        # The generator's GAN term, off until disc_start; its weight balances the gradient norms of the
        # NLL and the GAN term at the decoder's last layer, so neither dominates whatever their scales.
        factor = disc_factor(global_step, cfg.disc_start, cfg.disc_factor) if self.discriminator is not None else 0.0
        if factor > 0:
            if decoder_last_layer is None:
                raise ValueError("the GAN term needs decoder_last_layer (vae.decoder.conv_out.weight)")
            g_loss = generator_loss(self.discriminator(reconstructions))
            d_weight = adaptive_weight(nll, g_loss, decoder_last_layer, scale=cfg.disc_weight)
            loss = loss + d_weight * factor * g_loss
            log.update(g_loss=g_loss.item(), d_weight=float(d_weight))
        log["disc_factor"] = factor

        # VA-VAE's vision-foundation alignment of the latent (margin cosine + distance matrix), weighted the
        # same adaptive way at the encoder's last layer when adaptive_vf is on.
        if self.vf is not None:
            if z is None or features is None:
                raise ValueError("the VF loss needs z (the decoded latent) and the frozen features")
            terms = self.vf(z, features)
            if cfg.adaptive_vf and encoder_last_layer is None:
                raise ValueError("the adaptive VF weight needs encoder_last_layer (vae.encoder.conv_out.weight)")
            weight = vf_weight(nll, terms["loss"], encoder_last_layer, cfg.vf_weight, cfg.adaptive_vf)
            loss = loss + weight * terms["loss"]
            log.update(vf_loss=terms["loss"].item(), vf_cos=terms["cos"].item(),
                       vf_distmat=terms["distmat"].item(), vf_weight=float(weight))
        log["total_loss"] = loss.item()
        return loss, log

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss (0 before disc_start, as upstream); inputs are detached."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss called on a TokenizerLoss without a discriminator")
        cfg = self.config
        return discriminator_step_loss(self.discriminator, images, reconstructions, global_step, cfg.disc_start,
                                       cfg.disc_factor, cfg.disc_loss)

    def gan_active(self, global_step: int) -> bool:
        """Whether this step trains the discriminator (so the caller can skip its optimiser before disc_start)."""
        return self.discriminator is not None and disc_factor(global_step, self.config.disc_start,
                                                              self.config.disc_factor) > 0
