"""Training checkpoints: what they hold, how they are written, found again, pruned, and restored.

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

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from repro.config import Config, config_diff, config_from_dict
from repro.errors import CheckpointError, ConfigError, ReproError
from repro.models.checkpoint import check_state_dict, read_checkpoint, strip_prefixes
from repro.utils.io import atomic_torch_save, atomic_write_json, disk_full, remove_stale_temps

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
    cuda = ([s.clone() for s in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    return {
        "torch_cpu": torch.get_rng_state().clone(),
        "torch_cuda": cuda,
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if (cuda := state.get("torch_cuda")) and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------
# Writing


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts/lists/tuples, depth first in their order."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from iter_tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists (what torch.save will write, give or take ~1%)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


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


def save_training_checkpoint(path: str | os.PathLike, state: dict, *, keep_last: int = 0,
                             last_good: Optional[Path] = None) -> Path:
    """Write `state` (model, ema, opt, config, scaler, step, data_order, rng, kit) atomically after checking the
    disk has room; a full disk is a CheckpointError, the old files intact."""
    state = dict(state, step=int(state["step"]), kit=dict(state.get("kit") or {}, format=FORMAT))
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
    doomed = [p for _, p in list_checkpoints(folder)[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# Reading


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (weights_only) and check it has what a resume needs; CheckpointError otherwise.

    Upstream checkpoints (model/ema/opt/config, no `step`) get their step from the file name.
    Memory-mapped (kit: issue 16): every process of a node reads the same pages of the page cache
    instead of holding its own ~10.8 GB copy (XL/1) while the state is restored.
    """
    obj = read_checkpoint(path, mmap=True)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a training checkpoint dict")
    if "step" not in obj and (step := step_from_name(path)) is not None:
        obj["step"] = step
    if missing := [k for k in REQUIRED_KEYS if k not in obj]:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)} (has {sorted(map(str, obj))}); "
                              "it is not a complete training checkpoint")
    return obj


def find_resume_checkpoint(folder: str | os.PathLike,
                           note: Callable[[str], None] = print) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint in `folder` and its contents, or None.

    Temp files of a killed writer are removed (counted in a note); a newer file that cannot be read
    or lacks keys is skipped with a note naming it and the reason, never silently.
    """
    if removed := remove_stale_temps(folder):
        note(f"note: removed {removed} unfinished checkpoint temp file(s) in {folder} (a save was interrupted)")
    for step, path in reversed(list_checkpoints(folder)):
        try:
            return path, read_training_checkpoint(path)
        except CheckpointError as e:
            note(f"note: skipping checkpoint {path} (step {step}): {e}")
    return None


# ----------------------------------------------------------------------------------------------
# Where a run starts, and restoring its state


def resume_point(ckpt_dir: Path, resume: bool, note: Callable[[str], None]) -> Optional[tuple[Path, dict[str, Any]]]:
    """(path, contents) of this run's newest complete checkpoint, None for a fresh run; an error when the run
    has checkpoints and `resume` is false, or none of them can be read. Steps 7 and 9 call it on rank 0."""
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise ConfigError(f"{ckpt_dir} already holds checkpoints up to step {existing[-1][0]} and train.resume is "
                          "false: set train.resume=true to continue this run, or a new train.exp_name to start another")
    if not existing:
        return None
    if (found := find_resume_checkpoint(ckpt_dir, note)) is None:
        raise ReproError(f"none of the {len(existing)} checkpoint(s) in {ckpt_dir} can be read (see the notes "
                         "above): move them elsewhere to start over, or restore a good copy")
    return found


def choose_start(cfg: Config, ckpt_dir: Path, note: Callable[[str], None]
                 ) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """(kind, path, loaded state): 'resume' (newest complete checkpoint of this run), 'ckpt' (stage 1
    continuing `train.ckpt`: weights, EMA, optimizer, step, data position), 'weight_init' (weights
    only, step 0) or None (a fresh run). Read on rank 0; the others load the same path themselves."""
    if (found := resume_point(ckpt_dir, cfg.train.resume, note)) is not None:
        return "resume", str(found[0]), found[1]
    remove_stale_temps(ckpt_dir)
    if cfg.train.ckpt:
        return "ckpt", cfg.train.ckpt, read_training_checkpoint(cfg.train.ckpt)
    if cfg.train.weight_init:
        return "weight_init", cfg.train.weight_init, None
    return None, None, None


def restore_training_state(state: dict, path: str, parts, ctx, strategy) -> tuple[int, Optional[dict]]:
    """Load a trainer's `parts` (model, ema following ema_source, opt, scaler) and this process's RNG states from
    `state` (strict, every mismatch an error naming the file); `strategy` (repro.training.strategy) loads the
    single-file state into a sharded model. Returns (step, saved data-order position or None). An EMA switched
    on since the checkpoint starts from the weights; `ema` None trains without one."""
    model, ema = parts.model, parts.ema
    model_sd, ema_sd = strip_prefixes(state["model"]), strip_prefixes(state["ema"])
    check_state_dict(model, model_sd, f"{path} ['model']")
    if ema is not None and ema_sd:
        check_state_dict(parts.ema_source, ema_sd, f"{path} ['ema']")
    strategy.load_model(model, model_sd)
    if ema is not None and ema_sd:
        ema.load_state_dict(ema_sd)
    elif ema is not None:
        ema.copy_from(parts.ema_source)
        ctx.note(f"note: {path} has no EMA (train.ema_decay was off): the EMA starts from its weights")
    try:
        strategy.load_optimizer(model, parts.opt, state["opt"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ReproError(f"{path}: the optimizer state does not fit this model ({e}); was it saved for "
                         "another model.model_type or config?") from None
    # The gradient scaler (when this run scales: an fp32/bf16 checkpoint resumed in fp16 starts a fresh one)
    # and this process's global RNG states (rank 0's, with a note, when the process count changed)
    if parts.scaler.is_enabled() and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    if rng := state.get("rng"):
        restore_rng(rng[ctx.rank] if len(rng) == ctx.world else rng[0])
        if len(rng) != ctx.world:
            ctx.note(f"note: {path} was saved by {len(rng)} process(es), this run has {ctx.world}: every process "
                     "takes rank 0's global RNG state (the data order and per-sample draws depend only on seed and "
                     "step)")
    return int(state["step"]), state.get("data_order")


def config_changes(state: dict, cfg: Config) -> list[str]:
    """'key: old -> new' for every setting that differs from the config saved in `state`."""
    try:
        old = config_from_dict(state["config"])
    except Exception:  # an upstream checkpoint's raw YAML dict, or another kit version
        return []
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff(old, cfg)
            if not k.startswith(("train.ckpt", "train.time_budget"))]


def rng_states_of_all_processes(world: int) -> list[dict]:
    """Every process's RNG states, in rank order (a collective: all processes call it)."""
    if world == 1:
        return [capture_rng()]
    import torch.distributed as tdist

    states: list = [None] * world
    tdist.all_gather_object(states, capture_rng())
    return states


