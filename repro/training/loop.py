"""LightningDiT training that a notebook's death, a 16 GB GPU or eight GPUs do not change.

`train(cfg)` runs the upstream recipe (hustvl/LightningDiT train.py; the step itself is
`repro.training.step`) on the latent shards of `data.data_path`, in one process or under torchrun
(DDP; gloo on CPU). `training_loop` reads top to bottom (after NVlabs/edm2's training_loop): set up,
pick where to start, build, restore, then the step loop with its logs, grids and checkpoints. It:

- resumes from the newest complete checkpoint of `train.output_dir/train.exp_name/checkpoints/`
  (upstream layout) with model, EMA, optimizer, scaler, step, data-order position and RNG states,
  so the resumed run is the uninterrupted one (bitwise on CPU in fp32 with `train.deterministic`);
- otherwise starts from `train.ckpt` (stage 1 continuing a stage-0 checkpoint) or
  `train.weight_init` (weights only, step 0);
- splits `train.global_batch_size` into micro-batch x processes x accumulation exactly;
- with `data.valid_path`, scores upstream's validation loss at each checkpoint step (all processes;
  `repro.training.validation`) and logs it in that step's row;
- logs every `log_every` and saves every `ckpt_every` steps as upstream, and also at `max_steps` and
  when the time budget is nearly used (so the next session continues from there);
- stops with an error naming the step at a non-finite loss (checked before every log and save, on
  the device in between: no host synchronisation per step); the last good checkpoint is kept.

    from repro.training import train
    result = train(load_config("configs/train/tiny_stage_0.yaml"))   # {'step', 'checkpoint', 'loss', ...}
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import torch

from repro import paths
from repro.config import Config, save_config
from repro.errors import ConfigError, Preempted, ReproError
from repro.models.lightningdit import build_model
from repro.training import checkpoints as ckpt
from repro.training.batches import plan_batches
from repro.training.data_order import DataOrder, DataPosition, MicroBatchStream
from repro.training.grids import GridSampler
from repro.training.logs import RunLogger, window_progress
from repro.training.saver import CheckpointWriter, check_shared_folder
from repro.training.strategy import make_strategy
from repro.training.step import StepRunner, make_optimizer, normalise_optimizer_state, take_over_label_dropout
from repro.training.validation import make_validation
from repro.utils import distributed as dist
from repro.utils.hardware import (CompiledOrEager, compile_mode, default_device, resolve_precision, set_determinism,
                                  use_compile_cache)
from repro.utils.preemption import StopSignals, signal_name
from repro.utils.seeding import SEEDING

_NONE = 2 ** 62  # "no non-finite step" when taking the minimum over processes


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.exp_name


def check_resolved(cfg: Config) -> Config:
    """A copy of `cfg` with `runs:REL` paths under the runs folder (the meaning every step gives them);
    an `asset:NAME` marker, which only step 3 can fill in, is refused naming the key."""
    # kit (issue 12): one meaning of runs: in every step (repro.paths), no longer refused here
    cfg = copy.deepcopy(cfg)
    paths.resolve_runs_markers(cfg)
    keys = ["data.data_path", "data.valid_path", "train.output_dir", "train.ckpt", "train.weight_init"]
    paths.refuse_asset_markers(cfg, keys + (["vae.ckpt_path"] if cfg.train.sample_every else []))
    return cfg


def open_latents(cfg: Config):
    """The latent dataset of `data.data_path`, checked against the model it will train."""
    from repro.data.extract import report_class_names
    from repro.data.latents import LatentShardDataset
    from repro.data.official_latents import find_shard_folder

    if not cfg.data.data_path:
        raise ConfigError("data.data_path is not set: point it at the latent shards written by step 6 "
                          "(python -m steps.step6_extract --config C --source IMAGES --out FOLDER)")
    # kit (issue 16): upstream's unpacked latents (step 6 --official) too, whose shards sit folders down
    folder, stats_path = find_shard_folder(cfg.data.data_path)
    ds = LatentShardDataset(folder, latent_norm=cfg.data.latent_norm, latent_multiplier=cfg.data.latent_multiplier,
                            stats_path=stats_path)
    if ds.channels != cfg.model.in_chans:
        raise ReproError(f"latent shards in {ds.data_dir} have {ds.channels} channels but model.in_chans is "
                         f"{cfg.model.in_chans}: they come from another tokenizer; re-extract with the VA-VAE "
                         f"f16d32 (32 channels) or set model.in_chans={ds.channels}")
    size = cfg.data.image_size // cfg.vae.downsample_ratio
    if ds.latent_size != size:
        raise ReproError(f"latent shards in {ds.data_dir} are {ds.latent_size}x{ds.latent_size} but data.image_size "
                         f"{cfg.data.image_size} / vae.downsample_ratio {cfg.vae.downsample_ratio} = {size}: fix "
                         "data.image_size or re-extract at that size")
    if ds.num_classes_seen > cfg.data.num_classes:
        raise ReproError(f"latent shards in {ds.data_dir} have labels up to {ds.num_classes_seen - 1} but "
                         f"data.num_classes is {cfg.data.num_classes}: set data.num_classes={ds.num_classes_seen}")
    # kit (issue 13): step 6's report names the class folders; the model must have exactly that many classes
    names = report_class_names(ds.data_dir)
    if names is not None and len(names) != cfg.data.num_classes:
        raise ReproError(f"data.num_classes is {cfg.data.num_classes} but the image folder of {ds.data_dir} has "
                         f"{len(names)} class folder(s) (its extract_report.json): set data.num_classes={len(names)}")
    return ds


def train(cfg: Config, *, time_budget: Optional[float] = None) -> dict:
    """Train until `train.max_steps` (or the time budget); returns step, checkpoint, loss, run_dir, stopped."""
    t_start = time.monotonic()
    dist.init()
    device = default_device()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    set_determinism(cfg.train.deterministic, device)
    try:
        budget = time_budget if time_budget is not None else cfg.train.time_budget
        # kit (issue 12): SIGTERM/SIGINT finish the optimizer step, write a checkpoint, raise Preempted
        with StopSignals("finishing this optimizer step, then writing a checkpoint") as stops:
            return training_loop(cfg, device=device, time_budget=budget, t_start=t_start, stops=stops)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def training_loop(cfg: Config, *, device: torch.device, time_budget: Optional[float], t_start: float,
                  stops: Optional[StopSignals] = None) -> dict:
    # --- Processes, precision, the run folder and the data ----------------------------------------
    rank, world, main = dist.get_rank(), dist.get_world_size(), dist.is_main()
    precision = resolve_precision(cfg.train.precision, device, "train.precision")
    cfg = check_resolved(cfg)
    run_dir = run_dir_of(cfg)
    ckpt_dir = ckpt.checkpoint_dir(run_dir)
    ds = open_latents(cfg)
    validation = make_validation(cfg, rank=rank, world=world, device=device, precision=precision)  # data.valid_path
    latent_size = cfg.data.image_size // cfg.vae.downsample_ratio
    notes: list[str] = []

    def note(message: str) -> None:  # printed now (an error may follow), written to log.txt below
        print(message, flush=True)
        notes.append(message)

    # --- Where to start: this run's newest checkpoint, train.ckpt (stage 1) or train.weight_init --
    kind, path, state = ckpt.choose_start(cfg, ckpt_dir, note) if main else (None, None, None)
    kind, path = dist.broadcast_object((kind, path))
    if not main and kind in ("resume", "ckpt"):
        state = ckpt.read_training_checkpoint(path)
    # kit (issue 12): refuse a checkpoint of another run or a changed weight_init/ckpt file (rank 0 hashes)
    identity = dist.run_on_main(ckpt.check_run_identity, cfg, run_dir, kind, path, state, note)
    check_shared_folder(run_dir)  # kit (issue 16): rank 0 writes, every node must see it
    log = RunLogger(run_dir, enabled=main, resume_step=int(state["step"]) if state else None, cfg=cfg)
    for n in notes:
        log.info(n, echo=False)

    # --- Model, EMA, optimizer, scaler (the same initial weights on every process) ---------------
    torch.manual_seed(cfg.train.global_seed)
    model = build_model(cfg.model, latent_size, cfg.data.num_classes).to(device)
    strategy = make_strategy(cfg.train, device, world)  # ddp: a replica per process; fsdp: sharded per block
    strategy.shard(model)
    ema = strategy.make_ema(model, cfg.train.ema_decay, on_cpu=cfg.train.ema_on_cpu)
    dropout_prob = take_over_label_dropout(model)
    opt = make_optimizer(model, cfg.optimizer, strategy.param_device)
    scaler = strategy.make_scaler(precision)  # fsdp + fp16: overflow checks agree across the shards

    # --- Restore the starting state --------------------------------------------------------------
    step, position = 0, None
    if state is not None:
        step, saved_position = ckpt.restore_training_state(state, path, model=model, ema=ema, opt=opt,
                                                           scaler=scaler, rank=rank, world=world, note=log.info,
                                                           strategy=strategy)
        normalise_optimizer_state(opt, cfg.optimizer, strategy.param_device)
        position = DataPosition.from_dict(saved_position) if saved_position else None
        log.info(f"{'resumed from' if kind == 'resume' else 'initialised from train.ckpt'} {path} at step {step}")
        for line in ckpt.config_changes(state, cfg):
            log.info(f"  config changed since that checkpoint: {line}")
        if "kit" in state and state["kit"].get("seeding") != SEEDING:
            log.info(f"note: {path} was written by a kit that seeded the data order and per-sample draws "
                     f"differently; from step {step} on they follow this kit's seeding ({SEEDING}): the run stays "
                     "valid, but is not bitwise the run the older kit would have continued")
        del state
    elif kind == "weight_init":
        strategy.load_weights(model, path, prefer="model")  # upstream: weight_init loads checkpoint['model']
        ema.copy_from(model)
        log.info(f"weights (not optimizer or step) initialised from train.weight_init {path}")

    # --- Batch plan, data order, the step runner and the grid sampler ----------------------------
    plan = plan_batches(cfg.train, world, fits=_fits_gpu(cfg, latent_size, precision, device))
    order = DataOrder(len(ds), plan.global_batch, cfg.train.global_seed, position, data_dir=str(ds.data_dir))
    if order.note:
        log.info(f"note: {order.note}")
    # Compiled by default on CUDA (eager if compiling fails, with one line), eager on the CPU.
    forward_model = model
    if (mode := compile_mode(cfg.train.compile, device, auto="default")) is not None:
        use_compile_cache(paths.runs_dir() / "compile_cache")
        forward_model = CompiledOrEager(model, mode, "training", note=log.info)
    forward_model = strategy.wrap(forward_model)  # DDP with several processes; FSDP needs no wrapper
    runner = StepRunner(model, forward_model, opt, scaler, ema, plan=plan, precision=precision, device=device,
                        max_grad_norm=cfg.optimizer.max_grad_norm, use_cosine_loss=cfg.transport.use_cosine_loss)
    grids = GridSampler(cfg, stats=ds.stats, device=device, precision=precision, note=log.info)

    # --- Record the run ---------------------------------------------------------------------------
    if main:
        save_config(cfg, run_dir / "config.yaml", header=f"resolved config of run {run_dir} (written by step 7)")
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run folder {run_dir}; {cfg.model.model_type} ({n_params / 1e6:.2f}M parameters) on {len(ds)} latents "
             f"{ds.channels}x{latent_size}x{latent_size} from {ds.data_dir} ({order.steps_per_epoch} steps per epoch)")
    log.info(f"{plan.describe()}; {strategy.describe()}; precision {precision} on {device.type}; gradient "
             f"checkpointing {'on' if cfg.model.use_checkpoint else 'off'}; EMA {cfg.train.ema_decay} on "
             f"{'cpu' if cfg.train.ema_on_cpu else device.type}; lognorm {cfg.transport.use_lognorm}")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint_bytes = 2 * weights + 2 * trained  # model + EMA + AdamW's two moments
    existing = ckpt.list_checkpoints(ckpt_dir)
    last_saved, last_saved_step = (existing[-1][1], step) if existing and existing[-1][0] == step else (None, None)
    max_steps = cfg.train.max_steps
    writer = CheckpointWriter(background=cfg.train.async_save)

    def result(stopped: str) -> dict:
        loss = None
        if runner.steps_done:
            total = runner.last_loss_sum.clone()
            if world > 1:
                torch.distributed.all_reduce(total)
            loss = float(total) / plan.global_batch
        newest = ckpt.list_checkpoints(ckpt_dir)
        final = last_saved or (newest[-1][1] if newest else None)
        return {"step": step, "checkpoint": str(final) if final else None, "loss": loss, "run_dir": str(run_dir),
                "stopped": stopped, "batch_plan": plan.describe(), "precision": precision}

    def check_finite() -> None:
        first = runner.first_bad.clone()
        if world > 1:
            first = torch.where(first < 0, torch.full_like(first, _NONE), first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == _NONE, torch.full_like(first, -1), first)
        bad = int(first)
        if bad >= 0:
            last = f"{last_saved} (step {last_saved_step})" if last_saved else "none yet (no checkpoint was written)"
            raise ReproError(
                f"non-finite loss (NaN/inf) at step {bad} in run {run_dir}: training stopped without saving; "
                f"the last good checkpoint is {last}. Lower optimizer.lr, set optimizer.max_grad_norm (e.g. 1.0) or "
                "model.use_qknorm=true (upstream's advice for NaN losses), or train in fp32, then run again")

    def save(at_step: int) -> float:
        """Write checkpoint `at_step` (rank 0; on a background thread from a host copy with
        train.async_save), prune old ones; returns the seconds a save costs the loop (copy + write)."""
        nonlocal last_saved, last_saved_step
        check_finite()
        writer.wait()  # the previous write is complete (its error is raised here)
        t0 = time.perf_counter()
        state = strategy.full_state(model, ema, opt)  # fsdp: gathered to rank 0's host memory (collective)
        rng = ckpt.rng_states_of_all_processes(world)
        target = ckpt.checkpoint_path(run_dir, at_step)
        if main:
            ckpt.ensure_room(ckpt_dir, ckpt.tensor_bytes(state), cfg.train.keep_last, last_saved or _newest(ckpt_dir))
            state = state if strategy.gathers_copies else writer.snapshot(state)
            # everything the write reads is taken now: the loop moves on while it runs
            fixed = dict(scaler_state=scaler.state_dict(), step=at_step, data_order=order.position.to_dict(),
                         rng=rng, last_good=last_saved or _newest(ckpt_dir))
            stall = time.perf_counter() - t0
            writer.submit(lambda: write(target, state, fixed, stall))
        dist.barrier()
        last_saved, last_saved_step = target, at_step
        waited = time.perf_counter() - t0
        return waited + (writer.last_write_seconds if writer.last_write_seconds is not None else save_estimate)

    def write(target: Path, state: dict, fixed: dict, stall: float) -> None:
        """Rank 0 (a background thread with train.async_save): the atomic write, then pruning."""
        t0 = time.perf_counter()
        ckpt.save_training_checkpoint(
            target, model_state=state["model"], ema_state=state["ema"], opt_state=state["opt"], config=cfg.to_dict(),
            kit={"world_size": world, "micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps,
                 "global_batch": plan.global_batch, "precision": precision, "device": device.type,
                 "torch": str(torch.__version__), "seeding": SEEDING, "strategy": strategy.name, **identity},
            keep_last=cfg.train.keep_last, **fixed)
        removed = ckpt.prune_checkpoints(ckpt_dir, cfg.train.keep_last)
        extra = f"; removed {len(removed)} older (train.keep_last={cfg.train.keep_last})" if removed else ""
        how = f"written in the background; the step loop waited {stall:.2f}s for the copy" if writer.background else ""
        log.info(f"saved checkpoint {target} ({time.perf_counter() - t0:.1f}s{'; ' + how if how else ''}){extra}")

    if step >= max_steps:
        log.info(f"nothing to do: step {step} already reaches train.max_steps={max_steps}")
        strategy.close()
        log.close()
        return result("already_done")
    if main and (room := ckpt.disk_room_note(ckpt_dir, existing, step, cfg.train, checkpoint_bytes)):
        log.info(room)

    # --- The step loop --------------------------------------------------------------------------
    stream = MicroBatchStream(ds, order, plan, rank, start_step=step, end_step=max_steps,
                              seed=cfg.train.global_seed, lognorm=cfg.transport.use_lognorm,
                              dropout_prob=dropout_prob, null_class=cfg.data.num_classes,
                              horizontal_flip=cfg.data.horizontal_flip,
                              prefetch=2 * plan.accum_steps if cfg.data.num_workers > 0 else 0,
                              pin=device.type == "cuda")
    stopped = "max_steps"
    step_time: Optional[float] = None
    save_time = save_estimate = checkpoint_bytes / 100e6 + 0.5  # seconds at ~100 MB/s, until a save is measured
    window_start, window_steps = time.perf_counter(), 0
    try:
        batches = iter(stream)
        while step < max_steps:
            # Stop here, after a whole step, on every process alike: a SIGTERM/SIGINT on any process, or
            # the time budget about to run out (two more steps and a save must still fit). One reduction
            # over the CPU group per step, so the check never waits for the GPU.
            out_of_time = time_budget is not None and (
                time.monotonic() - t_start + 2.0 * (step_time or 0.0) + save_time >= time_budget)
            signum, out_of_time = (int(v) for v in dist.all_reduce_values(
                [float(stops.signum or 0) if stops is not None else 0.0, float(out_of_time)], "max", cpu=True))
            if signum:
                stopped = f"signal:{signum}"
                break
            if out_of_time:
                stopped = "time_budget"
                break

            # One optimizer step over this process's micro-batches.
            t0 = time.perf_counter()
            micro_batches, position = [], None
            for _ in range(plan.accum_steps):
                s, _k, mb, position = next(batches)
                if s != step + 1:
                    raise RuntimeError(f"data stream is at step {s}, the loop at step {step + 1}")
                micro_batches.append(mb)
            runner.step(step + 1, micro_batches)
            step += 1
            order.position = position
            dt = time.perf_counter() - t0
            step_time = dt if step_time is None else 0.8 * step_time + 0.2 * dt
            window_steps += 1

            # Validation loss at each checkpoint step (upstream, data.valid_path), logged in this step's row.
            val_row, val_seconds = None, 0.0
            if validation is not None and (step % cfg.train.ckpt_every == 0 or step == max_steps):
                t0 = time.perf_counter()
                val_row = validation(model, plan.micro_batch)
                val_seconds = time.perf_counter() - t0
                log.info(validation.describe(step, val_row))

            # Log: the one host synchronisation of a log window.
            if step % cfg.train.log_every == 0 or step == max_steps or val_row is not None:
                check_finite()
                seconds = time.perf_counter() - window_start
                sums = runner.sums.clone()
                if world > 1:
                    torch.distributed.all_reduce(sums)
                loss, mse, cos = (sums / max(runner.samples * world, 1)).tolist()
                row = {"loss": loss, "mse": mse, "cos": cos if cfg.transport.use_cosine_loss else None,
                       "grad_norm": float(runner.grad_norm),
                       "images_per_sec": window_steps * plan.global_batch / seconds,
                       "steps_per_sec": window_steps / seconds, "lr": float(opt.param_groups[0]["lr"]),
                       "epoch": order.position.epoch}
                if scaler.is_enabled():
                    row["loss_scale"] = float(scaler.get_scale())
                row.update(window_progress(step, max_steps, seconds / window_steps, device))  # ETA, peak memory
                row.update(val_row or {})
                log.metrics(step, row)
                runner.reset_sums()
                window_start, window_steps = time.perf_counter(), 0

            # EMA sample grid (rank 0): a host-memory EMA is swapped into the model, a sharded one gathered.
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                t0 = time.perf_counter()
                with strategy.ema_for_grid(ema, model, lambda: build_model(cfg.model, latent_size,
                                                                           cfg.data.num_classes).to(device)) as m:
                    if main:
                        log.info(f"EMA sample grid {grids(m, step, run_dir)} ({time.perf_counter() - t0:.1f}s)")
                dist.barrier()

            # Checkpoint.
            if step % cfg.train.ckpt_every == 0 or step == max_steps:
                save_time = save(step) + val_seconds

        # --- Finish: a signal or a time-budget stop saves where it stands ----------------------------
        if stopped.startswith("signal:"):  # kit (issue 12)
            signum = int(stopped.split(":")[1])
            fresh = step != last_saved_step and step > 0
            if fresh:
                save(step)
            writer.wait()  # on disk (and its error raised) before the message says so
            dist.barrier()
            written = (f"checkpoint written: {last_saved}" if fresh else f"newest checkpoint: {last_saved}"
                       if last_saved else "no checkpoint (no optimizer step was taken)")
            message = (f"stopped by {signal_name(signum)} at step {step} of run {run_dir}; {written}; resume with "
                       "the same command")
            log.info(message, echo=False)
            raise Preempted(message, signum)
        if stopped == "time_budget":
            saving = step != last_saved_step and step > 0
            log.info(f"time budget of {time_budget:.0f}s nearly used ({time.monotonic() - t_start:.0f}s elapsed) at "
                     f"step {step}: {'saving and stopping' if saving else 'stopping (nothing new to save)'}; "
                     "run the same command again to continue")
            if saving:
                save(step)
        writer.wait()  # the last checkpoint is on disk before any process returns
        dist.barrier()
        return result(stopped)
    finally:
        stream.close()
        writer.close()
        strategy.close()
        log.close()


def _newest(ckpt_dir: Path) -> Optional[Path]:
    found = ckpt.list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def _fits_gpu(cfg: Config, latent_size: int, precision: str, device: torch.device):
    """For an "auto" micro-batch on a GPU: does the computed budget fit the card (step 3's rule)?"""
    if device.type != "cuda":
        return None
    from repro.models.cost import block_saved_fn, fits_on_card

    block_saved = block_saved_fn(cfg.model, latent_size, precision, cfg.data.num_classes)
    total = torch.cuda.get_device_properties(device).total_memory
    shards = dist.get_world_size() if cfg.train.strategy == "fsdp" else 1
    return lambda micro: fits_on_card(cfg.model, latent_size, micro, precision, total,
                                      checkpointing=cfg.model.use_checkpoint,
                                      ema_on_device=not cfg.train.ema_on_cpu,
                                      num_classes=cfg.data.num_classes, block_saved=block_saved,
                                      shards=shards, offload=cfg.train.fsdp_offload)
