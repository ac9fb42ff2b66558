"""Tokenizer training and evaluation (steps 9 and 10): a VA-VAE-architecture autoencoder on your images.

Modules: `config` (the kit's schema; upstream's LDM-style YAMLs through `upstream`), `data` (the image
folder, seeded per-sample crops, flips and posterior noise), `modules` (the autoencoder and the loss with
its LPIPS, PatchGAN and VF network), `loop` (`train_tokenizer`, resumable, torchrun), `evaluate` (rFID, PSNR, SSIM,
LPIPS and a reconstruction grid). The numerics live in `repro.tokenizer` (model, losses, weight files).
"""
