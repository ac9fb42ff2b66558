"""Loading the VFM-VAE: the official checkpoint's `G_ema`, strictly, and the SigLIP2 weights when encoding.

The official file (Hugging Face tiancibi/VFM-VAE, checkpoints_imagenet256/vfm_vae/...legacy.pth) is a dict whose
`G_ema` is the generator's state dict; a safetensors file of that state dict (or a flat `.pt`) is read the same
way. Every tensor must match the model key for key and shape for shape; only these are dropped, by name and with
a count, each for a stated reason:

    vfm_encoder.encoder.text_model.*   the SigLIP text tower: the tokenizer is unconditional
    ldm_adapter.linear_proj.*          the VF-loss projection: training only
    vfm_encoder.*                      everything of SigLIP, when built for decoding only (with_encoder=False)

The SigLIP2 tower's weights come from the checkpoint when it holds them; otherwise, when encoding, from the
hub's google/siglip2-large-patch16-512 `model.safetensors` (`siglip_path`; step 2 asset `siglip2-large-512`),
whose `vision_model.*` tensors are the tower (its text tower and logit scale/bias are dropped and counted).

The architecture is the official f16d32 unless the file says otherwise: a dict that carries `G_kwargs` (upstream's
name for the generator's architecture) and `vfm_config` (the SigLIP tower's config.json values) beside `G_ema` is
built from them (checked key by key by `check_g_kwargs`), so a small file written for tests or a smaller
tokenizer goes through `vae.model_name: vfm_vae_f16d32` unchanged; arguments given to `load_vfm_vae` win.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch

from repro.errors import CheckpointError
from repro.models.checkpoint import read_checkpoint
from repro.tokenizer.vfm_vae import OFFICIAL_G_KWARGS, SIGLIP2_LARGE_512, VFMVAE
from repro.utils.distributed import print0

SIGLIP_PREFIX = "vfm_encoder.encoder.vision_model.vision_model."
ALWAYS_DROPPED = {"vfm_encoder.encoder.text_model.": "SigLIP text tower (the tokenizer is unconditional)",
                  "ldm_adapter.linear_proj.": "VF-loss projection (training only)"}
SIGLIP_FILE_DROPPED = ("text_model.", "logit_scale", "logit_bias")  # the hub file's CLIP-style extras


def file_architecture(raw: Any, path: Path) -> tuple[Optional[dict], Optional[dict]]:
    """(G_kwargs, vfm_config) the file carries beside `G_ema`, each None when absent (the official file)."""
    out = []
    for key in ("G_kwargs", "vfm_config"):
        value = raw.get(key) if isinstance(raw, dict) and "G_ema" in raw else None
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{path}: '{key}' is a {type(value).__name__}, not a dict of architecture values; "
                                  "save the file again with a plain dict (or without it for the official f16d32)")
        out.append(value)
    return out[0], out[1]


def generator_state(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """The generator state dict inside a checkpoint: `G_ema` of the official dict, or the file itself."""
    if isinstance(raw, dict) and isinstance(raw.get("G_ema"), dict):
        raw = raw["G_ema"]
    elif isinstance(raw, dict) and "G_ema" in raw:
        raise CheckpointError(f"{path}: 'G_ema' is a {type(raw['G_ema']).__name__}, not a state dict; "
                              "export its state_dict() (a pickled module is never executed)")
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path} holds no generator state dict (expected the official file with 'G_ema')")
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor; is this the VFM-VAE checkpoint?")
    return dict(raw)


def _drop(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> tuple[dict, Counter]:
    kept, dropped = {}, Counter()
    for key, value in state.items():
        reason = next((why for p, why in prefixes.items() if key.startswith(p)), None)
        if reason is None:
            kept[key] = value
        else:
            dropped[reason] += 1
    return kept, dropped


def read_siglip_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The vision tower of a SigLIP(2) weights file under the kit's names (text tower and logit terms dropped)."""
    path = Path(path)
    raw = read_checkpoint(path)
    out, dropped = {}, 0
    for key, value in raw.items():
        if key.startswith("vision_model."):
            out[SIGLIP_PREFIX + key[len("vision_model."):]] = value
        elif key.startswith(SIGLIP_FILE_DROPPED):
            dropped += 1
        else:
            raise CheckpointError(f"{path}: tensor {key!r} is neither the vision nor the text tower; "
                                  "is this google/siglip2-large-patch16-512's model.safetensors?")
    if not out:
        raise CheckpointError(f"{path} has no 'vision_model.*' tensors; is this a SigLIP2 weights file?")
    print0(f"SigLIP2 {path.name}: {len(out)} vision tensors, dropped {dropped} (text tower, logit scale/bias)")
    return out


