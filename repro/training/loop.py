"""The training loop proper: steps, logs, EMA sample grids, checkpoints, time budget, non-finite stop.

Upstream (hustvl/LightningDiT train.py) logs every `log_every` steps and saves every `ckpt_every`
steps; the kit also saves at `max_steps` and when the time budget is nearly used (so the next
session continues from there), and checks the loss for NaN/inf before every log and every save
(on the device in between: no host synchronisation per step).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from repro.errors import ReproError
from repro.training import state as ckpt
from repro.training.samples import weights_swapped_in
from repro.utils import distributed as dist

_NONE = 2 ** 62  # "no non-finite step" when taking the minimum over processes


class TrainLoop:
    def __init__(self, cfg, run_dir: Path, log, runner, ema, model, opt, scaler, order, plan, grids, precision: str,
                 device: torch.device, rank: int, world: int, main: bool, budget: Optional[float], t_start: float):
        self.cfg, self.run_dir, self.log, self.runner, self.ema = cfg, Path(run_dir), log, runner, ema
        self.model, self.opt, self.scaler, self.order, self.plan, self.grids = model, opt, scaler, order, plan, grids
        self.precision, self.device, self.rank, self.world, self.main = precision, device, rank, world, main
        self.budget, self.t_start = budget, t_start
        self.ckpt_dir = ckpt.checkpoint_dir(run_dir)
        self.last_saved: Optional[Path] = None
        self.last_saved_step: Optional[int] = None
        self.step_time: Optional[float] = None
        self.save_time: Optional[float] = None
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self.checkpoint_bytes = 2 * weights + 2 * trained  # model + EMA + AdamW's two moments
        self.save_estimate = self.checkpoint_bytes / 100e6 + 0.5  # seconds, at ~100 MB/s

    # -- the loop ---------------------------------------------------------------------------

    def run(self, step: int, stream) -> dict:
        cfg, plan = self.cfg, self.plan
        max_steps = cfg.train.max_steps
        existing = ckpt.list_checkpoints(self.ckpt_dir)
        if existing and existing[-1][0] == step:
            self.last_saved, self.last_saved_step = existing[-1][1], step
        if step >= max_steps:
            self.log.info(f"nothing to do: step {step} already reaches train.max_steps={max_steps}")
            return self._result(step, "already_done", did_steps=False)
        if self.main:
            self._disk_note(existing, step)
        stopped = "max_steps"
        it = iter(stream)
        window_start, window_steps = time.perf_counter(), 0
        while step < max_steps:
            if self._out_of_time():
                stopped = "time_budget"
                break
            t0 = time.perf_counter()
            batch, position = [], None
            for _ in range(plan.accum_steps):
                s, _k, mb, position = next(it)
                if s != step + 1:
                    raise RuntimeError(f"data stream is at step {s}, the loop at step {step + 1}")
                batch.append(mb)
            self.runner.step(step + 1, batch)
            step += 1
            self.order.position = position
            dt = time.perf_counter() - t0
            self.step_time = dt if self.step_time is None else 0.8 * self.step_time + 0.2 * dt
            window_steps += 1
            if step % cfg.train.log_every == 0 or step == max_steps:
                self._log(step, window_steps, time.perf_counter() - window_start)
                window_start, window_steps = time.perf_counter(), 0
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                self._sample(step)
            if step % cfg.train.ckpt_every == 0 or step == max_steps:
                self._save(step)
        if stopped == "time_budget":
            elapsed = time.monotonic() - self.t_start
            self.log.info(f"time budget of {self.budget:.0f}s nearly used ({elapsed:.0f}s elapsed) at step {step}: "
                          "saving and stopping; run the same command again to continue")
            if step != self.last_saved_step and step > 0:
                self._save(step)
        return self._result(step, stopped, did_steps=True)

    def _result(self, step: int, stopped: str, did_steps: bool) -> dict:
        loss = None
        if did_steps and self.runner.steps_done:
            total = self.runner.last_loss_sum.clone()
            if self.world > 1:
                torch.distributed.all_reduce(total)
            loss = float(total) / self.plan.global_batch
        newest = ckpt.list_checkpoints(self.ckpt_dir)
        path = self.last_saved or (newest[-1][1] if newest else None)
        return {"step": step, "checkpoint": str(path) if path else None, "loss": loss, "run_dir": str(self.run_dir),
                "stopped": stopped, "batch_plan": self.plan.describe(), "precision": self.precision}

    # -- time budget ---------------------------------------------------------------------------

    def _out_of_time(self) -> bool:
        if self.budget is None:
            return False
        elapsed = time.monotonic() - self.t_start
        need = 2.0 * (self.step_time or 0.0) + (self.save_time if self.save_time is not None else self.save_estimate)
        flag = elapsed + need >= self.budget
        if self.world > 1:  # every process stops at the same step
            t = torch.tensor([int(flag)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    # -- checks, logs, grids, checkpoints ------------------------------------------------------

    def _newest_checkpoint(self) -> Optional[Path]:
        found = ckpt.list_checkpoints(self.ckpt_dir)
        return found[-1][1] if found else None

    def _disk_note(self, existing, step: int) -> None:
        """Say at the start, not after hours, when the disk cannot hold the checkpoints this run will keep."""
        need = self.checkpoint_bytes
        t = self.cfg.train
        saves_left = len(range(step // t.ckpt_every + 1, t.max_steps // t.ckpt_every + 1)) + 1  # + the final save
        keep = t.keep_last
        # the newest is written before older ones are removed: keep_last + 1 files at once
        wanted = min(keep + 1, len(existing) + saves_left) if keep > 0 else len(existing) + saves_left
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        room = shutil.disk_usage(self.ckpt_dir).free + sum(p.stat().st_size for _, p in existing if p.exists())
        fits = int(room // need)
        if fits < wanted:
            self.log.info(f"note: {self.ckpt_dir} has room for ~{fits} checkpoint(s) of ~{need / 1e9:.1f} GB, "
                          f"this run wants {wanted} on disk at once (train.keep_last={keep}): lower "
                          f"train.keep_last or set train.output_dir on a larger disk, or a save will stop the run")

    def _check_finite(self) -> None:
        first = self.runner.first_bad.clone()
        if self.world > 1:
            first = torch.where(first < 0, torch.full_like(first, _NONE), first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == _NONE, torch.full_like(first, -1), first)
        bad = int(first)
        if bad >= 0:
            last = (f"{self.last_saved} (step {self.last_saved_step})" if self.last_saved
                    else "none yet (no checkpoint was written)")
            raise ReproError(
                f"non-finite loss (NaN/inf) at step {bad} in run {self.run_dir}: training stopped without saving; "
                f"the last good checkpoint is {last}. Lower optimizer.lr, set optimizer.max_grad_norm (e.g. 1.0) or "
                "model.use_qknorm=true (upstream's advice for NaN losses), or train in fp32, then run again")

    def _log(self, step: int, steps: int, seconds: float) -> None:
        self._check_finite()
        sums = self.runner.sums.clone()
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        n = self.runner.samples * self.world
        loss, mse, cos = (sums / max(n, 1)).tolist()  # the one host synchronisation of a log window
        row = {"loss": loss, "mse": mse, "cos": cos if self.cfg.transport.use_cosine_loss else None,
               "grad_norm": float(self.runner.grad_norm), "images_per_sec": steps * self.plan.global_batch / seconds,
               "steps_per_sec": steps / seconds, "lr": float(self.opt.param_groups[0]["lr"]),
               "epoch": self.order.position.epoch}
        if self.scaler.is_enabled():
            row["loss_scale"] = float(self.scaler.get_scale())
        self.log.metrics(step, row)
        self.runner.reset_sums()

    def _sample(self, step: int) -> None:
        self.ema.flush()
        if self.main:
            t0 = time.perf_counter()
            if self.ema.offload:  # EMA held on the CPU: sample on the GPU with its values swapped in
                with weights_swapped_in(self.model, self.ema.ema_params) as m:
                    path = self.grids(m, step, self.run_dir)
            else:
                path = self.grids(self.ema.module, step, self.run_dir)
            self.log.info(f"EMA sample grid {path} ({time.perf_counter() - t0:.1f}s)")
        dist.barrier()

    def _save(self, step: int) -> None:
        self._check_finite()
        t0 = time.perf_counter()
        ema_state = self.ema.state_dict()
        rng = [ckpt.capture_rng()]
        if self.world > 1:
            rng = [None] * self.world
            torch.distributed.all_gather_object(rng, ckpt.capture_rng())
        path = ckpt.checkpoint_path(self.run_dir, step)
        if self.main:
            ckpt.save_training_checkpoint(
                path, model_state=self.model.state_dict(), ema_state=ema_state, opt_state=self.opt.state_dict(),
                scaler_state=self.scaler.state_dict(), step=step, data_order=self.order.position.to_dict(), rng=rng,
                config=self.cfg.to_dict(),
                kit={"world_size": self.world, "micro_batch": self.plan.micro_batch,
                     "accum_steps": self.plan.accum_steps, "global_batch": self.plan.global_batch,
                     "precision": self.precision, "device": self.device.type, "torch": str(torch.__version__)},
                keep_last=self.cfg.train.keep_last, last_good=self.last_saved or self._newest_checkpoint())
            removed = ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
            extra = f"; removed {len(removed)} older (train.keep_last={self.cfg.train.keep_last})" if removed else ""
            self.log.info(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s){extra}")
        dist.barrier()
        self.last_saved, self.last_saved_step = path, step
        self.save_time = time.perf_counter() - t0
