"""Training checkpoints: what they hold, how they are written, found again and pruned.

Layout (upstream hustvl/LightningDiT train.py): `train.output_dir/train.exp_name/checkpoints/
{step:07d}.pt` holding `model`, `ema`, `opt`, `config`; upstream's loader and
`repro.models.checkpoint.load_checkpoint` read `ema`/`model` unchanged. The kit adds `scaler`,
`step`, `data_order` (position in the seeded epoch order), `rng` (torch CPU/CUDA, numpy and
Python states of every process) and `kit` (format tag, batch plan, precision). Everything is a
tensor, number, string, list or dict: the file loads with `torch.load(weights_only=True)`.

Files are written atomically (temp file, fsync, rename), so the newest file is complete unless the
disk lied; an unreadable or incomplete one is skipped on resume with a printed note naming it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from repro.errors import CheckpointError
from repro.models.checkpoint import read_checkpoint
from repro.utils.io import atomic_torch_save, disk_full, remove_stale_temps

FORMAT = "repro-train/1"
REQUIRED_KEYS = ("model", "ema", "opt", "step")
_NAME = re.compile(r"^(\d{7,})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{step:07d}.pt"


def step_from_name(path: str | os.PathLike) -> Optional[int]:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `NNNNNNN.pt` in `folder`, oldest first (by step, not by file size)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step_from_name(p), p) for p in folder.iterdir() if p.is_file()]
    return sorted((s, p) for s, p in found if s is not None)


# ----------------------------------------------------------------------------------------------
# RNG states as plain tensors and lists (weights_only-loadable)


def capture_rng() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch_cpu": torch.get_rng_state().clone(),
        "torch_cuda": cuda,
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------
# Writing


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists (what torch.save will write, give or take ~1%)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def no_room_message(folder: Path, need: int, free: int, keep_last: int, last_good: Optional[Path]) -> str:
    def size(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"

    return (f"a training checkpoint of ~{size(need)} does not fit in {folder} ({size(free)} free): "
            f"free some space, lower train.keep_last (now {keep_last}; the newest is written before older ones "
            f"are removed), or set train.output_dir on a larger disk, then run again to resume from the last "
            f"good checkpoint, {last_good or 'none yet'}")


def ensure_room(folder: str | os.PathLike, need: int, keep_last: int, last_good: Optional[Path]) -> None:
    """Refuse to start a checkpoint write that the disk cannot hold (a clear error instead of ENOSPC)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need + 64 * 2**20:  # + the pickle framing and some air
        raise CheckpointError(no_room_message(folder, need, free, keep_last, last_good))


def save_training_checkpoint(path: str | os.PathLike, *, model_state: dict, ema_state: dict, opt_state: dict,
                             scaler_state: dict, step: int, data_order: dict, rng: list[dict], config: dict,
                             kit: dict, keep_last: int = 0, last_good: Optional[Path] = None) -> Path:
    """Write atomically after checking the disk has room; a full disk is a CheckpointError, the old files intact."""
    state = {
        "model": model_state, "ema": ema_state, "opt": opt_state, "config": config,
        "scaler": scaler_state, "step": int(step), "data_order": data_order, "rng": rng,
        "kit": dict(kit, format=FORMAT),
    }
    folder = Path(path).parent
    need = tensor_bytes(state)
    ensure_room(folder, need, keep_last, last_good)
    try:
        return atomic_torch_save(state, path)
    except (OSError, RuntimeError) as e:  # torch.save wraps the writer's OSError in a RuntimeError
        if not disk_full(e):
            raise
        raise CheckpointError(no_room_message(folder, need, shutil.disk_usage(folder).free, keep_last,
                                              last_good)) from None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` numbered checkpoints; returns the deleted paths."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(folder)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# Reading


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (weights_only) and check it has what a resume needs; CheckpointError otherwise.

    Upstream checkpoints (model/ema/opt/config, no `step`) get their step from the file name.
    """
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a training checkpoint dict")
    if "step" not in obj:
        step = step_from_name(path)
        if step is not None:
            obj["step"] = step
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)} (has {sorted(map(str, obj))}); "
                              "it is not a complete training checkpoint")
    return obj


def find_resume_checkpoint(folder: str | os.PathLike,
                           note: Callable[[str], None] = print) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint in `folder` and its contents, or None.

    Temp files of a killed writer are removed (counted in a note); a newer file that cannot be read
    or lacks keys is skipped with a note naming it and the reason, never silently.
    """
    removed = remove_stale_temps(folder)
    if removed:
        note(f"note: removed {removed} unfinished checkpoint temp file(s) in {folder} (a save was interrupted)")
    for step, path in reversed(list_checkpoints(folder)):
        try:
            return path, read_training_checkpoint(path)
        except CheckpointError as e:
            note(f"note: skipping checkpoint {path} (step {step}): {e}")
    return None
