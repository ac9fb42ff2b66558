"""Exponential moving average of the model weights, updated without a host synchronisation.

Upstream (hustvl/LightningDiT train.py `update_ema`): the EMA starts as a copy of the model
(`update_ema(ema, model, decay=0)` after `deepcopy`) and after every optimizer step each named
parameter, frozen `pos_embed` included, becomes `ema.mul_(decay).add_(param, alpha=1 - decay)`,
decay 0.9999. The same two operations run here as one `torch._foreach_mul_` and one
`torch._foreach_add_` over the parameter lists (two kernel launches per list instead of two per
tensor, no `.item()`), so the arithmetic is upstream's, bit for bit.

`on_cpu=True` keeps the EMA in host memory (XL/1: 2.7 GB of GPU memory saved). The parameters
are copied into pinned staging buffers with `non_blocking=True` and a worker thread applies the
update once the copy has landed (a CUDA event), so neither the GPU nor the training thread waits for
the ~1 s CPU pass over 675M parameters: it overlaps the next step. The next `update()`, `flush()`,
`state_dict()` and `module` wait for it first. The same path runs for a model on the CPU (tests).
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, on_cpu: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.source_params = list(model.parameters())
        src_device = self.source_params[0].device
        self.offload = bool(on_cpu)
        target = torch.device("cpu") if on_cpu else src_device
        self._module = copy.deepcopy(model).to(target).eval().requires_grad_(False)
        self.ema_params = list(self._module.parameters())
        if len(self.ema_params) != len(self.source_params):
            raise RuntimeError("EMA copy and model have different parameter lists")
        self._future: Optional[Future] = None
        self._event: Optional[torch.cuda.Event] = None
        self._staging: list[torch.Tensor] = []
        self._worker: Optional[ThreadPoolExecutor] = None
        if self.offload:
            pin = src_device.type == "cuda"
            self._staging = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                             for p in self.source_params]
            self._event = torch.cuda.Event() if src_device.type == "cuda" else None
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repro-ema")

    @property
    def module(self) -> nn.Module:
        """The EMA model (eval mode, no gradients), with any pending update applied."""
        self.flush()
        return self._module

    @torch.no_grad()
    def update(self) -> None:
        """Move the EMA one step towards the model's current parameters."""
        if not self.offload:
            self._lerp(self.source_params)
            return
        self.flush()  # the previous update has read the staging buffers: they may be overwritten
        for buf, p in zip(self._staging, self.source_params):
            buf.copy_(p.detach(), non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._future = self._worker.submit(self._apply_staged)

    def _apply_staged(self) -> None:
        if self._event is not None:
            self._event.synchronize()  # the device-to-host copies have landed
        with torch.no_grad():  # grad mode is per thread
            self._lerp(self._staging)

    def flush(self) -> None:
        """Wait for a pending host-memory update (re-raising its error, if any)."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def _lerp(self, source: list[torch.Tensor]) -> None:
        # upstream order of operations: ema * decay, then + (1 - decay) * param
        torch._foreach_mul_(self.ema_params, self.decay)
        torch._foreach_add_(self.ema_params, source, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """EMA := model (upstream's `update_ema(ema, model, decay=0)` initialisation)."""
        self.flush()
        torch._foreach_copy_(self.ema_params, [p.detach().to(q.device) for p, q in
                                               zip(model.parameters(), self.ema_params)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.flush()
        self._module.load_state_dict(state_dict, strict=True)