def _check(tensors: dict, expected: dict[str, tuple], path: Path) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        detail = (f"missing {len(missing)} ({', '.join(missing[:3])})" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])})" if unexpected else "")
        raise CheckpointError(f"{path} does not match the VFM-VAE f16d32 generator: {detail}; is this the "
                              "official vfm_vae_f16d32 checkpoint (or the G_kwargs it was trained with)?")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(shape)}")


def _materialize_position_ids(model: torch.nn.Module) -> None:
    """transformers keeps SigLIP's position ids as a non-persistent buffer (0..n-1), so no file holds them."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise CheckpointError(f"buffer {name} is in no checkpoint and the kit cannot rebuild it")
        owner = model.get_submodule(name.rpartition(".")[0])
        owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def load_vfm_vae(path: str | os.PathLike, *, with_encoder: bool = True, siglip_path: Optional[str | os.PathLike] = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, num_fp16_res: int = 0,
                 g_kwargs: Optional[dict[str, Any]] = None, siglip_config: Optional[dict[str, Any]] = None,
                 siglip_precision: str = "fp32") -> VFMVAE:
    """The VFM-VAE of `path`, strictly loaded, eval mode, frozen. `with_encoder=False` builds the decoder only
    (no SigLIP, no transformers needed at run time beyond import); `num_fp16_res` runs that many top decoder
    blocks in float16 on CUDA (0: upstream's decode tools); `siglip_precision` "bf16" is upstream's CUDA
    setting for the tower (its latents differ from float32 ones by bf16 rounding). `g_kwargs`/`siglip_config`
    None: the file's own `G_kwargs`/`vfm_config` when it carries them, else the official f16d32 / SigLIP2-L."""
    path = Path(path)
    raw = read_checkpoint(path, metadata_placeholders=True, mmap=True)
    file_g, file_vfm = file_architecture(raw, path)
    g_kwargs = g_kwargs or file_g or OFFICIAL_G_KWARGS
    siglip_config = siglip_config or file_vfm or SIGLIP2_LARGE_512
    state = generator_state(raw, path)
    prefixes = dict(ALWAYS_DROPPED)
    if not with_encoder:
        prefixes["vfm_encoder."] = "SigLIP2 tower (decoding only)"
    kept, dropped = _drop(state, prefixes)
    if with_encoder and not any(k.startswith(SIGLIP_PREFIX) for k in kept):
        if siglip_path is None:
            raise CheckpointError(f"{path} holds no SigLIP2 weights and encoding needs them: fetch them with "
                                  "`python -m steps.step2_download --only siglip2-large-512` and set "
                                  "vae.siglip_path: asset:siglip2-large-512 (step 3 fills in the path)")
        kept.update(read_siglip_weights(siglip_path))
    # built on the meta device, checked, loaded strictly (as vavae.load_frozen, plus the tower's position ids)
    with torch.device("meta"):
        model = VFMVAE(g_kwargs, siglip_config=siglip_config, with_encoder=with_encoder)
    _check(kept, {k: tuple(v.shape) for k, v in model.state_dict().items()}, path)
    model.load_state_dict(kept, strict=True, assign=True)
    _materialize_position_ids(model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.set_fp16_blocks(num_fp16_res)
    if with_encoder:
        model.vfm_encoder.encoder.precision = siglip_precision
    detail = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items()))
    print0(f"VFM-VAE {path.name}: loaded {len(kept)} tensors" + (f", dropped {detail}" if detail else ""))
    return model
