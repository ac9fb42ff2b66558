"""A shareable model folder: the EMA weights as safetensors, the resolved config, the latent statistics,
the tokenizer (or the step-2 asset that provides it), an index with every file's sha256, and a model card.

    info = export_model(cfg, "my_model", step=40000, metrics=metrics)   # cfg: a config step 4 can sample with
    cfg, info = read_export("my_model")                                 # every file checked against the index

Layout of the folder (what `repro.api.Pipeline.from_pretrained(folder or repo id)` reads):

- `model.safetensors`: the LightningDiT weights alone (the checkpoint's `ema`, else its `model`; prefixes
  stripped), safe to load anywhere (no pickle); its header names the model type and where the weights came from;
- `config.yaml`: the resolved config, its paths relative to the folder (`ckpt_path: model.safetensors`,
  `data.data_path: latents_stats.pt`, `vae.ckpt_path:` the copied tokenizer, or `asset:vavae-f16d32` when the
  tokenizer is step 2's official download: 800 MB that every user fetches once, verified, from its own repo);
- `latents_stats.pt`: the statistics the model was trained with (upstream's `{'mean', 'std'}`);
- `export.json`: the index: every file's sha256 and size, the model type, classes (and their names), the
  training step, the metrics step 8 measured (when known) and the kit version;
- `README.md`: the model card (`repro.hub.model_card`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from repro import __version__, paths
from repro.config import Config, load_config, save_config
from repro.data.stats import STATS_NAME
from repro.errors import ReproError
from repro.utils.hashing import HashCache
from repro.utils.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, atomic_write_text, make_dirs

INDEX = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CARD = "README.md"
FORMAT = "repro-lightningdit"
VERSION = 1
# Config keys that hold paths of the exporting machine and mean nothing elsewhere: left unset in the export.
LOCAL_ONLY_KEYS = ("data.valid_path", "data.fid_reference_file", "train.ckpt", "train.weight_init")


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, key, value)


def _stats_file(cfg: Config) -> Path:
    from repro.sampling.engine import stats_path

    return stats_path(cfg)


def vae_asset_name(vae_path: str | os.PathLike) -> Optional[str]:
    """The step-2 asset (a download in configs/assets.yaml, not a kit-local stand-in) whose recorded file is
    `vae_path`, or None: such a tokenizer is referenced by name instead of being copied into the export."""
    from repro.data.synthetic import LOCAL_ASSETS

    entries, table = paths.read_asset_table()
    target = Path(vae_path).expanduser().absolute()
    for name in entries:
        if name in LOCAL_ASSETS:
            continue
        recorded = paths.recorded_asset_path(entries, name, table.parent)
        if recorded is not None and recorded.exists() and os.path.samefile(recorded, target):
            return name
    return None


def ema_weights(checkpoint: str | os.PathLike) -> tuple[dict, str]:
    """(the weights to share, which part of the checkpoint they are: 'ema', 'model' or 'state_dict')."""
    from repro.models.checkpoint import read_checkpoint, select_state_dict

    state, source = select_state_dict(read_checkpoint(checkpoint), checkpoint, prefer="ema")
    # safetensors stores each tensor's own contiguous bytes; shared storage (tied views) is refused by it
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, source


def export_model(cfg: Config, out: str | os.PathLike, *, step: Optional[int] = None,
                 metrics: Optional[dict] = None, class_names: Optional[Sequence[str]] = None,
                 source: str = "", include_vae: Optional[bool] = None, repo_id: Optional[str] = None) -> dict:
    """Write the shareable folder `out` from `cfg` (its ckpt_path, vae.ckpt_path and data.data_path are read);
    returns the index (export.json's content) with `folder` added. `include_vae` None: the tokenizer is
    referenced by asset name when it is step 2's download, else copied; True copies it always. `repo_id`
    names the Hub repo in the card's loading example."""
    from repro.hub.model_card import model_card
    from repro.sampling.engine import check_inputs

    check_inputs(cfg)  # every input file present and the sampler settings implemented, before writing anything
    out = make_dirs(Path(out).expanduser())
    # The weights: EMA (or the model's when a checkpoint has no EMA), safetensors with the model named in its header.
    weights, weights_source = ema_weights(cfg.ckpt_path)
    atomic_save_safetensors(weights, out / WEIGHTS, metadata={
        "format": "pt", "repro_model_type": cfg.model.model_type, "repro_weights": weights_source,
        "repro_version": __version__})
    files = [WEIGHTS]
    # The statistics, and the tokenizer: copied, or named as the step-2 asset it is.
    atomic_write_bytes(out / STATS_NAME, _stats_file(cfg).read_bytes())
    files.append(STATS_NAME)
    vae_asset = None if include_vae else vae_asset_name(cfg.vae.ckpt_path)
    exported = copy.deepcopy(cfg)
    if vae_asset is not None:
        _set(exported, "vae.ckpt_path", f"asset:{vae_asset}")
    else:
        vae_name = f"tokenizer/{Path(cfg.vae.ckpt_path).name}"
        make_dirs(out / "tokenizer")
        atomic_write_bytes(out / vae_name, Path(cfg.vae.ckpt_path).expanduser().read_bytes())
        _set(exported, "vae.ckpt_path", vae_name)
        files.append(vae_name)
    # The config, its paths relative to the folder; local-only paths unset.
    _set(exported, "ckpt_path", WEIGHTS)
    _set(exported, "data.data_path", STATS_NAME)
    for key in LOCAL_ONLY_KEYS:
        _set(exported, key, None)
    save_config(exported, out / CONFIG, header=[
        f"exported by repro {__version__} from {source or cfg.ckpt_path}",
        "paths are relative to this folder: load it with repro.Pipeline.from_pretrained(FOLDER or REPO_ID)"])
    files.append(CONFIG)
    # The index, then the card (which the index lists too).
    info = {"format": FORMAT, "version": VERSION, "kit_version": __version__, "model_type": cfg.model.model_type,
            "image_size": cfg.data.image_size, "num_classes": cfg.data.num_classes,
            "class_names": list(class_names) if class_names else None, "step": step, "weights": weights_source,
            "vae_asset": vae_asset, "source": str(source or cfg.ckpt_path), "metrics": metrics or None,
            "parameters": int(sum(v.numel() for v in weights.values())), "sample": _sampler(cfg)}
    with HashCache() as cache:
        digest = lambda name: {"sha256": cache.sha256(out / name), "size": (out / name).stat().st_size}  # noqa: E731
        info["files"] = {name: digest(name) for name in files}
        atomic_write_text(out / CARD, model_card(exported, info, repo_id))  # its file table lists the others
        info["files"][CARD] = digest(CARD)
    atomic_write_json(out / INDEX, info)
    return {**info, "folder": str(out)}


def _sampler(cfg: Config) -> dict:
    s = cfg.sample
    return {"method": s.sampling_method, "num_steps": s.num_sampling_steps, "cfg_scale": s.cfg_scale,
            "cfg_interval_start": s.cfg_interval_start, "timestep_shift": s.timestep_shift,
            "cfg_channels": s.cfg_channels, "precision": s.precision}


def read_index(folder: str | os.PathLike) -> dict:
    """export.json of `folder`, checked to be this kit's format; one line naming the file otherwise."""
    path = Path(folder) / INDEX
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReproError(f"{path} not found: {folder} is not a folder written by Pipeline.export / "
                         "`python -m steps.step11_export`") from None
    except (OSError, ValueError) as e:
        raise ReproError(f"{path} is unreadable ({e}); export the model again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("files"), dict):
        raise ReproError(f"{path} is not a {FORMAT} index (format {info.get('format') if isinstance(info, dict) else None!r}); "
                         "export the model again with this kit")
    if int(info.get("version", 0)) > VERSION:
        raise ReproError(f"{path} is export format version {info['version']}, newer than this kit reads ({VERSION}): "
                         "upgrade the kit (pip install -U repro)")
    return info


def check_files(folder: str | os.PathLike, info: dict) -> None:
    """Every file the index lists is present with its sha256 (hashed once, then cached by stat)."""
    folder = Path(folder)
    with HashCache() as cache:
        for name, entry in info["files"].items():
            path = folder / name
            if not path.is_file():
                raise ReproError(f"{path} is missing (listed in {folder / INDEX}); export or download the model again")
            got = cache.sha256(path)
            if got != entry.get("sha256"):
                raise ReproError(f"{path}: sha256 {got} does not match {entry.get('sha256')} in {folder / INDEX}; "
                                 "the file was changed or damaged: export or download the model again")


def read_export(folder: str | os.PathLike, overrides: Optional[list[str]] = None) -> tuple[Config, dict]:
    """(a config to sample with, the index) of an exported folder: files verified, paths made absolute.
    A tokenizer named as a step-2 asset stays `asset:NAME` (the caller fetches and resolves it)."""
    folder = Path(folder).expanduser().absolute()
    info = read_index(folder)
    check_files(folder, info)
    cfg = load_config(folder / CONFIG, overrides)
    _set(cfg, "ckpt_path", str(folder / WEIGHTS))
    _set(cfg, "data.data_path", str(folder / STATS_NAME))
    if cfg.vae.ckpt_path and not str(cfg.vae.ckpt_path).startswith("asset:"):
        _set(cfg, "vae.ckpt_path", str(folder / cfg.vae.ckpt_path))
    return cfg, info
