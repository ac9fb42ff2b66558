"""LightningDiT's cost on paper: FLOPs per image and the memory a training step needs.

FLOPs (for MFU; a multiply-add is 2 FLOPs, equal to torch's FlopCounterMode): per image-forward,
2 x (weights applied to every token) x tokens, plus 2 x (weights applied once per image: the adaLN
modulation and the timestep MLP act on the conditioning vector), plus attention's QK^T and AV
(4 T^2 D per block). LightningDiT-XL/1 at 16x16 latents: ~237 GFLOP (counting the 223M adaLN
parameters once per token instead gives the ~354 GFLOP sometimes quoted). A training step costs 3
forwards (forward + backward), 4 with gradient checkpointing (the forward is recomputed).

Memory (for "does XL/1 train on a 16 GB T4?"): fp32 weights, fp32 gradients, AdamW's two fp32
moments, the EMA (on the GPU or the CPU), and activations. The activations of one transformer block
are measured, not guessed: one block of the real model runs forward on the CPU under autocast while
`saved_tensors_hooks` records every tensor autograd keeps (bf16 stands in for fp16: same sizes).
With gradient checkpointing only each block's fp32 input is kept, plus one block recomputed at a
time in the backward pass.

Under `train.strategy: fsdp` (`shards` = processes) weights, gradients, AdamW moments and EMA are
divided by the process count, and the blocks being gathered come on top: FSDP2 keeps the root's
weights (embeddings, final layer) whole, and holds up to two blocks' full weights (the current one
and the prefetched next) plus one block's full gradient before its reduce-scatter. `offload` (host
memory for the shards and AdamW) leaves only those gathered blocks on the GPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from repro.models.lightningdit import LightningDiT, build_model
from repro.utils.hardware import GiB


def model_forward_flops(model: nn.Module) -> float:
    """FLOPs of one image's forward pass through a LightningDiT (works on a `meta`-device model)."""
    tokens = model.x_embedder.num_patches
    per_token = per_image = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if "adaLN_modulation" in name or name.startswith("t_embedder"):
                per_image += mod.weight.numel()
            else:
                per_token += mod.weight.numel()
        elif isinstance(mod, nn.Conv2d):  # patch embedding: one kernel application per token
            per_token += mod.weight.numel()
    attention = 4 * tokens * tokens * model.hidden_size * len(model.blocks)
    return float(2 * tokens * per_token + 2 * per_image + attention)


def _meta_model(model_cfg, latent_size: int, num_classes: int) -> nn.Module:
    with torch.device("meta"):
        return build_model(model_cfg, latent_size, num_classes)


def forward_flops(model_cfg, latent_size: int, num_classes: int = 1000) -> float:
    """Analytic FLOPs of one image's forward pass of the model `model_cfg` builds (`model_forward_flops`)."""
    return model_forward_flops(_meta_model(model_cfg, latent_size, num_classes))


def step_flops(model_cfg, latent_size: int, batch: int, checkpointing: bool, num_classes: int = 1000) -> dict:
    """Model FLOPs (3 x forward, for MFU) and hardware FLOPs (+1 forward recomputed with checkpointing)."""
    fwd = forward_flops(model_cfg, latent_size, num_classes) * batch
    return {"forward": fwd, "model": 3 * fwd, "hardware": (4 if checkpointing else 3) * fwd}


def measure_block_saved_bytes(model_cfg, latent_size: int, micro_batch: int, precision: str,
                              num_classes: int = 1000) -> int:
    """Bytes autograd keeps for the backward of one transformer block (real forward on the CPU)."""
    cfg = copy.deepcopy(model_cfg)
    cfg.use_checkpoint = False
    meta = _meta_model(cfg, latent_size, num_classes)
    # a one-block model of the same width: only its first block runs
    m = LightningDiT(input_size=latent_size, patch_size=meta.patch_size, in_channels=meta.in_channels,
                     hidden_size=meta.hidden_size, depth=1, num_heads=meta.num_heads, num_classes=num_classes,
                     use_qknorm=cfg.use_qknorm, use_swiglu=cfg.use_swiglu, use_rope=cfg.use_rope,
                     use_rmsnorm=cfg.use_rmsnorm, wo_shift=cfg.wo_shift)
    block = m.blocks[0]
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    x = torch.randn(micro_batch, m.x_embedder.num_patches, m.hidden_size, requires_grad=True)
    c = torch.randn(micro_batch, m.hidden_size, requires_grad=True)
    kept: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # hold every saved tensor so no storage address is reused meanwhile

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        alive.append(t)
        if s.data_ptr() not in params:  # fp32 master weights are counted once, in the static part
            kept[s.data_ptr()] = s.nbytes()
        return t

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.bfloat16}[precision]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            block(x, c, m.feat_rope)
    return sum(kept.values())


