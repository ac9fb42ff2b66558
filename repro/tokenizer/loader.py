"""The tokenizer loader: the official VA-VAE f16d32, or one the kit trained (step 9), chosen by the config.

A tokenizer trained by step 9 is one safetensors file holding the inference tensors of its
AutoencoderKL (encoder, decoder, quant_conv, post_quant_conv: the upstream names) and, in its header, the
architecture that builds it (`repro-tokenizer` = JSON {"format", "arch", ...}). The architecture lives
inside the weights file, so the two can never disagree; a DiT config names such a file with

    vae:
      model_name: custom            # kit: a tokenizer of step 9 (architecture read from the file)
      ckpt_path: runs:tokenizer/digits/tokenizer.safetensors
      downsample_ratio: 4           # checked against the file
      ch: 32                        # checked against the file

and `load_vae(cfg.vae, device)` builds and loads it (strict) wherever the kit needs the tokenizer (step 6
extraction, step 4 sampling, step 7's sample grids). `vae.model_name: vavae_f16d32` loads the official
file through `repro.tokenizer.vavae.load_vavae`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from repro.errors import CheckpointError, ConfigError
from repro.tokenizer.vavae import INFERENCE_PREFIXES, AutoencoderKL, load_frozen, load_vavae
from repro.utils.io import atomic_save_safetensors

TOKENIZER_FORMAT = "repro-tokenizer/1"
HEADER_KEY = "repro-tokenizer"
CUSTOM = "custom"  # vae.model_name of a tokenizer trained by step 9
VFM_VAE = "vfm_vae_f16d32"  # vae.model_name of the VFM-VAE (repro.tokenizer.vfm_vae_load)
# AutoencoderKL keyword arguments that make up an architecture, with their types
ARCH_FIELDS = {"ch": int, "ch_mult": list, "num_res_blocks": int, "attn_resolutions": list, "z_channels": int,
               "embed_dim": int, "resolution": int, "norm_groups": int}
# the official VA-VAE f16d32 layout (AutoencoderKL's defaults)
OFFICIAL_ARCH = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                 "z_channels": 32, "embed_dim": 32, "resolution": 256, "norm_groups": 32}


def check_arch(arch: dict[str, Any], where: str = "the tokenizer architecture") -> dict[str, Any]:
    """A clean copy of an architecture dict; a ConfigError naming the first key that is missing or wrong."""
    if unknown := sorted(set(arch) - set(ARCH_FIELDS)):
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(ARCH_FIELDS)})")

    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    out: dict[str, Any] = {}
    for key, kind in ARCH_FIELDS.items():
        if key not in arch:
            raise ConfigError(f"{where}: key '{key}' is missing")
        value = arch[key]
        if kind is int and not positive(value):
            raise ConfigError(f"{where}: '{key}' must be a positive integer, got {value!r}")
        if kind is list and not (isinstance(value, (list, tuple)) and all(map(positive, value))):
            raise ConfigError(f"{where}: '{key}' must be a list of positive integers, got {value!r}")
        out[key] = int(value) if kind is int else [int(v) for v in value]
    if not out["ch_mult"]:
        raise ConfigError(f"{where}: 'ch_mult' needs at least one level (f1); [1, 2, 2] is f4, [1, 1, 2, 2, 4] f16")
    if out["ch"] % out["norm_groups"]:
        raise ConfigError(f"{where}: 'ch' ({out['ch']}) must be a multiple of 'norm_groups' ({out['norm_groups']}): "
                          "GroupNorm splits the channels into that many groups")
    return out


def downsample_ratio(arch: dict[str, Any]) -> int:
    """The side ratio image / latent: 2^(levels - 1) (f4 = 3 levels)."""
    return 2 ** (len(arch["ch_mult"]) - 1)


def build_tokenizer(arch: dict[str, Any]) -> AutoencoderKL:
    """AutoencoderKL of an architecture dict (checked first; its keys are AutoencoderKL's arguments)."""
    return AutoencoderKL(**check_arch(arch))


def save_tokenizer(state: dict, arch: dict[str, Any], path: str | os.PathLike,
                   info: Optional[dict[str, Any]] = None) -> Path:
    """Write the inference tensors of an autoencoder's state dict and its architecture (+ `info`, JSON-able) as
    one safetensors file."""
    arch = check_arch(arch)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()
               if k.startswith(INFERENCE_PREFIXES)}
    header = {"format": TOKENIZER_FORMAT, "arch": arch, **(info or {})}
    return atomic_save_safetensors(tensors, path, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def read_tokenizer_header(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The kit header of a tokenizer file, or None when the file is not one (another format, unreadable)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        header = json.loads(meta[HEADER_KEY]) if HEADER_KEY in meta else None
    except Exception:
        return None
    return header if isinstance(header, dict) and header.get("format") == TOKENIZER_FORMAT else None


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[AutoencoderKL, dict]:
    """(model in eval mode with frozen parameters, header) of a tokenizer file written by step 9; strict."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer file not found: {path}; train one with step 9 "
                              "(python -m steps.step9_train_tokenizer --config C)")
    if (header := read_tokenizer_header(path)) is None:
        raise CheckpointError(f"{path} is not a tokenizer written by step 9 (no '{HEADER_KEY}' header of format "
                              f"{TOKENIZER_FORMAT}); for the official VA-VAE set vae.model_name: vavae_f16d32")
    arch = check_arch(header.get("arch") or {}, where=f"{path} header")
    return load_frozen(lambda: build_tokenizer(arch), load_file(str(path)),
                       lambda tensors, expected: _check_against_header(tensors, expected, path),
                       device=device, dtype=None), header  # the file's own dtype (step 9 writes float32)


def _check_against_header(tensors: dict, expected: dict[str, tuple], path: Path) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: its tensors do not match its own architecture header (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged; save it again")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, its header's architecture "
                                  f"needs {shape}: the file is damaged; save it again")


def load_vae(vae_cfg, device: str | torch.device = "cpu", encoder: bool = True) -> torch.nn.Module:
    """The tokenizer a config's `vae` section names, loaded strictly, eval mode, frozen.

    `vavae_f16d32`: the official file (`load_vavae`, width `vae.ch`); `custom`: a step-9 file whose header's
    architecture must agree with `vae.ch` and `vae.downsample_ratio` (an error names both numbers).
    """
    if not (path := vae_cfg.ckpt_path):
        raise ConfigError("config key 'vae.ckpt_path' is not set: give the tokenizer weights file")
    if vae_cfg.model_name == VFM_VAE:  # `encoder=False`: decoding only, no SigLIP2 weights needed
        from repro.tokenizer.vfm_vae_load import load_vfm_vae

        return load_vfm_vae(path, with_encoder=encoder, siglip_path=getattr(vae_cfg, "siglip_path", None), device=device)
    if vae_cfg.model_name != CUSTOM:
        if read_tokenizer_header(path) is not None:
            raise ConfigError(f"vae.ckpt_path {path} is a tokenizer trained by step 9, but vae.model_name is "
                              f"{vae_cfg.model_name!r}: set vae.model_name: {CUSTOM}")
        return load_vavae(path, ch=vae_cfg.ch, device=device)
    model, header = load_tokenizer(path, device=device)
    arch = header["arch"]
    for key, want, have in (("vae.ch", vae_cfg.ch, arch["ch"]),
                            ("vae.downsample_ratio", vae_cfg.downsample_ratio, downsample_ratio(arch))):
        if want != have:
            raise ConfigError(f"config key '{key}' is {want} but the tokenizer {path} has {have}: set {key}: {have}")
    return model
