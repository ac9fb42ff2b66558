"""Latent de-normalisation before decoding, with a latent_multiplier that is not 1.

Upstream inference.py: `samples = (samples * latent_std) / latent_multiplier + latent_mean` with statistics,
and the missing-key default multiplier is 0.18215. Training normalises a stored latent z as
`(z - mean) / std * latent_multiplier` (repro.data.latents, upstream's dataset), or `z * latent_multiplier`
without statistics; sampling must invert exactly that. Every config of the kit uses 1.0, where
`(x * std + mean) / m` and `x * std / m + mean` (and `x * m` and `x / m`) agree: these tests do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from repro.config import Config
from repro.data.latents import LatentShardDataset, shard_name, write_shard
from repro.data.stats import STATS_NAME, load_latent_stats
from repro.sampling.engine import decode_to_uint8, denormalize, sampler_from_parts
from repro.tokenizer.images import to_uint8
from tests.tiny_assets import TINY_CHANNELS, TINY_LATENT, tiny_model, tiny_vae

UPSTREAM_DEFAULT_MULTIPLIER = 0.18215


def _setup(latent_norm: bool, multiplier: float, stats, vae=None, channels: int = TINY_CHANNELS):
    cfg = Config()
    cfg.data.latent_norm, cfg.data.latent_multiplier = latent_norm, multiplier
    cfg.data.image_size, cfg.vae.downsample_ratio = TINY_LATENT * 16, 16
    cfg.model.in_chans = channels
    return sampler_from_parts(cfg, tiny_model(), device=torch.device("cpu"), vae=vae, stats=stats)


def test_denormalize_closed_form_with_statistics_and_a_multiplier():
    mean = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    std = torch.tensor([3.0, 0.5]).view(1, 2, 1, 1)
    setup = _setup(True, 0.5, (mean, std), channels=2)
    x = torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    # x * std / m + mean: 1 * 3 / 0.5 + 2 = 8 and 4 * 0.5 / 0.5 - 1 = 3
    assert denormalize(setup, x).flatten().tolist() == pytest.approx([8.0, 3.0])
    plain = _setup(False, 0.5, None, channels=2)
    assert denormalize(plain, x).flatten().tolist() == pytest.approx([2.0, 8.0])  # x / m


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A shard of latents far from zero mean / unit std, and its statistics file."""
    folder = tmp_path_factory.mktemp("latents")
    g = torch.Generator().manual_seed(0)
    c, s = TINY_CHANNELS, TINY_LATENT
    centre = torch.linspace(-3.0, 3.0, c).view(1, c, 1, 1)
    spread = torch.linspace(0.3, 2.5, c).view(1, c, 1, 1)
    lat = centre + spread * torch.randn(8, c, s, s, generator=g)
    write_shard(folder / shard_name(0, 0), lat, lat.flip(-1), torch.arange(8) % 3)
    mean, std = lat.mean(dim=(0, 2, 3), keepdim=True), lat.std(dim=(0, 2, 3), keepdim=True)
    torch.save({"mean": mean, "std": std}, folder / STATS_NAME)
    return folder


@pytest.mark.parametrize("latent_norm", [True, False])
def test_sampling_inverts_the_training_normalisation(shards, latent_norm):
    """A training latent (normalised by the dataset) decodes to the image of the stored latent."""
    m = UPSTREAM_DEFAULT_MULTIPLIER
    ds = LatentShardDataset(shards, latent_norm=latent_norm, latent_multiplier=m)
    stats = load_latent_stats(shards / STATS_NAME, TINY_CHANNELS) if latent_norm else None
    assert stats is None or float(stats[1].std()) > 0.3  # a non-uniform std
    vae = tiny_vae()
    setup = _setup(latent_norm, m, stats, vae=vae)
    normalised = torch.stack([ds.get(i, flip=False)[0] for i in range(4)])
    stored = torch.stack([ds.raw(i)[0] for i in range(4)])
    torch.testing.assert_close(denormalize(setup, normalised), stored, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        direct = to_uint8(vae.decode(stored)).numpy()
    decoded = decode_to_uint8(setup, normalised)
    assert np.abs(decoded.astype(int) - direct.astype(int)).max() <= 1
