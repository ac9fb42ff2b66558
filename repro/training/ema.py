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
from typing import Iterable, Optional

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, on_cpu: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.offload = float(decay), bool(on_cpu)
        self.model, self.source_params = model, list(model.parameters())
        sources = self._sources()
        src_device = sources[0].device
        self.ema_params = self._copy_params(torch.device("cpu") if on_cpu else src_device)
        if len(self.ema_params) != len(sources):
            raise RuntimeError("EMA copy and model have different parameter lists")
        self._future: Optional[Future] = None  # the pending host-memory update
        # a host-memory EMA: pinned staging buffers, the event of their copies (CUDA) and the worker thread
        pin = self.offload and src_device.type == "cuda"
        self._staging = ([torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in sources]
                         if self.offload else [])
        self._event = torch.cuda.Event() if pin else None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repro-ema") if self.offload else None

    def _copy_params(self, device: torch.device) -> list[torch.Tensor]:
        """The EMA's parameters on `device`: those of a frozen eval-mode copy of the model."""
        self._module = copy.deepcopy(self.model).to(device).eval().requires_grad_(False)
        return list(self._module.parameters())

    @property
    def module(self) -> nn.Module:
        """The EMA model (eval mode, no gradients), with any pending update applied."""
        self.flush()
        return self._module

    @torch.no_grad()
    def update(self) -> None:
        """Move the EMA one step towards the model's current parameters."""
        if not self.offload:
            self._lerp(self._sources())
            return
        self.flush()  # the previous update has read the staging buffers: they may be overwritten
        for buf, p in zip(self._staging, self._sources()):
            buf.copy_(p.detach(), non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._future = self._worker.submit(self._apply_staged)

    def _sources(self, params: Optional[Iterable[torch.Tensor]] = None) -> list[torch.Tensor]:
        """What the EMA follows of `params` (default: the model's parameters), one per entry of `ema_params`."""
        return self.source_params if params is None else list(params)

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
                                               zip(self._sources(model.parameters()), self.ema_params)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.flush()
        self._module.load_state_dict(state_dict, strict=True)


class ShardedEMA(EMA):
    """The EMA of an FSDP2-sharded model: each process keeps the EMA of its own shard of each parameter.

    Same arithmetic as `EMA`, element by element, on the local shards (`DTensor.to_local()`), so the
    EMA costs 4 bytes per parameter / world size; `on_cpu` keeps those shards in host memory with the
    same overlapped update. `state_dict()` gathers the full EMA on rank 0 (a collective: every rank
    calls it), with the model's persistent buffers, in the model's key order.
    """

    def _copy_params(self, device: torch.device) -> list[torch.Tensor]:
        """Copies of this process's shards on `device`, and the parameter names (the state dict's keys)."""
        self.names = [name for name, _ in self.model.named_parameters()]
        return [p.detach().to(device, copy=True) for p in self._sources()]

    def _sources(self, params: Optional[Iterable[torch.Tensor]] = None) -> list[torch.Tensor]:
        # source_params are the model's DTensors: this process's shard of each, updated in place by AdamW
        return [p.to_local() for p in (self.source_params if params is None else params)]

    @property
    def module(self) -> nn.Module:
        raise RuntimeError("a sharded EMA has no module; use state_dict() (gathered on rank 0)")

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA state dict on rank 0 (host memory); {} on the other ranks."""
        from torch.distributed.tensor import DTensor

        self.flush()
        main = torch.distributed.get_rank() == 0
        ema = dict(zip(self.names, zip(self.ema_params, self.source_params)))
        out: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            if key in ema:
                shard, p = ema[key]
                full = DTensor.from_local(shard.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                          run_check=False, shape=p.shape, stride=p.stride()).full_tensor()
                if main:
                    out[key] = full.to("cpu", copy=True)
            elif main:  # a persistent buffer (RoPE tables): the same on every process
                out[key] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take this process's shard of every EMA parameter from a full state dict (every rank calls)."""
        from torch.distributed.tensor import distribute_tensor

        self.flush()
        for name, shard, p in zip(self.names, self.ema_params, self.source_params):
            full = state_dict[name].detach().to(p.device_mesh.device_type, p.dtype)
            shard.copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
