"""A whole sampling run: plan, resume, sample on every process, write PNGs, pack the npz or the grid.

    result = run_sampling(cfg, out_dir="runs/samples/x", num_samples=50_000, batch_size=64)
    result["npz"], result["summary"]

Layout of `out_dir`: `images/{index:06d}.png`, `samples.npz` (FID mode) or `demo_samples.png`
(demo), with `trajectory=K` also `trajectories/{index:06d}.png` (kit: issue 13; per image, the model's
predicted clean sample x1_hat = x_t + (1 - t) v at K evenly spread steps of the grid, noisiest left,
decoded; t = 0 is noise, t = 1 data, v = x1 - x0), `config.yaml` (the resolved config the run used) and `run.json` (what fixes the pixels:
seed, batch size, labels, precision, sampler settings, and the sha256 of the checkpoint, the VA-VAE
and the latent statistics). Running the same command again finishes only the missing batches; a run
that asks for different pixels in the same folder is refused with the setting or the file that
differs (a checkpoint replaced by another run's under the same name included). A run.json from
before the hashes is extended only if none of the three files changed after the folder's first
image was written. SIGTERM/SIGINT drop the batch in flight, write the finished images and stop
with `repro.errors.Preempted` (exit 143/130): the same command finishes the run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from repro import paths
from repro.config import Config, save_config
from repro.errors import Preempted, ReproError
from repro.data.class_names import describe_labels, names_for, resolve_labels
from repro.data.npz import npz_count
from repro.sampling import engine, plan
from repro.sampling import latent_shards as latent_files
from repro.sampling.grid import grid_shape, load_images, save_grid, save_preview
from repro.sampling.writer import ImageWriter, pack_npz
from repro.utils import distributed as du
from repro.utils.distributed import print0
from repro.utils.hardware import GiB, describe_device, is_oom, peak_memory, reset_peak_memory
from repro.utils.hashing import HashCache
from repro.utils.io import atomic_write_json, make_dirs, remove_stale_temps
from repro.utils.preemption import BatchDropped, StopNow, StopSignals, signal_name

# Settings that change pixels; a resumed run must match them (the batch size too: see plan.py).
_SAMPLE_KEYS = ("mode", "sampling_method", "atol", "rtol", "num_sampling_steps", "cfg_scale",
                "cfg_interval_start", "timestep_shift", "cfg_channels")


def default_out_dir(cfg: Config, demo: bool) -> Path:
    """runs/demo, or runs/samples/<upstream-style folder name> (inference.py's naming)."""
    if demo:
        return paths.runs_dir() / "demo"
    s = cfg.sample
    ckpt = Path(cfg.ckpt_path or "model").stem
    name = f"{cfg.model.model_type.replace('/', '-')}-ckpt-{ckpt}-{s.sampling_method}-{s.num_sampling_steps}"
    if s.cfg_scale > 1.0:
        name += f"-interval{s.cfg_interval_start:.2f}-cfg{s.cfg_scale:.2f}-shift{s.timestep_shift:.2f}"
    return paths.runs_dir() / "samples" / name.lower()


def _record(cfg: Config, seed: int, batch: int, n: int, mode: str, labels: Optional[Sequence[int]],
            setup: engine.SamplerSetup, inputs: dict, trajectory: Optional[int] = None) -> dict:
    s = dataclasses.asdict(cfg.sample)
    return {"trajectory": trajectory, "seed": seed, "batch_size": batch, "num_samples": n, "label_mode": mode,
            "labels": list(labels) if labels else None, "precision": setup.precision,
            "vae_precision": setup.vae_precision, "sample": {k: s[k] for k in _SAMPLE_KEYS},
            "ckpt": Path(cfg.ckpt_path).name, "model_type": cfg.model.model_type,
            "image_size": cfg.data.image_size, "num_classes": cfg.data.num_classes, "inputs": inputs}


def input_hashes(cfg: Config) -> dict:
    """{config key: {"file", "sha256"}} of the three files that fix the pixels: the checkpoint, the VA-VAE
    and the latent statistics (hashed once, then answered from runs/sha256_cache.json)."""
    files = {"ckpt_path": Path(cfg.ckpt_path), "vae.ckpt_path": Path(cfg.vae.ckpt_path),
             "data.data_path": engine.stats_path(cfg)}
    with HashCache() as cache:
        return {key: {"file": str(p.expanduser().absolute()), "sha256": cache.sha256(p.expanduser())}
                for key, p in files.items()}


def _mismatch(old: dict, new: dict) -> Optional[tuple[str, object, object]]:
    """The first pixel-relevant setting that differs between a folder's record and this run, if any."""
    def flat(d: dict) -> dict:
        return {**{k: v for k, v in d.items() if k not in ("sample", "inputs")},
                **{f"sample.{k}": v for k, v in d.get("sample", {}).items()}}
    before, now = flat(old), flat(new)
    if old.get("inputs"):
        before.pop("ckpt", None)  # the file's content is compared (by sha256), not its name
    for key, value in now.items():
        if key == "num_samples" and new["label_mode"] != "balanced":
            continue  # uniform/fixed labels: image i is the same whatever N is, so a run may be extended
        if key in before and before[key] != value:
            return key, before[key], value
    return None


def _changed_input(old: dict, new: dict, out: Path) -> Optional[str]:
    """Why the folder's images came from other input files than this run's (None if they did not)."""
    for key, now in new["inputs"].items():
        was = (old.get("inputs") or {}).get(key)
        if was and was.get("sha256") != now["sha256"]:
            return (f"{out} holds samples made from {key} {was.get('file')} with sha256 {was.get('sha256')}; this "
                    f"run's {now['file']} has sha256 {now['sha256']}: run with the old file to resume, or choose a "
                    "new --out")
    return None


def _legacy_record_check(old: dict, new: dict, images_dir: Path, record_path: Path) -> None:
    """A run.json written before input hashes: extend the folder only if no input file changed after its
    first image was written (a file replaced since would mix two models); then the hashes are recorded."""
    done = plan.existing_indices(images_dir)
    if old.get("inputs") or not done:
        return
    first = min(plan.image_path(images_dir, i).stat().st_mtime for i in done)
    for key, now in new["inputs"].items():
        if Path(now["file"]).stat().st_mtime > first:
            raise ReproError(f"{record_path} predates input hashes and {now['file']} ({key}) was modified after the "
                             f"first image in {images_dir} was written, so the folder may mix two models: choose a "
                             "new --out (or delete that folder to sample it again)")
    print0(f"note: {record_path} predates input hashes; the input files are older than the folder's first image, "
           "so it is extended, and their sha256 are recorded from now on")


def _read_record(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReproError(f"{path} is unreadable ({e}): delete it (the PNGs stay) and run again") from None


def run_sampling(cfg: Config, *, out_dir: Optional[str] = None, num_samples: Optional[int] = None,
                 batch_size: Optional[int | str] = None, seed: Optional[int] = None, class_balanced: bool = False,
                 labels: Optional[Sequence[int | str]] = None, precision: Optional[str] = None,
                 compile: Optional[str | bool] = None, demo: bool = False, device: Optional[str] = None,
                 progress: bool = True, threaded_writer: bool = True, config_header: Sequence[str] = (),
                 trajectory: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 latent_shards: bool = False) -> dict:
    """Sample (or finish sampling) `num_samples` images on this process's share of the batches.

    `trajectory=K` also writes each image's x0 strip (see the module docstring). `labels` are ids or class
    names; `class_names` (the names in label order, or a file with one a line) resolve them and title the
    preview (default: the class folders step 6 recorded in data.data_path's extract_report.json, else
    ImageNet's names for a 1000-class model: repro.data.class_names). `latent_shards` also writes the
    tokenizer-space latents in upstream's shard layout (repro.sampling.latent_shards)."""
    rank, world = du.get_rank(), du.get_world_size()

    # --- What to sample: seed, labels, how many ---------------------------------------------------
    seed = cfg.sample.seed if seed is None else int(seed)
    num_classes = cfg.data.num_classes
    names, names_source = names_for(num_classes, cfg.data.data_path, class_names)
    if demo and not labels:
        labels, why = plan.demo_labels(num_classes)
        print0(f"demo labels: {describe_labels(labels, names)} ({why})")
    elif labels and not all(isinstance(v, int) for v in labels):  # names ("golden retriever") or digit strings
        labels = resolve_labels(labels, names, names_source)
        print0(f"labels: {describe_labels(labels, names)}")
    if labels:
        plan.check_labels(labels, num_classes)
        if class_balanced:
            raise ReproError("--labels and --class-balanced exclude each other: give one")
    n = int(num_samples if num_samples is not None else (len(labels) if demo else cfg.sample.fid_num))
    mode = "fixed" if labels else ("balanced" if class_balanced else "uniform")
    all_labels = plan.plan_labels(n, num_classes, seed, "balanced" if class_balanced else "uniform", labels)

    # --- The models, and the batch size: --batch-size, else the folder's (resume), else the config's
    out = paths.runs_path(str(out_dir)) if out_dir else default_out_dir(cfg, demo)  # runs:REL as in every step
    images_dir, record_path, strips_dir = out / "images", out / "run.json", out / "trajectories"
    old = _read_record(record_path)
    steps = (engine.trajectory_steps(cfg.sample.num_sampling_steps, int(trajectory), cfg.sample.sampling_method)
             if trajectory else None)
    setup = engine.build_sampler(cfg, device=device, precision=precision, compile=compile)
    inputs = du.run_on_main(input_hashes, cfg)
    chosen = batch_size if batch_size is not None else (old["batch_size"] if old else cfg.sample.per_proc_batch_size)
    if chosen == "auto":
        chosen, why = engine.auto_batch_size(setup, limit=-(-n // world))
        chosen = int(du.all_reduce_values([chosen], "min")[0])  # every process must use the same batches
        print0(f"batch size {chosen} per process ({why})")
    batch = int(chosen)
    if batch < 1:
        raise ReproError(f"--batch-size must be >= 1, got {batch}")

    # --- The folder: refuse other pixels in it (a demo is replaced), record this run -------------
    # a run without --trajectory keeps the folder's strip setting; another K than the strips' is refused below
    record = _record(cfg, seed, batch, n, mode, labels, setup, inputs, trajectory or (old or {}).get("trajectory"))
    diff = _mismatch(old, record) if old else None
    changed = _changed_input(old, record, out) if old else None
    if diff and not demo:
        key, was, now = diff
        raise ReproError(f"{out} holds samples made with {key}={was!r} ({record_path}); this run asks for "
                         f"{key}={now!r}: run with the old value to resume, or choose a new --out")
    if changed and not demo:
        raise ReproError(changed)
    if old and not demo:
        du.run_on_main(_legacy_record_check, old, record, images_dir, record_path)
    if diff or changed:  # a demo is 8 images: other settings replace it rather than stop the run
        print0(f"note: replacing the demo in {out}, made with "
               + (f"{diff[0]}={diff[1]!r}" if diff else "other input files (sha256 differs)"))
        du.barrier()
        if du.is_main():
            for i in plan.existing_indices(images_dir):
                plan.image_path(images_dir, i).unlink(missing_ok=True)
    if du.is_main():
        make_dirs(images_dir)
        if steps:
            make_dirs(strips_dir)
            remove_stale_temps(strips_dir)
        stale = remove_stale_temps(images_dir) + remove_stale_temps(out)
        if stale:
            print0(f"removed {stale} half-written file(s) left by an interrupted run")
        save_config(cfg, out / "config.yaml", header=["Resolved config of this sampling run (step 4)",
                                                       *config_header])
        atomic_write_json(record_path, record)
    du.barrier()

    # --- This process's unfinished batches -------------------------------------------------------
    total = plan.num_batches(n, batch)
    done = plan.existing_indices(images_dir)
    if steps:  # a batch is done when its images and its strips exist
        done &= plan.existing_indices(strips_dir)
    if latent_shards:  # ... and its latents, when asked for
        done &= latent_files.done_indices(out)
    mine = plan.pending_batches(plan.my_batches(total, rank, world), batch, n, done)
    already = sum(1 for i in range(n) if i in done)
    todo = sum(len(plan.batch_indices(k, batch, n)) for k in mine)
    print0(f"sampling {n} images into {out}: {already} already there; batch {batch} x {world} process(es), "
           f"{setup.precision} on {describe_device(setup.device)}, {cfg.vae.model_name} decode {setup.vae_precision}")

    # --- Sample: the accelerator runs the ODE while a thread decodes and writes the last batch ----
    if mine:
        engine.warm_up(setup, batch)  # compile / capture at the real shapes first (GPU default), timed apart
    stats: dict = {}
    reset_peak_memory(setup.device)
    start = time.perf_counter()
    # SIGTERM/SIGINT drop the batch in flight; the finished ones are written, then Preempted is raised.
    bar = _progress(todo, progress and du.is_main(), world)
    try:
        def decode(item):  # (latents, index of the batch's first image, strips?)
            if item[2]:
                return engine.decode_strips(setup, item[0], first_index=item[1])
            return engine.decode_to_uint8(setup, item[0], first_index=item[1])

        with StopSignals("dropping the batch in flight, writing the finished images") as stops, \
                ImageWriter(decode, threaded=threaded_writer) as writer:
            for k in mine:
                if stops.signum:
                    break
                idx = plan.batch_indices(k, batch, n)
                noise = plan.batch_noise(seed, idx, setup.latent_shape)
                try:
                    with stops.droppable():
                        if steps:
                            x, strips = engine.sample_latents_with_trajectory(
                                setup, noise, all_labels[idx.start:idx.stop], steps, stats)
                        else:
                            x = engine.sample_latents(setup, noise, all_labels[idx.start:idx.stop], stats)
                except BatchDropped:
                    break
                if latent_shards:  # saved before the PNGs: a batch with PNGs and no latents is sampled again
                    latent_files.save_batch(out, idx.start, engine.denormalize(setup, x),
                                            all_labels[idx.start:idx.stop])
                writer.submit((x, idx.start, False), [plan.image_path(images_dir, i) for i in idx])
                if steps:
                    writer.submit((strips, idx.start, True), [plan.image_path(strips_dir, i) for i in idx])
                if k == mine[0]:  # the wall time, estimated from the first batch, before the bulk starts
                    _estimate(setup, start, len(idx), todo, world, fid=not demo)
                if bar is not None:
                    bar.update(len(idx))
    except (RuntimeError, MemoryError) as e:
        if is_oom(e):
            raise engine.oom_error(batch, setup, e) from None
        raise
    except StopNow as e:  # the second signal: the writer thread has been joined, stop with 128 + signum
        have = sum(1 for i in plan.existing_indices(images_dir) if i < n)
        raise Preempted(f"stopped at once by a second {signal_name(e.signum)}: {have} of {n} images are written in "
                        f"{images_dir} (queued ones were dropped); resume with the same command", e.signum) from None
    finally:
        if bar is not None:
            bar.close()
    # A signal ends the run here (Preempted); otherwise the totals over processes: new images summed, the
    # slowest process's time and the largest peak memory.
    _stop_if_signalled(stops.signum, images_dir, n)
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    elapsed = time.perf_counter() - start
    peak, peak_what = peak_memory(setup.device)
    new = int(du.all_reduce_values([todo], "sum")[0])
    elapsed, peak = du.all_reduce_values([elapsed, peak], "max")
    peak = int(peak)
    du.barrier()

    # --- Outputs: the labelled preview, then the demo grid or samples.npz (rank 0) ----------------
    result = {"out_dir": str(out), "images_dir": str(images_dir), "config": str(out / "config.yaml"),
              "record": str(record_path), "num_samples": n, "new_images": new, "existing_images": already,
              "batch_size": batch, "world_size": world, "precision": setup.precision, "seed": seed,
              "labels": all_labels.tolist() if n <= 64 else None, "npz": None, "grid": None,
              "preview": None, "class_names": names, "trajectories_dir": str(strips_dir) if steps else None,
              "trajectory_steps": steps}
    if du.is_main():
        first = load_images([plan.image_path(images_dir, i) for i in range(min(n, 8))])
        title = f"{cfg.model.model_type}, cfg {cfg.sample.cfg_scale:g}, {cfg.sample.num_sampling_steps} steps"
        result["preview"] = str(save_preview(first, all_labels[:8].tolist(), out / "preview.png", title,
                                             class_names=names))
        if demo:
            rows, cols = grid_shape(n, 4)
            images = first if n <= 8 else load_images([plan.image_path(images_dir, i) for i in range(n)])
            result["grid"] = str(save_grid(images, out / "demo_samples.png", rows, cols))
        else:
            npz = out / "samples.npz"
            if new or npz_count(npz) != n:
                pack_npz(images_dir, n, npz, labels=all_labels.numpy())
            result["npz"] = str(npz)
        if latent_shards:
            result["latent_shards"] = [str(p) for p in latent_files.pack_shards(out, n)]
    du.barrier()

    # --- Summary: model calls and rows per image, speed, peak memory -------------------------------
    batches_run, nfe_sum, rows_sum = du.all_reduce_values(
        [len(mine), stats.get("nfe", 0), stats.get("model_rows", 0)], "sum")
    nfe = nfe_sum / batches_run if batches_run else None  # calls per batch = calls per image
    rows = rows_sum / new if new else None
    rate = new / elapsed if new and elapsed > 0 else None
    result.update(nfe_per_image=nfe, model_rows_per_image=rows, images_per_s=rate, seconds=elapsed,
                  peak_memory_bytes=peak, peak_memory_kind=peak_what)
    result["summary"] = (f"{n} images ({new} new) in {out}: "
                         f"{'-' if nfe is None else f'{nfe:g}'} NFE per image, "
                         f"{'-' if rate is None else f'{rate:.3g}'} images/s, "
                         f"peak memory {peak / GiB:.2f} GiB ({peak_what}), {setup.precision}, "
                         f"batch {batch} x {world} process(es)")
    if rate and not demo:  # a demo grid's pace (warm-up included, 8 images) says nothing about FID-50K
        result["summary"] += f"; {FID_IMAGES:,} images at this rate: {FID_IMAGES / rate / 3600:.2f} h"
    print0(result["summary"])
    made = [result["grid"] or result["npz"], result["preview"], f"{images_dir}/ ({n} PNGs)", result["config"],
            result["record"]] + ([f"{strips_dir}/ (x0 strips)"] if steps else [])
    print0("wrote: " + ", ".join(str(m) for m in made if m))
    return result


FID_IMAGES = 50_000  # the FID protocol's sample count


def _estimate(setup, start: float, images: int, todo: int, world: int, fid: bool = True) -> None:
    """Print this run's and (`fid`) an FID-50K run's wall time at the first batch's pace (all processes alike)."""
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    seconds = time.perf_counter() - start
    if seconds <= 0 or images == 0:
        return
    rate = images * world / seconds  # images per second over all processes
    fid_time = f", {FID_IMAGES / rate / 3600:.2f} h for {FID_IMAGES:,} images" if fid else ""
    left = todo * world / rate
    print0(f"first batch: {seconds:.1f}s for {images} image(s) per process -> about "
           f"{f'{left:.0f} s' if left < 60 else f'{left / 60:.1f} min'} for this run{fid_time} on {world} process(es) "
           f"({describe_device(setup.device)})")


def _stop_if_signalled(signum: Optional[int], images_dir: Path, n: int) -> None:
    """After a SIGTERM/SIGINT on any process (all agree): Preempted naming what is on disk."""
    signum = int(du.all_reduce_values([signum or 0], "max")[0])
    if not signum:
        return
    du.barrier()
    have = sum(1 for i in plan.existing_indices(images_dir) if i < n)
    raise Preempted(f"stopped by {signal_name(signum)}: {have} of {n} images are written in {images_dir} (a batch "
                    "in flight, if any, was dropped); resume with the same command", signum)


def _progress(total: int, enabled: bool, world: int):
    if not enabled or total == 0:
        return None
    from repro.utils.progress import progress_bar

    desc = "sampling" if world == 1 else f"sampling (rank 0 of {world})"
    return progress_bar(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)
