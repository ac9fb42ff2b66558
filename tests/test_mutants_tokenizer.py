"""Tokenizer objective and schedule with non-trivial parameters: a perceptual weight that is not 1 with an
LPIPS that is not 0, a warm-up that is not 0 (digits_f4 uses 100), and the step the discriminator starts.

Expected values are written out by hand from the documented formulas (repro/tokenizer/losses.py docstring):
rec = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec) broadcast over every pixel, nll = sum(rec) / N;
the GAN terms are on from global_step >= disc_start (taming's adopt_weight); the learning rate of 1-based
optimizer step s is lr * min(1, s / warmup) (times the cosine factor), so step 1 already trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from repro.tokenizer.discriminator import NLayerDiscriminator, generator_loss, hinge_d_loss
from repro.tokenizer.losses import TokenizerLoss, TokenizerLossConfig, kl_divergence
from repro.tokenizer.lpips import LPIPS
from repro.tokenizer.vavae import AutoencoderKL
# lr_factor: the learning-rate schedule, beside make_optimizer
from repro.training.step import lr_factor


def _tiny_vae():
    return AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                         resolution=16)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    vae = _tiny_vae()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    post = vae.encode(images)
    rec = vae.decode(post.sample())
    return vae, images, post, rec


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(1)
    net = LPIPS()  # random VGG trunk; positive heads so the distance is a clearly non-zero number
    with torch.no_grad():
        for head in net.heads:
            head.weight.abs_()
    return net


# ---------------------------------------------------------------------------------------------------
# Perceptual weight


@pytest.mark.parametrize("weight", [0.3, 2.5])
def test_perceptual_weight_scales_the_lpips_term(batch, lpips, weight):
    vae, images, post, rec = batch
    n, _, h, w = images.shape
    with torch.no_grad():
        distance = lpips(images, rec)  # (N,)
    assert distance.min() > 1e-4
    cfg = TokenizerLossConfig(kl_weight=1e-3, perceptual_weight=weight)
    loss, log = TokenizerLoss(cfg, lpips=lpips).autoencoder_loss(images, rec, post, global_step=1)
    nll = ((rec - images).abs().sum() + weight * 3 * h * w * distance.sum()) / n
    expected = nll + 1e-3 * kl_divergence(post).sum() / n
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert log["p_loss"] == pytest.approx(distance.mean().item(), rel=1e-5)
    off, off_log = TokenizerLoss(TokenizerLossConfig(kl_weight=1e-3, perceptual_weight=0.0),
                                 lpips=lpips).autoencoder_loss(images, rec, post, global_step=1)
    assert "p_loss" not in off_log
    assert loss.item() - off.item() == pytest.approx(weight * 3 * h * w * distance.mean().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# The discriminator's first step


@pytest.mark.parametrize("disc_start", [1, 7])
def test_gan_terms_start_exactly_at_disc_start(batch, disc_start):
    vae, images, post, rec = batch
    torch.manual_seed(2)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    loss_fn = TokenizerLoss(TokenizerLossConfig(kl_weight=1e-3, disc_start=disc_start, disc_factor=0.7),
                            discriminator=disc)
    last = vae.decoder.conv_out.weight
    with torch.no_grad():
        hinge = hinge_d_loss(disc(images), disc(rec)).item()
        g = generator_loss(disc(rec)).item()
    base = ((rec - images).abs().sum() / 3 + 1e-3 * kl_divergence(post).sum() / 3).item()
    assert hinge > 0
    for step in (disc_start - 1, disc_start, disc_start + 1):
        on = step >= disc_start
        assert loss_fn.gan_active(step) is on, step
        d_loss, d_log = loss_fn.discriminator_loss(images, rec, step)
        assert d_loss.item() == pytest.approx(0.7 * hinge if on else 0.0, rel=1e-5, abs=0.0), step
        loss, log = loss_fn.autoencoder_loss(images, rec, post, step, last)
        assert log["disc_factor"] == (0.7 if on else 0.0) and ("g_loss" in log) is on, step
        expected = base + (log["d_weight"] * 0.7 * g if on else 0.0)
        assert loss.item() == pytest.approx(expected, rel=1e-5), step


# ---------------------------------------------------------------------------------------------------
# Warm-up


@pytest.mark.parametrize("warmup", [100, 7])
def test_warm_up_is_linear_from_the_first_step(warmup):
    for step in range(1, 3 * warmup):
        assert lr_factor(step, 10_000, warmup, "constant") == pytest.approx(min(1.0, step / warmup), rel=1e-12)
    assert lr_factor(1, 300, warmup, "constant") > 0  # step 1 already trains
    # cosine on top: 1-based steps, the first at the full cosine factor 1, the last (max_steps + 1) at 0
    for step in (1, warmup // 2, warmup, 150, 300):
        expected = min(1.0, step / warmup) * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / 300))
        assert lr_factor(step, 300, warmup, "cosine") == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_factor(1, 300, 0, "constant") == 1.0 and lr_factor(1, 300, 0, "cosine") == 1.0


# ---------------------------------------------------------------------------------------------------
# The training loop, read from its log: which step first trains the discriminator, the lr of step 1


def test_the_run_logs_disc_loss_from_disc_start_and_a_warm_up_lr_at_step_1(tmp_path):
    from repro.data.synthetic import make_digits_folder
    from repro.tokenizer_training.trainer import train_tokenizer
    from tests.test_tokenizer_training import tiny_cfg

    make_digits_folder(tmp_path / "digits" / "train", size=16, per_class=1)
    cfg = tiny_cfg(tmp_path / "digits", tmp_path / "out", "train.max_steps=3", "loss.disc_start=2",
                   "loss.disc_num_layers=1", "train.warmup_steps=4", "train.lr_schedule=constant",
                   "train.global_batch_size=4")
    res = train_tokenizer(cfg)
    rows = [json.loads(line) for line in (Path(res["run_dir"]) / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert ["disc_loss" in r for r in rows] == [False, True, True]
    assert ["g_loss" in r for r in rows] == [False, True, True]  # the generator's GAN term starts together
    assert all(r["disc_loss"] > 0.1 for r in rows[1:])  # a hinge loss near 1, not a zero-weighted one
    assert [r["lr"] for r in rows] == pytest.approx([0.002 / 4, 0.002 * 2 / 4, 0.002 * 3 / 4])


# ---------------------------------------------------------------------------------------------------
# From mutation testing of repro/tokenizer/losses.py (docs/mutation_testing.md)


def test_loss_averages_over_the_batch_not_the_channels():
    torch.manual_seed(3)
    vae = _tiny_vae()
    images = torch.rand(2, 3, 16, 16) * 2 - 1  # a batch of 2: not the 3 channels
    post = vae.encode(images)
    rec = vae.decode(post.sample())
    loss, log = TokenizerLoss(TokenizerLossConfig(kl_weight=1e-3)).autoencoder_loss(images, rec, post, 1)
    expected = (rec - images).abs().sum() / 2 + 1e-3 * kl_divergence(post).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["total_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert log["kl_loss"] == pytest.approx(kl_divergence(post).mean().item(), rel=1e-6)
    assert log["rec_loss"] == pytest.approx((rec - images).abs().mean().item(), rel=1e-6)


def test_vf_term_fixed_and_adaptive_weight_and_its_log(batch):
    from repro.tokenizer.vf_loss import VFLoss, vf_weight

    vae, images, post, rec = batch
    torch.manual_seed(4)
    z = post.sample()
    features = torch.randn(3, 16, *z.shape[-2:])
    vf = VFLoss(z.shape[1], 16)
    terms = vf(z, features)
    base = ((rec - images).abs().sum() / 3 + 1e-3 * kl_divergence(post).sum() / 3)
    fixed = TokenizerLoss(TokenizerLossConfig(kl_weight=1e-3, vf_weight=0.7, adaptive_vf=False), vf=vf)
    loss, log = fixed.autoencoder_loss(images, rec, post, 1, z=z, features=features)
    assert loss.item() == pytest.approx(base.item() + 0.7 * terms["loss"].item(), rel=1e-5)
    assert log["vf_loss"] == pytest.approx(terms["loss"].item(), rel=1e-6) and log["vf_weight"] == 0.7
    assert log["vf_cos"] == pytest.approx(terms["cos"].item(), rel=1e-6)
    assert log["vf_distmat"] == pytest.approx(terms["distmat"].item(), rel=1e-6)
    adaptive = TokenizerLoss(TokenizerLossConfig(kl_weight=1e-3, vf_weight=0.7, adaptive_vf=True), vf=vf)
    last = vae.encoder.conv_out.weight
    loss, log = adaptive.autoencoder_loss(images, rec, post, 1, z=z, features=features, encoder_last_layer=last)
    nll = (rec - images).abs().sum() / 3
    w = float(vf_weight(nll, vf(z, features)["loss"], last, 0.7, True))
    assert w != pytest.approx(0.7) and log["vf_weight"] == pytest.approx(w, rel=1e-4)
    assert loss.item() == pytest.approx(base.item() + w * terms["loss"].item(), rel=1e-4)
    with pytest.raises(ValueError, match=r"^the VF loss needs z \(the decoded latent\) and the frozen features$"):
        fixed.autoencoder_loss(images, rec, post, 1, z=z)
    with pytest.raises(ValueError, match=r"^the VF loss needs z"):
        fixed.autoencoder_loss(images, rec, post, 1, features=features)
    with pytest.raises(ValueError, match=r"^the adaptive VF weight needs encoder_last_layer \(vae\.encoder"):
        adaptive.autoencoder_loss(images, rec, post, 1, z=z, features=features)


def test_options_reach_the_loss_mse_vanilla_zero_factor_and_a_batch_of_two(lpips):
    from repro.tokenizer.discriminator import vanilla_d_loss

    torch.manual_seed(5)
    vae = _tiny_vae()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    post = vae.encode(images)
    rec = vae.decode(post.sample())
    with torch.no_grad():
        distance = lpips(images, rec)
    cfg = TokenizerLossConfig(rec_loss="mse", kl_weight=0.0, perceptual_weight=0.5, disc_start=0)
    loss, _ = TokenizerLoss(cfg, lpips=lpips).autoencoder_loss(images, rec, post, 3)  # no discriminator: no GAN
    expected = ((rec - images).pow(2).sum() + 0.5 * 3 * 16 * 16 * distance.sum()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    disc = NLayerDiscriminator(ndf=8, n_layers=1)
    vanilla = TokenizerLoss(TokenizerLossConfig(disc_start=0, disc_loss="vanilla"), discriminator=disc)
    with torch.no_grad():
        ref = vanilla_d_loss(disc(images), disc(rec)).item()
        g = generator_loss(disc(rec)).item()
    assert vanilla.discriminator_loss(images, rec, 1)[0].item() == pytest.approx(ref, rel=1e-5)
    _, log = vanilla.autoencoder_loss(images, rec, post, 1, vae.decoder.conv_out.weight)
    assert log["g_loss"] == pytest.approx(g, rel=1e-5)
    off = TokenizerLoss(TokenizerLossConfig(disc_start=0, disc_factor=0.0), discriminator=disc)
    assert not off.gan_active(10)


def test_bad_options_and_missing_inputs_are_named_in_their_messages(batch):
    # each message names the key or the missing input and what to use instead (found by mutation testing:
    # every one of them could be blanked or re-cased with no test noticing)
    from repro.errors import ConfigError
    from repro.tokenizer.losses import reconstruction_loss

    vae, images, post, rec = batch
    assert torch.equal(reconstruction_loss(images, rec), (images - rec).abs())  # L1 by default, as upstream
    with pytest.raises(ConfigError, match=r"^unknown reconstruction loss 'l3'; choose one of l1, mse$"):
        reconstruction_loss(images, rec, "l3")
    with pytest.raises(ConfigError, match=r"^rec_loss 'l2' is not one of l1, mse$"):
        TokenizerLossConfig(rec_loss="l2")
    with pytest.raises(ConfigError, match=r"^disc_loss 'wgan' is not one of hinge, vanilla$"):
        TokenizerLossConfig(disc_loss="wgan")
    disc = NLayerDiscriminator(ndf=8, n_layers=1)
    gan = TokenizerLoss(TokenizerLossConfig(disc_start=0), discriminator=disc)
    with pytest.raises(ValueError, match=r"^the GAN term needs decoder_last_layer \(vae\.decoder\.conv_out\.weight\)$"):
        gan.autoencoder_loss(images, rec, post, 1)
    with pytest.raises(ValueError, match=r"^discriminator_loss called on a TokenizerLoss without a discriminator$"):
        TokenizerLoss(TokenizerLossConfig()).discriminator_loss(images, rec, 1)
