"""How the model is spread over the processes: `train.strategy: ddp` (a full replica each) or `fsdp`.

`ddp` (the default, and what one process runs): every process holds the whole model, its gradients,
AdamW's two moments and the EMA, and DistributedDataParallel averages gradients (upstream train.py).

`fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023 "PyTorch FSDP"), one unit per
transformer block plus the root (embeddings, final layer). Each process keeps 1/N of every parameter,
gradient, AdamW moment and EMA tensor (ZeRO-3); a block's weights are gathered just before its
forward/backward and freed after. `train.fsdp_offload` also moves the shards and the optimizer step to
host memory (CPUOffloadPolicy). Mixed precision stays the kit's autocast (fp32 master weights,
gathered in fp32), so both strategies compute the same step. Gradient accumulation reduce-scatters
after every micro-batch (sharded gradients add up; DDP syncs once at the last micro-batch): memory
first, which is why one picks FSDP.

Checkpoints keep the kit's single-file format under both: the full model, EMA and optimizer state
(indexed like `torch.optim.Optimizer.state_dict()` of the whole model) are gathered to rank 0's host
memory and written there. A run can therefore move between `ddp` and `fsdp` and between world
sizes, and step 4 samples from either.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

from repro.errors import ConfigError
from repro.models.checkpoint import check_state_dict, read_state_dict
from repro.training.ema import EMA, ShardedEMA
from repro.training.grids import weights_swapped_in
from repro.utils import distributed as dist
from repro.utils.hardware import make_scaler, require_torch

STRATEGIES = ("ddp", "fsdp")


def make_strategy(train_cfg, device: torch.device, world: int):
    """The strategy object of `train.strategy` (FSDP needs torchrun or one process with a group)."""
    name = train_cfg.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy is {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "ddp" and train_cfg.fsdp_offload:
        raise ConfigError("train.fsdp_offload=true needs train.strategy=fsdp (DDP keeps a full replica on the "
                          "device); set train.strategy=fsdp or train.fsdp_offload=false")
    return Replicated(device, world) if name == "ddp" else Sharded(device, world, offload=train_cfg.fsdp_offload)


class Replicated:
    """DDP: a full replica per process (the identity with one process)."""

    name = "ddp"
    gathers_copies = False  # full_state returns the live tensors: the checkpoint writer copies them

    def __init__(self, device: torch.device, world: int):
        self.device, self.world = device, world
        self.param_device = device  # where parameters, gradients and optimizer state live (and AdamW runs)

    def describe(self) -> str:
        return f"strategy ddp ({'a full replica per process' if self.world > 1 else 'one process'})"

    def shard(self, model: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        """Nothing to do: DDP wraps the forward model later (`wrap`) or the trainer reduces gradients."""

    def close(self) -> None:
        """Nothing to release."""

    def make_ema(self, model: torch.nn.Module, decay: float, on_cpu: bool) -> EMA:
        return EMA(model, decay, on_cpu=on_cpu)

    def make_scaler(self, precision: str) -> torch.amp.GradScaler:
        return make_scaler(self.device, precision)

    def wrap(self, forward_model):
        if self.world == 1:
            return forward_model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   broadcast_buffers=False, gradient_as_bucket_view=True)

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """The mean of every gradient over the processes, after the backward pass (what DDP does), for a
        trainer whose forward is not one module call (the tokenizer: encode, decode, the GAN's adaptive weight)."""
        if self.world == 1:
            return
        # one collective per dtype over a flat copy, not one per tensor (hundreds of small all-reduces a step)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat.div_(self.world)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    # -- full state (rank 0 writes it) ------------------------------------------------------------

    def full_state(self, model, ema, opt) -> dict[str, Any]:
        """{'model', 'ema', 'opt'} in the single-file layout (every rank calls; only rank 0's is written)."""
        return {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else {},
                "opt": opt.state_dict()}

    def load_model(self, model, state_dict: dict) -> None:
        model.load_state_dict(state_dict, strict=True)

    def load_optimizer(self, model, opt, opt_state: dict) -> None:
        opt.load_state_dict(opt_state)

    def load_weights(self, model, path, prefer: str = "model") -> None:
        """Weights only (train.weight_init), strict, every mismatch named."""
        state_dict = read_state_dict(path, prefer=prefer)
        check_state_dict(model, state_dict, path)
        self.load_model(model, state_dict)

    @contextlib.contextmanager
    def ema_for_grid(self, ema, model, build: Callable[[], torch.nn.Module]) -> Iterator[Optional[torch.nn.Module]]:
        """The EMA weights as a module on rank 0 for a sample grid (None elsewhere); every rank enters."""
        ema.flush()
        if not dist.is_main():
            yield None
        elif ema.offload:  # a host-memory EMA is swapped into the device model for the grid
            with weights_swapped_in(model, ema.ema_params) as m:
                yield m
        else:
            yield ema.module


class Sharded(Replicated):
    """FSDP2: parameters, gradients, optimizer state and EMA sharded over the processes, per block."""

    name = "fsdp"
    gathers_copies = True  # full_state gathers fresh host copies: nothing to copy again

    def __init__(self, device: torch.device, world: int, offload: bool = False):
        require_torch("fsdp2")  # the run stops here, before any work, on a torch without FSDP2
        super().__init__(device, world)
        self.offload = bool(offload)
        self.param_device = torch.device("cpu") if self.offload else device
        self.own_group = False

    def close(self) -> None:
        """End the one-process group `shard` started (torchrun's group is left to the caller)."""
        if self.own_group:
            dist.shutdown()
            self.own_group = False

    def describe(self) -> str:
        where = "; shards and AdamW in host memory" if self.offload else ""
        return (f"strategy fsdp (FSDP2, each of {self.world} process(es) holds 1/{self.world} of the state per "
                f"block{where})")

    def shard(self, model: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        """fully_shard each unit in order (the DiT: each transformer block, then the root), in place, before the
        optimizer is built. Every parameter must lie in a unit whose forward runs (a module call)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        if not dist.is_initialized():  # one process without torchrun (e.g. FSDP for its host-memory offload)
            import torch.distributed as tdist

            tdist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=tdist.HashStore(),
                                     rank=0, world_size=1)
            self.own_group = True
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        policy = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.offload else OffloadPolicy()
        for unit in units:
            fully_shard(unit, mesh=mesh, offload_policy=policy)
        # the model returns unpatchify's view; the loss never modifies it in place, which is the case
        # FSDP2 warns about (a view's in-place op would skip its pre-backward hook)
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    def make_ema(self, model: torch.nn.Module, decay: float, on_cpu: bool) -> EMA:
        return ShardedEMA(model, decay, on_cpu=on_cpu or self.offload)

    def make_scaler(self, precision: str) -> torch.amp.GradScaler:
        """fp16: every process skips the step when any shard's gradient overflowed (found_inf all-reduced)."""
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type, enabled=precision == "fp16")

    def wrap(self, forward_model):
        return forward_model  # fully_shard changed the module in place; no wrapper

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Nothing to do: FSDP2 reduce-scatters each unit's gradients in its backward pass."""

    # -- full state ------------------------------------------------------------------------------

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def full_state(self, model, ema, opt) -> dict[str, Any]:
        """Gathered on rank 0's host memory (collectives: every rank calls, in this order)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd = get_model_state_dict(model, options=self._options(cpu_offload=True))
        ema_sd = ema.state_dict() if ema is not None else {}
        named = {key: get_optimizer_state_dict(model, o, options=self._options(cpu_offload=True)) if o is not None
                 else None for key, o in _optimizers(opt).items()}
        if not dist.is_main():
            return {"model": {}, "ema": {}, "opt": {}}
        opt_sd = {key: _indexed(model, o, osd) if o is not None else {}
                  for (key, osd), o in zip(named.items(), _optimizers(opt).values())}
        return {"model": model_sd, "ema": ema_sd, "opt": opt_sd[None] if None in opt_sd else opt_sd}

    def load_model(self, model, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # every rank holds the full (memory-mapped) state and keeps its own shard of each tensor
        set_model_state_dict(model, state_dict, options=self._options(strict=True))

    def load_optimizer(self, model, opt, opt_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        for key, o in _optimizers(opt).items():
            own = opt_state if key is None else opt_state[key]
            if o is not None:
                set_optimizer_state_dict(model, o, _named(model, o, own), options=self._options())

    @contextlib.contextmanager
    def ema_for_grid(self, ema, model, build: Callable[[], torch.nn.Module]) -> Iterator[Optional[torch.nn.Module]]:
        """The EMA gathered into a fresh full model on rank 0 (for the grid only, then freed)."""
        state = ema.state_dict()  # collective
        if not dist.is_main():
            yield None
            return
        full = build()
        full.load_state_dict(state, strict=True)
        del state
        try:
            yield full.eval().requires_grad_(False)
        finally:
            del full


# ----------------------------------------------------------------------------------------------
# Optimizer state: parameter names (torch.distributed.checkpoint) <-> indices (Optimizer.state_dict)


def _optimizers(opt) -> dict:
    """{None: opt} for one optimizer; {key: optimizer or None} for a trainer's `OptimizerSet` (the tokenizer's two)."""
    return dict(opt.optimizers) if hasattr(opt, "optimizers") else {None: opt}


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    # index i of an optimizer's state_dict is the i-th parameter of its groups, in order (the DiT's:
    # model.parameters(), the i-th named parameter)
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def _indexed(model, opt, osd: dict) -> dict:
    """A name-keyed full optimizer state -> the layout `opt.state_dict()` of the unsharded model has."""
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    state = {index[name]: value for name, value in osd["state"].items()}
    groups = [dict(g, params=[index[name] for name in g["params"]]) for g in osd["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _named(model, opt, opt_state: dict) -> dict:
    """The inverse of `_indexed`, for set_optimizer_state_dict."""
    names = _param_names(model, opt)
    try:
        state = {names[int(i)]: value for i, value in opt_state["state"].items()}
        groups = [dict(g, params=[names[int(i)] for i in g["params"]]) for g in opt_state["param_groups"]]
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"optimizer state does not index this model's {len(names)} parameters ({e})") from None
    return {"state": state, "param_groups": groups}
