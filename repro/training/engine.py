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

A trainer (`Trainer` below; `repro.training.dit`, `repro.tokenizer_training.trainer`) supplies only what
differs: its data and batch plan, where its own runs may start, its modules and optimizer(s), one
optimizer step with its loss, its log values, extra work at a step (validation, grids) and files beside
a checkpoint (the tokenizer file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from repro import paths
from repro.errors import Preempted
from repro.training import checkpoints as ckpt
from repro.training.data_order import DataOrder, DataPosition
from repro.training.logs import RunLogger, window_progress
from repro.training.saver import RunSaver, check_shared_folder
from repro.training.strategy import make_strategy
from repro.utils import distributed as dist
from repro.utils.hardware import CompiledOrEager, compile_mode, default_device, resolve_precision, set_determinism
from repro.utils.hardware import use_compile_cache
from repro.utils.io import wrote_line
from repro.utils.preemption import StopSignals, signal_name
from repro.utils.seeding import SEEDING

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


class Trainer:
    """What a trainer gives the engine. Set in `__init__`: `cfg` (its typed config; `cfg.train` holds the
    engine's keys), `run_dir`, `seed`; in `open`: `plan`, `max_steps`, `num_items`, `data_dir`; in `build`:
    `model` (every trained module: the checkpoint's 'model'), `ema_source`, `ema` (or None), `opt` (an
    optimizer, or an object with `optimizers`, `state_dict`, `load_state_dict`), `first_bad` (a device
    tensor: the first step whose loss was not finite, -1 for none). The engine sets `scaler` before `build`.
    Class attributes: `what` (its name in messages), `nan_advice` (what to try after a non-finite loss)."""

    kit_info: dict = {}  # added to every checkpoint's `kit`

    def open(self, ctx: Context) -> None:
        """Open the data; set plan, max_steps, num_items, data_dir."""
        raise NotImplementedError

    def choose_start(self, ckpt_dir: Path, note) -> tuple[Optional[str], Optional[str], Optional[dict]]:
        """(kind, path, state) on rank 0: this run's newest checkpoint ('resume'), or None for a fresh run."""
        found = ckpt.resume_point(ckpt_dir, self.cfg.train.resume, note)
        return ("resume", str(found[0]), found[1]) if found else (None, None, None)

    def build(self, ctx: Context, strategy, kind: Optional[str]) -> None:
        raise NotImplementedError

    def compiled(self, module: torch.nn.Module, ctx: Context, purpose: str):
        """`module` compiled by default on CUDA (eager if compiling fails, with one line naming `purpose`), eager on
        the CPU; `train.compile` decides. For both trainers' forward passes."""
        if (mode := compile_mode(self.cfg.train.compile, ctx.device, auto="default")) is None:
            return module
        use_compile_cache(paths.runs_dir() / "compile_cache")
        return CompiledOrEager(module, mode, purpose, note=ctx.note)

    def after_restore(self, ctx: Context, kind: Optional[str], path: Optional[str], state: Optional[dict],
                      strategy) -> None:
        """What the trainer's own starts add after the engine's restore (weight_init, notes)."""

    def save_config(self, path: Path) -> None:
        raise NotImplementedError

    def describe(self, ctx: Context, order: DataOrder) -> list[str]:
        return []

    def start(self, ctx: Context, step: int, order: DataOrder) -> None:
        """Start reading batches from `step` on (a read-ahead stream, say)."""

    def train_step(self, step: int, order: DataOrder) -> None:
        """One optimizer step; advances `order.position`."""
        raise NotImplementedError

    def log_values(self, ctx: Context) -> dict:
        """The means since the last log (a collective), then a new window."""
        raise NotImplementedError

    def after_step(self, ctx: Context, step: int, strategy) -> tuple[Optional[dict], float]:
        """Extra work at this step: (a row to log now, or None; the seconds it took)."""
        return None, 0.0

    def export(self, state: dict, step: int) -> None:
        """Rank 0, at each save, with the full state: files beside the checkpoint."""

    def final_loss(self, ctx: Context) -> Optional[float]:
        """The run's last loss for its result (None: not known)."""

    def result(self, out: dict) -> dict:
        return out

    def done_line(self, result: dict) -> str:
        """The line rank 0 prints when the run ends, above its `wrote:` line."""
        loss = f"{result['loss']:.4f}" if result["loss"] is not None else "n/a"
        return f"done: step {result['step']} ({result['stopped']}); last loss {loss}; checkpoint {result['checkpoint']}"

    def written(self, result: dict) -> list:
        """What the run wrote, for its closing `wrote:` line: the newest checkpoint, the log, the config."""
        return [result["checkpoint"], self.run_dir / "log.jsonl", self.run_dir / "config.yaml"]

    def close(self) -> None:
        """Release what `start` opened."""


def run_training(trainer: Trainer, *, time_budget: Optional[float] = None, device: Optional[str] = None) -> dict:
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
            result = training_loop(trainer, device=dev, time_budget=budget, t_start=t_start, stops=stops)
        dist.print0(trainer.done_line(result))
        dist.print0(wrote_line(trainer.written(result)))
        return result
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def training_loop(trainer: Trainer, *, device: torch.device, time_budget: Optional[float], t_start: float,
                  stops: StopSignals) -> dict:
    # --- Processes, precision, the run folder and the data ----------------------------------------
    t = trainer.cfg.train
    rank, world, main = dist.get_rank(), dist.get_world_size(), dist.is_main()
    precision = resolve_precision(t.precision, device, "train.precision")
    run_dir = trainer.run_dir

    def note(message: str) -> None:  # printed now (an error may follow), written to log.txt once it is open
        if main:
            print(message, flush=True)
        ctx.notes.append(message)

    ctx = Context(rank, world, main, device, precision, note)
    trainer.open(ctx)

    # --- Where to start: this run's newest checkpoint, or the trainer's own start ------------------
    # rank 0 chooses and the others read the same file: on several machines each must see rank 0's folder
    kind, path, state = trainer.choose_start(ckpt.checkpoint_dir(run_dir), note) if main else (None, None, None)
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
    trainer.scaler = strategy.make_scaler(precision)  # fsdp + fp16: overflow checks agree across the shards
    trainer.build(ctx, strategy, kind)

    # --- Restore the starting state --------------------------------------------------------------
    step, position = 0, None
    if state is not None:
        step, saved_position = ckpt.restore_training_state(state, path, trainer, ctx, strategy)
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
    kit = {**trainer.kit_info, "world_size": world, "micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps,
           "global_batch": plan.global_batch, "precision": precision, "device": device.type,
           "torch": str(torch.__version__), "seeding": SEEDING, "strategy": strategy.name, **identity}
    saver = RunSaver(trainer, strategy, ctx, log, step=step, order=order, kit=kit)

    def result(stopped: str) -> dict:
        return trainer.result({"step": step, "checkpoint": str(saver.newest) if saver.newest else None,
                               "loss": trainer.final_loss(ctx), "run_dir": str(run_dir), "stopped": stopped,
                               "batch_plan": plan.describe(), "precision": precision})

    try:
        if step >= max_steps:
            log.info(f"nothing to do: step {step} already reaches the run's {max_steps} steps")
            return result("already_done")
        if main and (room := saver.disk_room_note(step)):
            log.info(room)

        # --- The step loop --------------------------------------------------------------------------
        trainer.start(ctx, step, order)
        stopped = "max_steps"
        step_time: Optional[float] = None
        save_time = saver.estimate
        window_start, window_steps = time.perf_counter(), 0
        while step < max_steps:
            # Stop here, after a whole step, on every process alike: a SIGTERM/SIGINT on any process, or
            # the time budget about to run out (two more steps and a save must still fit). One reduction
            # over the CPU group per step, so the check never waits for the GPU.
            out_of_time = time_budget is not None and (
                time.monotonic() - t_start + 2.0 * (step_time or 0.0) + save_time >= time_budget)
            signum, out_of_time = (int(v) for v in dist.all_reduce_values(
                [float(stops.signum or 0), float(out_of_time)], "max", cpu=True))
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
                saver.check_finite()
                seconds = time.perf_counter() - window_start
                row = trainer.log_values(ctx)
                row.update(images_per_sec=window_steps * plan.global_batch / seconds,
                           steps_per_sec=window_steps / seconds, lr=float(trainer.opt.param_groups[0]["lr"]),
                           epoch=order.position.epoch)
                if trainer.scaler.is_enabled():
                    row["loss_scale"] = float(trainer.scaler.get_scale())
                row.update(window_progress(step, max_steps, seconds / window_steps, device))  # ETA, peak memory
                row.update(extra_row or {})
                log.metrics(step, row)
                window_start, window_steps = time.perf_counter(), 0

            # Checkpoint.
            if step % t.ckpt_every == 0 or step == max_steps:
                save_time = saver.save(step) + extra_seconds

        # --- Finish: a signal or a time-budget stop saves where it stands ----------------------------
        fresh = stopped != "max_steps" and step != saver.last_saved_step and step > 0
        if stopped == "time_budget":
            log.info(f"time budget of {time_budget:.0f}s nearly used ({time.monotonic() - t_start:.0f}s elapsed) at "
                     f"step {step} of {max_steps}: {'saving and stopping' if fresh else 'stopping (nothing new to save)'}"
                     "; run the same command again to continue")
        if fresh:
            saver.save(step)
        saver.writer.wait()  # the last checkpoint on disk (its error raised) before any process returns or says so
        dist.barrier()
        if stopped.startswith("signal:"):  # kit (issue 12); `signum` is the loop's, the signal that stopped it
            written = (f"checkpoint written: {saver.last_saved}" if fresh else f"newest checkpoint: {saver.last_saved}"
                       if saver.last_saved else "no checkpoint (no optimizer step was taken)")
            message = (f"stopped by {signal_name(signum)} at step {step} of run {run_dir}; {written}; resume with "
                       "the same command")
            log.info(message, echo=False)
            raise Preempted(message, signum)
        return result(stopped)
    finally:
        trainer.close()
        saver.writer.close()
        strategy.close()
        log.close()


def run_dir_of(cfg) -> Path:
    """`train.output_dir/train.exp_name`, a `runs:REL` output folder under the runs folder."""
    return paths.runs_path(cfg.train.output_dir) / cfg.train.exp_name
