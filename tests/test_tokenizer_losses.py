"""Tokenizer training losses (KL, reconstruction, LPIPS, PatchGAN, VF) and reconstruction metrics.

Every expected value is computed independently of the module under test: by hand, with torchvision's
own VGG16, with autograd on separate graphs, or with scikit-image (SSIM/PSNR reference).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repro.errors import CheckpointError, ConfigError
from repro.evaluation.reconstruction import evaluate_reconstructions, psnr, ssim
from repro.tokenizer.discriminator import (NLayerDiscriminator, adaptive_weight, disc_factor, generator_loss,
                                           hinge_d_loss, vanilla_d_loss)
from repro.tokenizer.losses import TokenizerLoss, TokenizerLossConfig, kl_divergence, reconstruction_loss
from repro.tokenizer.lpips import HEAD_CHANNELS, build_lpips, load_lpips
from repro.tokenizer.vavae import AutoencoderKL
from repro.tokenizer.vf_loss import (FrozenFeatureNet, TokenGridFeatures, VFLoss, foundation_features,
                                     margin_cosine_loss, margin_distmat_loss, vf_weight)

# ---------------------------------------------------------------------------------------------
# PatchGAN


def test_hinge_vanilla_and_generator_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    vanilla = 0.5 * (np.mean([sp(-2.0), sp(-0.5), sp(1.0)]) + np.mean([sp(-2.0), sp(0.0), sp(1.0)]))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(1 / 3)


def test_disc_start_gating():
    assert disc_factor(5000, disc_start=5001) == 0.0
    assert disc_factor(5001, disc_start=5001) == 1.0
    assert disc_factor(7000, disc_start=5001, factor=0.5) == 0.5


def test_discriminator_layout_and_init_match_pix2pix():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    keys = list(disc.state_dict())
    convs = [k for k in keys if k.endswith("weight") and disc.state_dict()[k].ndim == 4]
    assert convs == ["main.0.weight", "main.2.weight", "main.5.weight", "main.8.weight", "main.11.weight"]
    assert "main.0.bias" in keys and "main.11.bias" in keys and "main.2.bias" not in keys  # BN convs: no bias
    # conv 3->64, 64->128, 128->256, 256->512 (4x4), BN 128/256/512, 512->1: counted by hand
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    conv_w = torch.cat([disc.state_dict()[k].flatten() for k in convs])
    assert abs(conv_w.std().item() - 0.02) < 0.001 and abs(conv_w.mean().item()) < 0.001
    bn_w = disc.main[3].weight
    assert abs(bn_w.mean().item() - 1.0) < 0.01 and torch.all(disc.main[3].bias == 0)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # H/8 - 2 patches
    assert disc(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    target = torch.randn(2, 3, 8, 8)
    disc = NLayerDiscriminator(ndf=8, n_layers=1)

    def losses():
        out = layer(x)
        return (out - target).abs().sum() / 2, generator_loss(disc(out))

    nll, g = losses()
    weight = adaptive_weight(nll, g, layer.weight, scale=0.5)
    # independent: two separate graphs and .backward()
    grads = []
    for pick in (0, 1):
        layer.zero_grad()
        losses()[pick].backward()
        grads.append(layer.weight.grad.clone())
    expected = 0.5 * grads[0].norm() / (grads[1].norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    # a loss with no gradient at the layer: ratio |g_nll| / 1e-4, clamped to 1e4
    out = layer(x)
    zero = adaptive_weight((out - target).abs().sum(), out.sum() * 0.0, layer.weight, scale=1.0)
    assert zero.item() == 1e4


# ---------------------------------------------------------------------------------------------
# Small tokenizers (kit options of AutoencoderKL) and KL / reconstruction


@pytest.mark.parametrize("ch_mult, side", [((1, 2, 2), 8), ((1, 1, 2, 2), 4), ((1, 1, 1, 2, 2), 2)])
def test_small_tokenizers_any_factor_and_width(ch_mult, side):
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=16, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(), z_channels=3, embed_dim=3,
                        resolution=32, norm_groups=16)
    assert vae.downsample_ratio == 32 // side
    assert vae.encoder.norm_out.num_groups == 16
    with torch.no_grad():
        z = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).mean
        assert z.shape == (2, 3, side, side)
        assert vae.decode(z).shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match="vae.ch=16"):
        AutoencoderKL(ch=16)  # the default 32 groups need widths that are multiples of 32


def test_kl_matches_torch_distributions_and_rec_losses():
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                        resolution=16)
    post = vae.encode(torch.rand(3, 3, 16, 16) * 2 - 1)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(kl_divergence(post), ref, rtol=1e-5, atol=1e-5)
    a, b = torch.tensor([[[[0.5, -1.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    assert reconstruction_loss(a, b, "l1").flatten().tolist() == [0.5, 2.0]
    assert reconstruction_loss(a, b, "mse").flatten().tolist() == [0.25, 4.0]
    with pytest.raises(ConfigError, match="huber"):
        reconstruction_loss(a, b, "huber")


# ---------------------------------------------------------------------------------------------
# VF loss


def test_vf_margin_terms_known_values_and_zero_within_margin():
    f = torch.randn(2, 6, 3, 3)
    # cosine ~ 1 everywhere (within the 0.5 margin): both terms vanish
    near = f * 2.0 + 0.01 * torch.randn_like(f)
    assert margin_cosine_loss(near, f).item() == 0.0
    assert margin_distmat_loss(near, f).item() == 0.0
    assert margin_cosine_loss(-f, f).item() == pytest.approx(1.5, abs=1e-6)  # relu(1 - 0.5 + 1)
    # two positions: z columns (e1, e1) -> Gram all ones; f columns (e1, e2) -> identity
    z = torch.zeros(1, 2, 1, 2)
    z[0, 0] = 1.0
    feats = torch.zeros(1, 2, 1, 2)
    feats[0, 0, 0, 0] = 1.0
    feats[0, 1, 0, 1] = 1.0
    assert margin_distmat_loss(z, feats).item() == pytest.approx(0.75 * 2 / 4)  # |diff| 1 off-diagonal
    assert margin_distmat_loss(z, feats, margin=1.0).item() == 0.0
    # cos(e1, e2) = 0 at position 1 -> relu(0.5) / 2 positions
    assert margin_cosine_loss(z, feats).item() == pytest.approx(0.25)


def test_vf_loss_with_a_small_frozen_network_trains_the_encoder_and_projection():
    torch.manual_seed(0)
    net = FrozenFeatureNet(nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1)))
    net.train()
    assert not net.network.training and not any(p.requires_grad for p in net.parameters())
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                        resolution=16)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    post = vae.encode(images)
    z = post.sample()  # (2, 4, 8, 8)
    feats = foundation_features(net, images, grid=z.shape[-2:], input_size=32)  # net gives 16x16 -> resized
    assert feats.shape == (2, 16, 8, 8) and not feats.requires_grad
    vf = VFLoss(embed_dim=4, feature_dim=16)
    assert vf.proj.bias is None and vf.proj.weight.shape == (16, 4, 1, 1)
    terms = vf(z, feats)
    rec = vae.decode(z)
    nll = (rec - images).abs().sum() / 2
    enc_w = vae.encoder.conv_out.weight
    weight = vf_weight(nll, terms["loss"], enc_w)
    g_nll = torch.autograd.grad(nll, enc_w, retain_graph=True)[0]
    g_vf = torch.autograd.grad(terms["loss"], enc_w, retain_graph=True)[0]
    assert float(weight) == pytest.approx(0.1 * (g_nll.norm() / (g_vf.norm() + 1e-4)).item(), rel=1e-5)
    assert vf_weight(nll, terms["loss"], enc_w, adaptive=False) == 0.1
    (nll + weight * terms["loss"]).backward()
    assert vf.proj.weight.grad.abs().sum() > 0 and enc_w.grad.abs().sum() > 0


def test_token_grid_features_reads_vit_tokens_in_row_major_order():
    patch = nn.Conv2d(3, 5, kernel_size=4, stride=4)

    def vit_like(images):  # class token + row-major patch tokens, as DINOv2's forward_features
        tokens = patch(images).flatten(2).transpose(1, 2)  # (N, 16, 5)
        return torch.cat([torch.zeros(images.shape[0], 1, 5), tokens], dim=1)

    images = torch.randn(2, 3, 16, 16)
    grid = TokenGridFeatures(vit_like)(images)
    assert torch.allclose(grid, patch(images))  # (2, 5, 4, 4), same positions
    with pytest.raises(ValueError, match="square"):
        TokenGridFeatures(vit_like, prefix_tokens=2)(images)


# ---------------------------------------------------------------------------------------------
# The combined objective


def _tiny_vae():
    return AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                         resolution=16)


def test_tokenizer_loss_reductions_and_gan_gating():
    torch.manual_seed(0)
    vae, disc = _tiny_vae(), NLayerDiscriminator(ndf=8, n_layers=2)
    cfg = TokenizerLossConfig(kl_weight=1e-3, disc_start=10)
    loss_fn = TokenizerLoss(cfg, discriminator=disc)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    post = vae.encode(images)
    rec = vae.decode(post.sample())
    last = vae.decoder.conv_out.weight
    before, log = loss_fn.autoencoder_loss(images, rec, post, global_step=9, decoder_last_layer=last)
    expected = (rec - images).abs().sum() / 3 + 1e-3 * kl_divergence(post).mean()  # upstream: sums / batch
    assert before.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["disc_factor"] == 0.0 and "g_loss" not in log
    assert not loss_fn.gan_active(9) and loss_fn.gan_active(10)
    after, log = loss_fn.autoencoder_loss(images, rec, post, global_step=10, decoder_last_layer=last)
    g = generator_loss(disc(rec))
    assert after.item() == pytest.approx(expected.item() + log["d_weight"] * g.item(), rel=1e-5)
    d_loss, d_log = loss_fn.discriminator_loss(images, rec, global_step=10)
    assert d_loss.item() == pytest.approx(hinge_d_loss(disc(images), disc(rec)).item(), rel=1e-5)
    d_loss.backward()
    assert vae.decoder.conv_out.weight.grad is None  # inputs detached: no gradient into the autoencoder
    assert loss_fn.discriminator_loss(images, rec, global_step=0)[0].item() == 0.0
    with pytest.raises(ConfigError, match="l2"):
        TokenizerLossConfig(rec_loss="l2")


# ---------------------------------------------------------------------------------------------
# LPIPS: random weights in the official file formats


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    from torchvision.models.vgg import cfgs, make_layers

    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # torchvision's own VGG16 `features` module: the reference layout
    trunk = {f"features.{k}": v for k, v in features.state_dict().items()}
    # torchvision's file also holds the classifier (4096x25088 etc.); small stand-ins keep the test light
    trunk.update({"classifier.0.weight": torch.zeros(4, 8), "classifier.0.bias": torch.zeros(4)})
    trunk_path = folder / "vgg16.pth"
    torch.save(trunk, trunk_path)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(HEAD_CHANNELS)}
    heads_path = folder / "vgg.pth"
    torch.save(heads, heads_path)
    return trunk_path, heads_path, features.eval(), heads


def test_lpips_matches_an_independent_computation(lpips_files):
    trunk_path, heads_path, features, heads = lpips_files
    lpips = load_lpips(trunk_path, heads_path)
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        out, h = [], (img - shift) / scale
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h.clone())
        return out

    with torch.no_grad():
        expected = sum((F.conv2d((F.normalize(a, dim=1, eps=0) - F.normalize(b, dim=1, eps=0)) ** 2,
                                 heads[f"lin{k}.model.1.weight"])).mean(dim=(1, 2, 3))
                       for k, (a, b) in enumerate(zip(taps(x), taps(y))))
        got = lpips(x, y)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    assert torch.allclose(lpips(y, x), got, rtol=1e-6, atol=0)
    assert torch.all(got > 0)
    # evaluate_reconstructions feeds uint8 pixels to LPIPS as x / 127.5 - 1
    pa, pb = ((x + 1) * 127.5).round().to(torch.uint8), ((y + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        direct = lpips(pa.float() / 127.5 - 1, pb.float() / 127.5 - 1).mean().item()
    result = evaluate_reconstructions(pa.permute(0, 2, 3, 1).numpy(), pb.permute(0, 2, 3, 1).numpy(), lpips=lpips)
    assert result["lpips"] == pytest.approx(direct, rel=1e-5)
    xg = x.clone().requires_grad_(True)
    lpips(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in lpips.parameters())


def test_lpips_loading_is_strict_and_absence_is_a_note(lpips_files, tmp_path, capsys):
    trunk_path, heads_path, _, heads = lpips_files
    assert build_lpips(tmp_path / "none.pth", heads_path) is None
    assert build_lpips(None, None) is None
    assert "LPIPS weights absent" in capsys.readouterr().out
    bad_heads = dict(heads)
    del bad_heads["lin4.model.1.weight"]
    torch.save(bad_heads, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_lpips(trunk_path, tmp_path / "missing.pth")
    torch.save({**heads, "lin5.model.1.weight": torch.rand(1, 8, 1, 1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="lin5"):
        load_lpips(trunk_path, tmp_path / "extra.pth")
    torch.save({**heads, "lin2.model.1.weight": torch.rand(1, 128, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape"):
        load_lpips(trunk_path, tmp_path / "shape.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "trunk.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_lpips(tmp_path / "trunk.pth", heads_path)
    with pytest.raises(CheckpointError, match="md5"):
        load_lpips(trunk_path, heads_path, heads_md5="0" * 32)
    torch.save({"heads": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # needs unpickling a class: refused
    with pytest.raises(CheckpointError, match="weights_only"):
        load_lpips(trunk_path, tmp_path / "pickled.pth")


def test_lpips_trunk_hash_prefix_in_the_name_is_checked(lpips_files, tmp_path):
    trunk_path, heads_path, _, _ = lpips_files
    data = trunk_path.read_bytes()
    good = tmp_path / f"vgg16-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    good.write_bytes(data)
    assert load_lpips(good, heads_path) is not None
    wrong = tmp_path / "vgg16-397923af.pth"  # the official name, but not the official bytes
    wrong.write_bytes(data)
    with pytest.raises(CheckpointError, match="397923af"):
        load_lpips(wrong, heads_path)


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM against scikit-image (the reference implementation; a test dependency)


def test_psnr_and_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (the SSIM/PSNR reference) is not installed")
    peak_signal_noise_ratio, structural_similarity = metrics.peak_signal_noise_ratio, metrics.structural_similarity

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(3, 32, 40, 3), dtype=np.uint8)
    noise = rng.normal(0, 20, size=a.shape)
    b = np.clip(a.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    ours_ssim, ours_psnr = ssim(a, b), psnr(a, b)
    for i in range(3):
        ref = structural_similarity(a[i], b[i], channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
        assert ours_ssim[i] == pytest.approx(ref, abs=1e-9)
        assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=255), abs=1e-9)
    # the [-1,1] float form of the same pixels gives the same numbers
    fa = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 127.5 - 1
    fb = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert np.allclose(ssim(fa, fb), ours_ssim, atol=1e-9) and np.allclose(psnr(fa, fb), ours_psnr, atol=1e-9)
    same = evaluate_reconstructions(a, a)
    assert same["ssim"] == pytest.approx(1.0) and same["exact"] == 3 and same["psnr"] == math.inf
    assert same["lpips"] is None
    batched = evaluate_reconstructions(a, b, batch_size=2)  # batches of 2 + 1: the same means
    assert batched["psnr"] == pytest.approx(ours_psnr.mean()) and batched["ssim"] == pytest.approx(ours_ssim.mean())
    with pytest.raises(ValueError, match="one shape and kind"):
        ssim(a, fb)