@dataclass
class MemoryBudget:
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.items)

    def table(self, limit_gib: float | None = None) -> str:
        lines = [f"  {name:<58} {b / GiB:8.3f} GiB" for name, b in self.items]
        lines.append(f"  {'total (allocated tensors)':<58} {self.total / GiB:8.3f} GiB")
        if limit_gib is not None:
            verdict = "fits" if self.total / GiB <= limit_gib else "does NOT fit"
            lines.append(f"  -> {verdict} in {limit_gib:.2f} GiB = {limit_gib * GiB / 1e9:.1f} GB "
                         "(CUDA context, ~0.3-0.5 GiB, comes on top)")
        return "\n".join(lines)


def training_memory_budget(model_cfg, latent_size: int, micro_batch: int, precision: str, checkpointing: bool, *,
                           ema_on_device: bool = True, fused_adam: bool = True, num_classes: int = 1000,
                           block_saved: int | None = None, shards: int = 1, offload: bool = False) -> MemoryBudget:
    """Peak allocated bytes of a training step (static state + activations at the start of backward).
    `shards` > 1 or `offload`: FSDP2 with that many processes (see the module docstring)."""
    m = _meta_model(model_cfg, latent_size, num_classes)
    n_all = sum(p.numel() for p in m.parameters())
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    depth, d, tokens = len(m.blocks), m.hidden_size, m.x_embedder.num_patches
    if block_saved is None:
        block_saved = measure_block_saved_bytes(model_cfg, latent_size, micro_batch, precision, num_classes)
    residual = micro_batch * tokens * d * 4  # the fp32 residual stream between blocks
    widest = max(mod.weight.shape[0] for name, mod in m.blocks[0].named_modules()
                 if isinstance(mod, nn.Linear) and "adaLN" not in name)  # per-token layers only
    b = MemoryBudget()
    if shards > 1 or offload:
        _sharded_state(b, m, n_all, n_train, shards, offload, ema_on_device, fused_adam)
    else:
        b.items.append((f"weights fp32 ({n_all / 1e6:.1f}M parameters)", 4 * n_all))
        b.items.append(("gradients fp32", 4 * n_train))
        b.items.append(("AdamW exp_avg + exp_avg_sq fp32", 8 * n_train))
        if not fused_adam:
            b.items.append(("AdamW foreach temporaries (fused AdamW has none)", 4 * n_train))
        b.items.append(("EMA fp32 " + ("on the GPU" if ema_on_device else "(on the CPU: 0 on the GPU)"),
                        4 * n_all if ema_on_device else 0))
    if checkpointing:
        b.items.append((f"activations: {depth} block inputs kept (checkpointing), micro-batch {micro_batch}",
                        depth * residual))
        b.items.append(("activations: one block recomputed in backward (measured)", block_saved))
    else:
        b.items.append((f"activations: {depth} blocks x {block_saved / 2**20:.0f} MiB (measured), "
                        f"micro-batch {micro_batch}", depth * block_saved))
    b.items.append(("activations: embedding + final layer + loss", 4 * residual))
    b.items.append(("backward transients (gradients of the widest layer output)",
                    2 * micro_batch * tokens * widest * 4))
    return b


