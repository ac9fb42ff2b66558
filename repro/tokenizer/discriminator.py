"""PatchGAN discriminator and the adversarial terms of the VA-VAE / LDM tokenizer loss.

Facts from taming-transformers (`modules/discriminator/model.py`, `modules/losses/vqperceptual.py`,
`LPIPSWithDiscriminator`), which upstream VA-VAE's `vavae/ldm/modules/losses/contperceptual.py` uses
unchanged in its GAN part:

- NLayerDiscriminator (pix2pix PatchGAN): 4x4 convs with padding 1; the first has a bias and no norm,
  the middle ones are bias-free + BatchNorm, LeakyReLU(0.2) after each but the last; channel multiplier
  min(2^n, 8); the last two convs have stride 1 and the final one outputs one logit per patch.
  Init (`weights_init`): conv weights N(0, 0.02) (biases keep PyTorch's default), BatchNorm weight
  N(1, 0.02) and bias 0.
- Discriminator losses: hinge 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) (upstream default),
  vanilla 0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))). Generator loss -mean D(x_rec).
- Adaptive weight: |grad_W nll| / (|grad_W g| + 1e-4), clamped to [0, 1e4], detached, times
  `disc_weight` (VA-VAE f16d32 config: 0.5), W = the decoder's last conv weight.
- `disc_start` gating (`adopt_weight`): the GAN factor is 0 while global_step < disc_start (VA-VAE: 5001).

    disc = NLayerDiscriminator()                  # (N,3,H,W) -> (N,1,H/8-2,W/8-2) logits for n_layers=3
    d_loss = disc_factor(step, 5001) * hinge_d_loss(disc(x), disc(x_rec.detach()))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN of pix2pix/taming: `n_layers` stride-2 convs, then two stride-1 convs (the last -> 1 logit)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the n_layers-th conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)  # same indices, so the same state-dict keys, as taming
        self.apply(init_discriminator_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, input_nc, H, W) -> (N, 1, h, w) patch logits."""
        return self.main(images)


def init_discriminator_weights(module: nn.Module) -> None:
    # taming `weights_init`: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E relu(1 - D(real)) + E relu(1 + D(fake))); a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E softplus(-D(real)) + E softplus(D(fake))): the non-saturating BCE form; a scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E D(reconstruction): the generator term for both d-losses, as taming."""
    return -logits_fake.mean()


def disc_factor(global_step: int, disc_start: int, factor: float = 1.0) -> float:
    """`factor` once global_step >= disc_start, else 0 (taming `adopt_weight`)."""
    return factor if global_step >= disc_start else 0.0


def adaptive_weight(nll_loss: torch.Tensor, other_loss: torch.Tensor, last_layer: torch.Tensor,
                    scale: float, max_value: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """scale * clamp(|d nll / d W| / (|d other / d W| + eps), 0, max_value), detached (a 0-d tensor).

    Balances a second loss against the reconstruction at layer W (taming's
    `calculate_adaptive_weight`: W = decoder.conv_out.weight, max 1e4; VA-VAE reuses it for the VF loss
    with W = encoder.conv_out.weight and max 1e8). Both losses must still have their graphs.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    other_grad = torch.autograd.grad(other_loss, last_layer, retain_graph=True)[0]
    ratio = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(other_grad) + eps)
    return torch.clamp(ratio, 0.0, max_value).detach() * scale


def discriminator_step_loss(discriminator: nn.Module, real: torch.Tensor, reconstruction: torch.Tensor,
                            global_step: int, disc_start: int, factor: float = 1.0,
                            loss: str = "hinge") -> tuple[torch.Tensor, dict]:
    """The discriminator's loss for one step (taming's optimizer_idx == 1 branch) and its log.

    Inputs are detached here, so the autoencoder gets no gradient from this loss.
    """
    if loss not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss '{loss}'; choose one of {', '.join(D_LOSSES)}")
    logits_real = discriminator(real.detach())
    logits_fake = discriminator(reconstruction.detach())
    weight = disc_factor(global_step, disc_start, factor)
    d_loss = weight * D_LOSSES[loss](logits_real, logits_fake)
    log = {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
           "logits_fake": logits_fake.detach().mean()}
    return d_loss, log
