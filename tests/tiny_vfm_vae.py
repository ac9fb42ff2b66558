"""A tiny random VFM-VAE in the official file layout, for the offline tests of the VFM-VAE path.

The architecture is the parity fixture's `tiny_a` (tests/fixtures/reference/vfm_vae/tiny_a.json: 64 px images,
4-channel 4x4 latents, a 3-layer SigLIP tower of width 32), built from the kit's own `VFMVAE` with seeded
weights. The file is what the official checkpoint is, a dict with `G_ema` = the generator's state dict (plain
tensors, so a weights-only load reads it), plus `G_kwargs`/`vfm_config`: the architecture it was built with, which
`load_vfm_vae` reads instead of the official f16d32's (the official file carries neither).

    data = tiny_vfm_vae_bytes()                         # torch.save bytes
    FakeHub(files={VFM_VAE_REPO: data})                 # served under the official repo id and file name
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import torch

from repro.hub.manifest import load_manifest

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "vfm_vae" / "tiny_a.json"
VFM_VAE_ASSET = "vfm-vae-f16d32"
TINY_IMAGE = 64  # px; latents are TINY_IMAGE / 16 = 4 px a side
TINY_Z = 4  # latent channels of tiny_a (model.in_chans of the DiT trained on them)


def tiny_architecture() -> tuple[dict, dict]:
    """(G_kwargs, SigLIP config) of the tiny model."""
    side = json.loads(FIXTURE.read_text())
    return side["g_kwargs"], side["siglip_config"]


def vfm_vae_repo() -> tuple[str, str]:
    """(repo_id, filename) of the official checkpoint in configs/assets.yaml: where the fake hub serves the file."""
    spec = load_manifest().assets[VFM_VAE_ASSET]
    return spec.repo_id, spec.filename


def tiny_vfm_vae(seed: int = 0) -> torch.nn.Module:
    from repro.tokenizer.vfm_vae import VFMVAE

    g_kwargs, siglip = tiny_architecture()
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's RNG
        torch.manual_seed(seed)
        return VFMVAE(g_kwargs, siglip_config=siglip).eval()


@functools.lru_cache(maxsize=2)
def tiny_vfm_vae_bytes(seed: int = 0) -> bytes:
    g_kwargs, siglip = tiny_architecture()
    state = {k: v.detach().clone() for k, v in tiny_vfm_vae(seed).state_dict().items()}
    buf = io.BytesIO()
    torch.save({"G_ema": state, "G_kwargs": g_kwargs, "vfm_config": siglip}, buf)
    return buf.getvalue()