# ----------------------------------------------------------------------------------------------
# kit (issue 12): which run a checkpoint belongs to, and the sha256 of the files the run started from.
# `run.json` in the run folder holds {"run_id", "sources"}; every checkpoint's `kit` repeats them, so a
# checkpoint copied in from another run, or a `train.weight_init` / `train.ckpt` file replaced since the
# run started, is refused by name instead of silently continuing a different run.

RUN_RECORD = "run.json"
SOURCE_KEYS = ("train.weight_init", "train.ckpt")


def check_run_identity(cfg, run_dir: Path, kind: Optional[str], path: Optional[str],
                       state: Optional[dict], note: Callable[[str], None]) -> dict:
    """{"run_id", "sources"} of this run (for the checkpoints' `kit`), after refusing a foreign checkpoint
    or a changed source file; writes `run_dir/run.json`. Rank 0 only (it reads and hashes files)."""
    from repro.utils.hashing import HashCache

    record_path = run_dir / RUN_RECORD
    try:  # the run record; {} when there is none (or it is not a mapping)
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ReproError(f"{record_path} is unreadable ({e}): delete it (the run rewrites it from its newest "
                         "checkpoint) and run the same command again") from None
    recorded = recorded if isinstance(recorded, dict) else {}
    # the tokenizer's config has neither key: its runs start fresh or resume
    configured = {k: v for k in SOURCE_KEYS if (v := getattr(cfg.train, k.split(".")[1], None))}
    with HashCache() as hashes:
        if kind != "resume":  # a new run: its identity, and the hash of the file it starts from
            sources = ({f"train.{kind}": {"path": str(Path(path).absolute()), "sha256": hashes.sha256(path)}}
                       if kind in ("ckpt", "weight_init") else {})
            identity = {"run_id": uuid.uuid4().hex, "sources": sources}
        else:
            kit = state.get("kit") or {}
            run_id = kit.get("run_id")
            sources = kit["sources"] if kit.get("sources") is not None else recorded.get("sources")
            if run_id and recorded.get("run_id") not in (None, run_id):
                raise CheckpointError(
                    f"{path} belongs to another run (run id {run_id}; {record_path} says {recorded['run_id']}): it "
                    f"was copied in from elsewhere; move it out of {Path(path).parent} to resume this run from its "
                    "own newest checkpoint, or give that run its own train.exp_name")
            if run_id is None or sources is None:
                note(f"note: {path} predates run ids and source hashes (an older kit): the run continues, and records "
                     f"them from now on")
            identity = {"run_id": run_id or recorded.get("run_id") or uuid.uuid4().hex,
                        "sources": sources or {}}
            for key, value in configured.items():
                _check_source(key, value, identity["sources"].get(key), run_dir, path, hashes, note)
    record = {**identity, "started_from": recorded.get("started_from", kind)}
    if recorded != record:
        atomic_write_json(record_path, record)
    return identity


def _check_source(key: str, value: str, recorded: Optional[dict], run_dir: Path, resume_path: str,
                  hashes, note: Callable[[str], None]) -> None:
    """A resumed run whose config names `key`=`value`: the file must be the one the run started from."""
    if recorded is None:  # the run did not start from it: as documented, it is used only by a fresh run
        note(f"note: {key}={value} is not used: run {run_dir} resumes from its own checkpoint {resume_path}")
        return
    if not Path(value).is_file():
        note(f"note: {key}={value} no longer exists; run {run_dir} resumes from its own checkpoint, which does "
             "not need it")
        return
    if (now := hashes.sha256(value)) != recorded.get("sha256"):
        raise ReproError(
            f"{key}={value} has sha256 {now}, but run {run_dir} started from {recorded.get('path')} with sha256 "
            f"{recorded.get('sha256')}: the file changed since. To continue this run, put the original file back or "
            f"pass --set {key}=null; to start a run from the new file, pass a new train.exp_name")
