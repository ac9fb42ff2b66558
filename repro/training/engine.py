"""The one training engine: every trainer of the kit (the DiT of step 7, the tokenizer of step 9) runs here.

`run_training(trainer)` reads top to bottom like NVlabs/edm2's `training_loop`: processes and
precision, the data, where to start, the modules, restoring, then the step loop with its logs, extra
work (validation, grids) and checkpoints, and the finish. Everything a run needs to survive a
notebook's death or scale to many GPUs is written once here:

- run control: SIGTERM/SIGINT finish the optimizer step, save and raise `Preempted`; the time budget
  stops before it runs out (two more steps and a save must fit), saving where it stands;
- resume: the newest complete checkpoint of the run (model(s), optimizer(s), EMA, scaler, data-order
  position, the RNG states of every process), so the resumed run is the uninterrupted one;
- checkpoints: the single-file format of `repro.training.checkpoints`, written by rank 0 on a
  background thread from a host copy (`train.async_save`), old ones pruned, non-finite losses refused;
- the distributed strategy (`train.strategy`: DDP or FSDP2, `repro.training.strategy`), the compiled
  or eager forward, autocast precision, determinism, and the log backends (TensorBoard, W&B).

A trainer supplies only what differs (`repro.training.dit`, `repro.tokenizer_training.trainer`): its
config (`cfg`, `cfg.train`), `run_dir`, `what` (its name in messages) and `nan_advice`, and

    open(ctx)                       data, batch plan (`plan`), `max_steps`, `num_items`, `data_dir`
    choose_start(ckpt_dir, note)    (kind, path, state): 'resume', or the trainer's own starts, or None
    build(ctx, strategy, kind)      `model` (all trained modules: the checkpoint's 'model'), `ema_source`,
                                    `ema`, `opt` (with state_dict/load_state_dict), `scaler`, `lr()`
    after_restore(ctx, kind, path, state, strategy)   what its own starts add (weight_init, notes)
    describe(ctx, order)            the lines that open the run's log
    start(ctx, step, order)         its batch stream from `step` on
    train_step(step, order)         one optimizer step; advances `order.position`
    first_bad                       a device tensor: the first step with a non-finite loss, or -1
    log_values(ctx)                 means since the last log (a collective), then a new window
    after_step(ctx, step, strategy) validation / sample grids: (row to log or None, seconds)
    export(state, step)             rank 0 at each save: files beside the checkpoint (the tokenizer file)
    final_loss(ctx), result(out)    the result dict; close()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from repro import paths
from repro.errors import Preempted, ReproError
from repro.training import checkpoints as ckpt
from repro.training.data_order import DataOrder, DataPosition
from repro.training.logs import RunLogger, window_progress
from repro.training.saver import CheckpointWriter, check_shared_folder
from repro.training.strategy import make_strategy
from repro.utils import distributed as dist
from repro.utils.hardware import default_device, resolve_precision, set_determinism
from repro.utils.preemption import StopSignals, signal_name
from repro.utils.seeding import SEEDING

_NONE = 2 ** 62  # "no non-finite step" when taking the minimum over processes


@dataclass
class Context:
    """What every part of a run shares: the processes, the device and precision, the log."""
    rank: int
    world: int
    main: bool
    device: torch.device
    precision: str
    note: Callable[[str], None]
    notes: list[str] = field(default_factory=list)
    image: Callable[[int, str, Path], None] = lambda step, tag, path: None  # a PNG to TensorBoard / W&B (rank 0)


def run_training(trainer, *, time_budget: Optional[float] = None, device: Optional[str] = None) -> dict:
    """Train until the trainer's `max_steps` (or the time budget); returns the trainer's result dict."""
    t_start = time.monotonic()
    dist.init(device)
    dev = torch.device(device) if device else default_device()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    set_determinism(trainer.cfg.train.deterministic, dev)
    try:
        budget = time_budget if time_budget is not None else trainer.cfg.train.time_budget
        # kit (issue 12): SIGTERM/SIGINT finish the optimizer step, write a checkpoint, raise Preempted
        with StopSignals("finishing this optimizer step, then writing a checkpoint") as stops:
            return training_loop(trainer, device=dev, time_budget=budget, t_start=t_start, stops=stops)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def training_loop(trainer, *, device: torch.device, time_budget: Optional[float], t_start: float,
                  stops: Optional[StopSignals] = None) -> dict:
    # --- Processes, precision, the run folder and the data ----------------------------------------
    t = trainer.cfg.train
    rank, world, main = dist.get_rank(), dist.get_world_size(), dist.is_main()
    precision = resolve_precision(t.precision, device, "train.precision")
    run_dir = trainer.run_dir
    ckpt_dir = ckpt.checkpoint_dir(run_dir)

    def note(message: str) -> None:  # printed now (an error may follow), written to log.txt once it is open
        if main:
            print(message, flush=True)
        ctx.notes.append(message)

    ctx = Context(rank, world, main, device, precision, note)
    trainer.open(ctx)

    # --- Where to start: this run's newest checkpoint, or the trainer's own start ------------------
    # rank 0 chooses and the others read the same file: on several machines each must see rank 0's folder
    kind, path, state = trainer.choose_start(ckpt_dir, note) if main else (None, None, None)
    kind, path = dist.broadcast_object((kind, path))
    if not main and kind in ("resume", "ckpt"):
        state = ckpt.read_training_checkpoint(path)
    # kit (issue 12): refuse a checkpoint of another run or a changed start file (rank 0 hashes)
    identity = dist.run_on_main(ckpt.check_run_identity, trainer.cfg, run_dir, kind, path, state, note)
    check_shared_folder(run_dir, "train.output_dir")  # kit (issue 16): rank 0 writes, every node must see it
    log = RunLogger(run_dir, enabled=main, resume_step=int(state["step"]) if state else None, cfg=trainer.cfg)
    for n in ctx.notes:
        log.info(n, echo=False)
    ctx.note, ctx.image = log.info, log.image

    # --- Modules, EMA, optimizer(s), scaler: the same initial weights on every process ------------
    strategy = make_strategy(t, device, world)  # ddp: a replica per process; fsdp: sharded per unit
    trainer.build(ctx, strategy, kind)
    model, ema, opt, scaler = trainer.model, trainer.ema, trainer.opt, trainer.scaler

    # --- Restore the starting state --------------------------------------------------------------
    step, position = 0, None
    if state is not None:
        step, saved_position = ckpt.restore_training_state(
            state, path, model=model, ema=ema, ema_source=trainer.ema_source, opt=opt, scaler=scaler, rank=rank,
            world=world, note=log.info, strategy=strategy)
        position = DataPosition.from_dict(saved_position) if saved_position else None
        log.info(f"{'resumed from' if kind == 'resume' else 'initialised from train.ckpt'} {path} at step {step}")
        if "kit" in state and state["kit"].get("seeding") != SEEDING:
            log.info(f"note: {path} was written by a kit that seeded the data order and per-sample draws "
                     f"differently; from step {step} on they follow this kit's seeding ({SEEDING}): the run stays "
                     "valid, but is not bitwise the run the older kit would have continued")
    trainer.after_restore(ctx, kind, path, state, strategy)  # its own starts (weight_init), config changes
    del state
    plan, max_steps = trainer.plan, trainer.max_steps
    order = DataOrder(trainer.num_items, plan.global_batch, trainer.seed, position, data_dir=str(trainer.data_dir))
    if order.note:
        log.info(f"note: {order.note}")

    # --- Record the run ---------------------------------------------------------------------------
    if main:
        trainer.save_config(run_dir / "config.yaml")
    for line in trainer.describe(ctx, order):
        log.info(line)
    log.info(f"{plan.describe()}; {strategy.describe()}; precision {precision} on {device.type}")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint_bytes = 2 * weights + 2 * trained  # model + EMA + Adam's two moments
    existing = ckpt.list_checkpoints(ckpt_dir)
    last_saved, last_saved_step = (existing[-1][1], step) if existing and existing[-1][0] == step else (None, None)
    writer = CheckpointWriter(background=t.async_save)

    def result(stopped: str) -> dict:
        newest = ckpt.list_checkpoints(ckpt_dir)
        final = last_saved or (newest[-1][1] if newest else None)
        return trainer.result({"step": step, "checkpoint": str(final) if final else None,
                               "loss": trainer.final_loss(ctx), "run_dir": str(run_dir), "stopped": stopped,
                               "batch_plan": plan.describe(), "precision": precision})

    def check_finite() -> None:
        first = trainer.first_bad.clone()
        if world > 1:
            first = torch.where(first < 0, torch.full_like(first, _NONE), first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == _NONE, torch.full_like(first, -1), first)
        bad = int(first)
        if bad >= 0:
            last = f"{last_saved} (step {last_saved_step})" if last_saved else "none yet (no checkpoint was written)"
            raise ReproError(f"non-finite loss (NaN/inf) at step {bad} in {trainer.what} run {run_dir}: training "
                             f"stopped without saving; the last good checkpoint is {last}. {trainer.nan_advice}, "
                             "then run again")

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
            ckpt.ensure_room(ckpt_dir, ckpt.tensor_bytes(state), t.keep_last, last_saved or _newest(ckpt_dir))
            trainer.export(state, at_step)  # before the copy: what it writes is read from the live state now
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
            target, model_state=state["model"], ema_state=state["ema"], opt_state=state["opt"],
            config=trainer.cfg.to_dict(),
            kit={**trainer.kit_info, "world_size": world, "micro_batch": plan.micro_batch,
                 "accum_steps": plan.accum_steps, "global_batch": plan.global_batch, "precision": precision,
                 "device": device.type, "torch": str(torch.__version__), "seeding": SEEDING, "strategy": strategy.name,
                 **identity},
            keep_last=t.keep_last, **fixed)
        removed = ckpt.prune_checkpoints(ckpt_dir, t.keep_last)
        extra = f"; removed {len(removed)} older (train.keep_last={t.keep_last})" if removed else ""
        how = f"written in the background; the step loop waited {stall:.2f}s for the copy" if writer.background else ""
        log.info(f"saved checkpoint {target} ({time.perf_counter() - t0:.1f}s{'; ' + how if how else ''}){extra}")

    if step >= max_steps:
        log.info(f"nothing to do: step {step} already reaches the run's {max_steps} steps")
        strategy.close()
        log.close()
        return result("already_done")
    if main and (room := ckpt.disk_room_note(ckpt_dir, existing, step, t, max_steps, checkpoint_bytes)):
        log.info(room)

    # --- The step loop --------------------------------------------------------------------------
    trainer.start(ctx, step, order)
    stopped = "max_steps"
    step_time: Optional[float] = None
    save_time = save_estimate = checkpoint_bytes / 100e6 + 0.5  # seconds at ~100 MB/s, until a save is measured
    window_start, window_steps = time.perf_counter(), 0
    try:
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

            # One optimizer step (the trainer's loss and modules), timed for the budget and the log.
            t0 = time.perf_counter()
            trainer.train_step(step + 1, order)
            step += 1
            dt = time.perf_counter() - t0
            step_time = dt if step_time is None else 0.8 * step_time + 0.2 * dt
            window_steps += 1

            # The trainer's extra work at this step: validation loss, sample grids.
            extra_row, extra_seconds = trainer.after_step(ctx, step, strategy)

            # Log: the one host synchronisation of a log window.
            if step % t.log_every == 0 or step == max_steps or extra_row is not None:
                check_finite()
                seconds = time.perf_counter() - window_start
                row = trainer.log_values(ctx)
                row.update(images_per_sec=window_steps * plan.global_batch / seconds,
                           steps_per_sec=window_steps / seconds, lr=trainer.lr(), epoch=order.position.epoch)
                if scaler.is_enabled():
                    row["loss_scale"] = float(scaler.get_scale())
                row.update(window_progress(step, max_steps, seconds / window_steps, device))  # ETA, peak memory
                row.update(extra_row or {})
                log.metrics(step, row)
                window_start, window_steps = time.perf_counter(), 0

            # Checkpoint.
            if step % t.ckpt_every == 0 or step == max_steps:
                save_time = save(step) + extra_seconds

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
                     f"step {step} of {max_steps}: {'saving and stopping' if saving else 'stopping (nothing new to save)'}"
                     "; run the same command again to continue")
            if saving:
                save(step)
        writer.wait()  # the last checkpoint is on disk before any process returns
        dist.barrier()
        return result(stopped)
    finally:
        trainer.close()
        writer.close()
        strategy.close()
        log.close()


def run_dir_of(cfg) -> Path:
    """`train.output_dir/train.exp_name`, a `runs:REL` output folder under the runs folder."""
    return paths.runs_path(cfg.train.output_dir) / cfg.train.exp_name


def _newest(ckpt_dir: Path) -> Optional[Path]:
    found = ckpt.list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None
