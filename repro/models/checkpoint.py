"""Safe, exact checkpoint loading for LightningDiT (official releases and our training checkpoints).

- `.safetensors` is read directly; `.pt`/`.pth`/`.ckpt` only with `torch.load(weights_only=True)`,
  so a pickle that would run code is refused, never executed.
- Official and training checkpoints are a bare state dict or a dict with `ema` (preferred) and/or
  `model`; DDP's `module.` and torch.compile's `_orig_mod.` prefixes are stripped.
- Loading is strict: a missing/unexpected key or a shape mismatch raises CheckpointError naming it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from repro.errors import CheckpointError
from repro.utils.distributed import print0

_PREFIXES = ("module.", "_orig_mod.")
# Training frameworks pickle run metadata next to the weights (Lightning callbacks and hyper-parameters,
# OmegaConf configs, paths). Classes from these modules may be read as inert placeholders (see below).
METADATA_MODULES = ("omegaconf.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "pathlib.", "argparse.")


class MetadataPlaceholder:
    """Stands in for a run-metadata object of a checkpoint: keeps its arguments and state, runs nothing."""

    original = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.original}>"


def _metadata_class_name(name: str) -> bool:
    """A module-level class (CapWords, no nested attribute) of a known metadata module: never a function."""
    last = name.rpartition(".")[2]  # "pathlib.Path.touch" -> "touch": a method, refused
    return name.startswith(METADATA_MODULES) and last[:1].isupper()


def _load_with_placeholders(path: Path, error: pickle.UnpicklingError) -> Any:
    """Weights-only load where known metadata classes become MetadataPlaceholder subclasses.

    Still `weights_only=True`: the restricted unpickler only ever calls our placeholder classes, so no
    code from the file runs. Any other global (a function, an unknown class) is refused as before.
    """
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (ValueError, RuntimeError, OSError, zipfile.BadZipFile):  # a raw or legacy (pre-zip) pickle: refused below
        names = []
    refused = [n for n in names if not _metadata_class_name(n)]
    if not names or refused:
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses ({', '.join(refused[:5]) or error}); "
            "they are not executed. Use the official file, or an EMA-only safetensors export of a kit run: "
            "`python -m steps.step11_export --from RUN_FOLDER --out DIR` (Pipeline.from_pretrained(RUN).export(DIR))"
        ) from None
    stubs = [(type(n.rpartition(".")[2], (MetadataPlaceholder,), {"original": n}), n) for n in names]
    with torch.serialization.safe_globals(stubs):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    print0(f"{path.name}: {len(names)} run-metadata type(s) read as inert placeholders "
           f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); only tensors are used")
    return obj


def read_checkpoint(path: str | os.PathLike, metadata_placeholders: bool = False, mmap: bool = False) -> Any:
    """Read a checkpoint file safely; returns whatever it holds (dict of tensors, or nested dicts).

    `metadata_placeholders=True` (for framework checkpoints such as the official VA-VAE, a Lightning
    file) reads run-metadata classes of METADATA_MODULES as inert placeholders instead of refusing.
    `mmap=True` maps the tensors of a zip-format `.pt` file instead of copying them into memory
    (processes reading the same file share the page cache); legacy (pre-1.6) files are read as usual.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (run `python -m steps.step2_download` or fix the path)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); delete it and download again") from None
    try:
        if mmap and zipfile.is_zipfile(path):  # torch.load's mmap needs the zip format (torch >= 1.6 files)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if metadata_placeholders:
            return _load_with_placeholders(path, e)
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses ({str(e).splitlines()[0]}); "
            "this file is not a plain checkpoint and is not executed. Use the official file, or an EMA-only safetensors "
            "export of a kit run: `python -m steps.step11_export --from RUN_FOLDER --out DIR`"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]}); delete it and download/save it again"
        ) from None


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def select_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>", prefer: str = "ema") -> tuple[dict, str]:
    """Pick the weights inside a checkpoint: `ema` (default) or `model`, else a bare state dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict with 'ema'/'model'")
    order = [prefer] + [k for k in ("ema", "model", "state_dict") if k != prefer]
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            return strip_prefixes(obj[key]), key
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(obj):
        return strip_prefixes(tensors), "state_dict"
    raise CheckpointError(
        f"{path} has neither 'ema' nor 'model' weights and is not a bare state dict (top-level keys: "
        f"{', '.join(sorted(map(str, obj))[:8])})"
    )


def read_state_dict(path: str | os.PathLike, prefer: str = "ema",
                    metadata_placeholders: bool = False) -> dict[str, torch.Tensor]:
    """The weights inside `path` (see `select_state_dict`), prefixes stripped."""
    return select_state_dict(read_checkpoint(path, metadata_placeholders), path, prefer)[0]


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Raise CheckpointError naming missing/unexpected keys or the first shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{path} does not match the model: {'; '.join(parts)} "
                              "(is model.model_type / the config right for this checkpoint?)")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: '{k}' has shape {tuple(state_dict[k].shape)} but the model expects {tuple(v.shape)} "
                "(check model.model_type, model.in_chans, data.image_size / vae.downsample_ratio and num_classes)"
            )


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, prefer: str = "ema") -> dict[str, Any]:
    """Load official or training weights into `model` with strict=True. Returns {'path', 'source'}."""
    state_dict, source = select_state_dict(read_checkpoint(path), path, prefer)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return {"path": str(path), "source": source}
