"""One optimizer step of LightningDiT training: accumulate micro-batches, clip, AdamW, EMA.

The upstream recipe (hustvl/LightningDiT train.py): loss = mse.mean() + cos_loss.mean() on the
velocity, AdamW(lr 2e-4, betas (0.9, beta2 = 0.95), weight decay 0), optional
`clip_grad_norm_(optimizer.max_grad_norm)`, EMA after every step. Gradient accumulation keeps that
loss exactly: every micro-batch back-propagates sum(per-sample loss) x world / global_batch, and
DDP averages over processes, so the gradient is the mean over the global batch however it is split.

No host synchronisation inside a step: the loss sums, the gradient norm and the first non-finite
step stay on the device until the trainer logs or saves.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

from repro.training.data_order import MicroBatch
from repro.utils.hardware import autocast
from repro.transport import loss_function


def make_optimizer(model: torch.nn.Module, opt_cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over all parameters in model order, as upstream (frozen `pos_embed` included: it never
    gets a gradient, so AdamW skips it, and the `opt` state indices match upstream checkpoints).
    Fused (one kernel for all tensors, no temporaries) on CUDA unless `optimizer.fused` says otherwise."""
    fused = opt_cfg.fused if opt_cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2),
                             weight_decay=opt_cfg.weight_decay, fused=bool(fused) or None)


def normalise_optimizer_state(opt: torch.optim.Optimizer, opt_cfg, device: torch.device) -> None:
    """After loading a saved `opt`: the config's hyper-parameters win (a later stage may change them),
    and the `step` counters live where this optimizer's kernels expect them."""
    fused = bool(opt_cfg.fused if opt_cfg.fused is not None else device.type == "cuda")
    for group in opt.param_groups:
        group.update(lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), weight_decay=opt_cfg.weight_decay,
                     fused=fused or None, foreach=None if fused else group.get("foreach"))
        for p in group["params"]:
            st = opt.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


def take_over_label_dropout(model: torch.nn.Module) -> float:
    """Turn off the model's own class dropout and return its probability.

    Upstream's LabelEmbedder drops labels with `torch.rand` from the global RNG inside forward; the
    trainer draws the same Bernoulli(p) per sample from the sample's own generator instead and
    feeds the null label (`num_classes`), so drops survive a resume and do not depend on the process
    count. Same probability, same null label, same embedding row.
    """
    emb = model.y_embedder
    p = float(emb.dropout_prob)
    emb.dropout_prob = 0.0
    return p


class StepRunner:
    """Runs optimizer steps; `model` is the raw module, `forward_model` what to call (DDP/compiled)."""

    def __init__(self, model: torch.nn.Module, forward_model, opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema, plan, cfg, *, precision: str, device: torch.device,
                 channels_last: bool = False):
        self.model, self.forward_model, self.opt, self.scaler, self.ema = model, forward_model, opt, scaler, ema
        self.plan, self.precision, self.device = plan, precision, device
        self.max_grad_norm = cfg.optimizer.max_grad_norm
        self.channels_last = channels_last
        # kit (issue 23): the process's loss (repro.transport.loss_function): upstream's flow matching
        # (training_losses with transport.use_cosine_loss) or DDPM's
        self.loss_fn = loss_function(cfg.transport)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_scale = plan.world_size / plan.global_batch
        # device-side running sums since the last log (loss, mse, cos) and the samples they cover
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.samples = 0
        self.steps_done = 0
        self.last_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def _no_sync(self, last: bool):
        if last or not hasattr(self.forward_model, "no_sync"):
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def step(self, step: int, micro_batches: Iterable[MicroBatch]) -> None:
        """One optimizer step over this process's micro-batches (exactly `plan.accum_steps` of them)."""
        step_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        # Forward and backward of each micro-batch; DDP syncs gradients on the last one only.
        for k, mb in enumerate(micro_batches):
            mb = mb.to(self.device, non_blocking=True)
            x1, x0 = mb.x1, mb.x0
            if self.channels_last:
                x1, x0 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x0))
            with self._no_sync(last=k == self.plan.accum_steps - 1):
                with autocast(self.device, self.precision):
                    out = self.loss_fn(self.forward_model, x1, mb.y, t=mb.t, x0=x0)
                loss_sum = out["loss"].sum()
                self.scaler.scale(loss_sum * self.loss_scale).backward()
            # Running sums for the log, kept on the device (no host synchronisation).
            step_sum += loss_sum.detach().double()
            self.sums[0] += loss_sum.detach().double()
            self.sums[1] += out["mse"].detach().sum().double()
            if out["cos"] is not None:
                self.sums[2] += out["cos"].detach().sum().double()
            self.samples += len(mb.y)
            n += 1
        if n != self.plan.accum_steps:
            raise RuntimeError(f"step {step}: got {n} micro-batches, expected {self.plan.accum_steps}")
        # Unscale (fp16), clip or measure the gradient norm, AdamW, then the EMA (upstream's order).
        self.scaler.unscale_(self.opt)
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
            norm = norm.full_tensor()
        self.grad_norm = norm.detach().float()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update()
        # Remember the first step whose loss was not finite; checked at the next log or save.
        self.last_loss_sum = step_sum
        self.steps_done += 1
        bad = ~torch.isfinite(step_sum)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)

    def reset_sums(self) -> None:
        self.sums.zero_()
        self.samples = 0


def lr_factor(step: int, max_steps: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier of optimizer step `step` (1-based): linear warm-up, then constant or cosine to 0.

    The kit's learning-rate schedule (upstream trains at a constant rate); step 9's `train.warmup_steps` and
    `train.lr_schedule` choose it.
    """
    warm = min(1.0, step / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step - 1, max_steps) / max(max_steps, 1)))
    return warm