def _sharded_state(b: MemoryBudget, m: nn.Module, n_all: int, n_train: int, shards: int, offload: bool,
                   ema_on_device: bool, fused_adam: bool) -> None:
    """The static part of an FSDP2 step: 1/shards of the state, plus the gathered blocks (on the GPU)."""
    n_block = sum(p.numel() for p in m.blocks[0].parameters())
    n_root = n_all - len(m.blocks) * n_block
    where = "in host memory: 0 on the GPU" if offload else f"1/{shards} per process"
    b.items.append((f"weights fp32 ({n_all / 1e6:.1f}M parameters), {where}",
                    0 if offload else -(-4 * n_all // shards)))
    b.items.append((f"gradients fp32, {where}", 0 if offload else -(-4 * n_train // shards)))
    b.items.append((f"AdamW exp_avg + exp_avg_sq fp32, {where}", 0 if offload else -(-8 * n_train // shards)))
    if not fused_adam and not offload:
        b.items.append(("AdamW foreach temporaries (fused AdamW has none)", -(-4 * n_train // shards)))
    on_gpu = ema_on_device and not offload
    b.items.append((f"EMA fp32, {'1/' + str(shards) + ' per process' if on_gpu else 'in host memory: 0 on the GPU'}",
                    -(-4 * n_all // shards) if on_gpu else 0))
    b.items.append(("FSDP gathered: root weights (embeddings, final layer) whole", 4 * n_root))
    b.items.append(("FSDP gathered: 2 blocks' weights + 1 block's gradient before reduce-scatter", 3 * 4 * n_block))


# ----------------------------------------------------------------------------------------------
# Choosing a layout that fits a GPU

CUDA_CONTEXT = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator's count
ALLOCATOR_HEADROOM = 0.92  # fraction of the card the allocated tensors may reach (fragmentation, caching)


@dataclass(frozen=True)
class TrainingLayout:
    micro_batch: int
    checkpointing: bool
    ema_on_cpu: bool
    peak: int  # computed bytes of allocated tensors
    fits: bool
    reason: str


def block_saved_fn(model_cfg, latent_size: int, precision: str, num_classes: int = 1000):
    """micro-batch -> bytes one block keeps for backward, from two real measurements (it is affine)."""
    one = measure_block_saved_bytes(model_cfg, latent_size, 1, precision, num_classes)
    two = measure_block_saved_bytes(model_cfg, latent_size, 2, precision, num_classes)
    return lambda micro: one + (two - one) * (micro - 1)


def usable_bytes(total_memory: int) -> int:
    """What the allocated tensors of a training step may use on a card of `total_memory` bytes."""
    return int(ALLOCATOR_HEADROOM * total_memory) - CUDA_CONTEXT


def fits_on_card(model_cfg, latent_size: int, micro_batch: int, precision: str, total_memory: int, *,
                 checkpointing: bool, ema_on_device: bool, num_classes: int = 1000, block_saved=None,
                 shards: int = 1, offload: bool = False) -> bool:
    """Whether a training step's computed peak fits a card of `total_memory` bytes (step 3's rule)."""
    saved = block_saved(micro_batch) if block_saved is not None else None
    return training_memory_budget(model_cfg, latent_size, micro_batch, precision, checkpointing,
                                  ema_on_device=ema_on_device, num_classes=num_classes, block_saved=saved,
                                  shards=shards, offload=offload).total <= usable_bytes(total_memory)


def choose_training_layout(model_cfg, latent_size: int, total_memory: int, precision: str, *,
                           max_micro: int = 128, num_classes: int = 1000, block_saved=None, shards: int = 1,
                           offload: bool = False) -> TrainingLayout:
    """The cheapest way to train on one card, by the computed budget, in this order of preference:

    1. no checkpointing, EMA on the GPU, micro-batch >= 16 (no recomputation, no host work);
    2. per-block checkpointing (+1/3 compute), EMA on the GPU, micro-batch >= 8;
    3. checkpointing and the EMA in host memory (saves 4 bytes/parameter), any micro-batch >= 1.
    Within an option the largest power-of-two micro-batch <= max_micro is taken.
    """
    block_saved = block_saved or block_saved_fn(model_cfg, latent_size, precision, num_classes)
    limit = usable_bytes(total_memory)
    options = ((False, False, 16), (True, False, 8), (True, True, 1))
    for checkpointing, ema_on_cpu, least in options:
        best = None
        micro = 1
        while micro <= max_micro:
            peak = training_memory_budget(model_cfg, latent_size, micro, precision, checkpointing,
                                          ema_on_device=not ema_on_cpu, num_classes=num_classes,
                                          block_saved=block_saved(micro), shards=shards, offload=offload).total
            if peak > limit:
                break
            best = (micro, peak)
            micro *= 2
        if best is not None and best[0] >= least:
            how = ("no checkpointing" if not checkpointing else
                   "per-block checkpointing" + (", EMA in host memory" if ema_on_cpu else ""))
            if shards > 1 or offload:
                how = f"FSDP over {shards} process(es){' with host-memory offload' if offload else ''}, {how}"
            return TrainingLayout(best[0], checkpointing, ema_on_cpu, best[1], True,
                                  f"{how}: {best[1] / GiB:.1f} GiB computed of {limit / GiB:.1f} GiB usable")
    peak = training_memory_budget(model_cfg, latent_size, 1, precision, True, ema_on_device=False,
                                  num_classes=num_classes, block_saved=block_saved(1), shards=shards,
                                  offload=offload).total
    return TrainingLayout(1, True, True, peak, False,
                          f"does not fit even at micro-batch 1 with checkpointing and the EMA in host memory "
                          f"({peak / GiB:.1f} GiB computed of {limit / GiB:.1f} GiB usable): use a smaller model")
