"""VFM-VAE inference memory on paper: weights + activation peak per image, computed on the meta device.

The model is built on the `meta` device (no memory), and one encode or decode runs on meta tensors under
`no_grad` while `LiveTensorBytes`, a TorchDispatchMode, adds up the storages every aten op creates and takes
them off when their last reference dies (a weak reference to each storage); the most it holds at once is the
activation peak. What it counts: every tensor the forward pass allocates, the input batch and the output
included, at the moment the op that made it returns (its inputs are still alive then), with views and in-place
results not counted twice. What it leaves out: the CUDA context (~0.3-0.5 GiB, `repro.models.cost.usable_bytes`
sets it aside), the caching allocator's slack and fragmentation (the same 8% margin as the training budget),
cuDNN/cuBLAS workspaces and scratch memory inside a fused kernel (a kernel's internals are not aten ops).

Attention: on the meta device `scaled_dot_product_attention` takes its math path (it materializes the
L x S score matrix, 64 MiB per image and layer for SigLIP2 in float32); on a GPU every attention of the
model runs a fused kernel (memory-efficient on a T4, flash/memory-efficient on an H100: no mask, head
dims 32-64), which keeps no score matrix. `attention="fused"` (default) counts only the output,
`attention="math"` the math path (the upper bound of a device with no fused kernel).

Precision: the loader's options are autocast on CUDA and keep every weight in float32. `siglip_precision
"bf16"` runs the SigLIP2 tower under bf16 autocast; `num_fp16_res` runs the top decoder blocks under fp16
autocast. Autocast does not run on meta tensors, so it is emulated inside those modules: matmuls and
convolutions get their inputs cast to the half type (the cast copies counted while the op runs: weights
of frozen models are cast anew each call, autocast caches only trainable leaves), norms, softmax, pow,
rsqrt, sum and vector norms are computed in float32, everything else keeps its input's type. One known
difference: the decoder carries its features between fp16 blocks in float16 on CUDA, float32 here (under
10 MiB more per image in the official decoder: an over-estimate). The emulation is for meta tensors (a cast
of a broadcast view makes an empty tensor); on real CPU tensors, without these options, the count is the
meta count (benchmarks/bench_vfm_vae.py compares both with the resident memory a CPU run takes).

The activations grow linearly with the batch, plus a small part that does not grow (noise maps, weight
casts); the per-image figure is the peak of a batch of 1, so `batch x per image` bounds the peak of a
batch from above (tests/test_vfm_vae_budget.py checks it against direct runs).

    cost = vfm_vae_cost("decode")                       # official f16d32, fp32, as the kit loads it
    cost.largest_batch(15_835_398_144)                  # 32: the largest power of two that fits a 16 GB T4
    print(cost.budget(32).table(usable_bytes(15_835_398_144) / GiB))
    plan("Tesla T4", 15_835_398_144)["line"]            # step 1's line; budget_tables(...): step 3's tables
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from repro.models.cost import MemoryBudget, usable_bytes
from repro.utils.hardware import GiB

ENCODE, DECODE = "encode", "decode"
MiB = 2**20
aten = torch.ops.aten
# autocast's lists (CUDA), as the ops appear below the decompositions: half-type inputs, float32 inputs
_LOWER = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm}  # (+ convolutions: _LOWER_FUNCTIONS)
_FP32 = {aten.native_layer_norm, aten.native_group_norm, aten._softmax, aten._safe_softmax, aten._log_softmax,
         aten.pow, aten.rsqrt, aten.sum, aten.linalg_vector_norm, aten.norm, aten.exp, aten.log, aten.reciprocal,
         aten.cumsum, aten.prod, aten.softplus}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive (`live`), and the most at
    once (`peak`). Storages of `static` tensors (the weights) and outputs that share an input's storage (views,
    in-place ops) are not counted. `push`/`pop` open and close an emulated autocast region of a half type."""

    def __init__(self, static: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._static = {_key(t) for t in static}
        self.region: list[torch.dtype] = []

    def push(self, dtype: torch.dtype) -> None:
        self.region.append(dtype)

    def pop(self) -> None:
        self.region.pop()

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in self._static:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        weakref.finalize(storage, self._free, key)  # torch keeps a storage's Python object while it lives
        self.peak = max(self.peak, self.live)

    def _cast(self, a: Any, dtype: torch.dtype) -> Any:
        cast = _half(a, dtype)
        if cast is not a:
            self.track(cast)  # the mode is off inside its own handler: count the copy by hand
        return cast

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.region:
            packet = func.overloadpacket
            target = self.region[-1] if packet in _LOWER else torch.float32 if packet in _FP32 else None
            if target is not None:
                args, kwargs = tree_map(lambda a: self._cast(a, target), (args, kwargs))
        out = func(*args, **kwargs)
        inputs = {_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _key(t) not in inputs:
                self.track(t)
        return out


F = torch.nn.functional
_LOWER_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}  # autocast casts these before their type checks


class _FunctionLevel(TorchFunctionMode):
    """Autocast's casts for convolutions and linear layers (their composite kernels check the input and weight
    types before any aten op runs), and `scaled_dot_product_attention` as a fused GPU kernel allocates it: the
    output only (`fused`), or its math path (the meta device's own, `fused=False`)."""

    def __init__(self, counter: LiveTensorBytes, fused: bool):
        super().__init__()
        self.counter, self.fused = counter, fused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        region = self.counter.region[-1] if self.counter.region else None
        if region is not None and func in _LOWER_FUNCTIONS:
            args, kwargs = tree_map(lambda a: _half(a, region), (args, kwargs))  # aten copies: counted
        if not self.fused or func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
        if region is not None:  # autocast casts the three inputs
            q, k, v = (_half(t, region) for t in (q, k, v))
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)


def _half(a: Any, dtype: torch.dtype) -> Any:
    """`a` in autocast's type. A broadcast view (a weight expanded by a matmul nested in another function, which
    autocast cast before expanding) keeps its layout: an empty tensor of its strides, sized as its storage
    (the emulation is for the meta device: the values do not matter there)."""
    if not isinstance(a, torch.Tensor) or a.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or a.dtype == dtype:
        return a
    if 0 in a.stride():
        return torch.empty_strided(a.shape, a.stride(), dtype=dtype, device=a.device)
    return a.to(dtype)


def _region_modules(model: nn.Module, part: str, siglip_precision: str, num_fp16_res: int):
    """(module, dtype) pairs the loader's precision options run under autocast."""
    if siglip_precision not in ("fp32", "bf16"):
        raise ValueError(f"siglip_precision {siglip_precision!r}: 'fp32' or 'bf16'")
    if part == ENCODE and siglip_precision == "bf16":
        return [(model.vfm_encoder.encoder.vision_model.vision_model, torch.bfloat16)]
    if part == DECODE and num_fp16_res > 0:
        synth = model.synthesis
        start = len(synth.blocks) - int(num_fp16_res)
        mods = [synth.blocks[k] for k in synth.blocks if int(k) >= start]
        mods += [synth.z_convs[k] for k in synth.z_convs if int(k) >= start]
        return [(m, torch.float16) for m in mods]
    return []


def activation_peak(model: nn.Module, part: str, batch: int, *, siglip_precision: str = "fp32",
                    num_fp16_res: int = 0, attention: str = "fused") -> int:
    """Peak bytes of the tensors one `model.encode` or `model.decode` of `batch` items allocates (model on the
    meta device, or any device: the count is the same)."""
    if part not in (ENCODE, DECODE) or attention not in ("fused", "math"):
        raise ValueError(f"part {part!r} ({ENCODE}/{DECODE}), attention {attention!r} (fused/math)")
    counter = LiveTensorBytes(static=[*model.parameters(), *model.buffers()])
    hooks = []
    for module, dtype in _region_modules(model, part, siglip_precision, num_fp16_res):
        hooks.append(module.register_forward_pre_hook(lambda _m, _a, dtype=dtype: counter.push(dtype)))
        hooks.append(module.register_forward_hook(lambda _m, _a, _o: counter.pop()))
    device = next(model.parameters()).device
    side = model.img_resolution
    try:
        with torch.no_grad(), _FunctionLevel(counter, attention == "fused"), counter:
            if part == ENCODE:
                out = model.encode(torch.zeros(batch, 3, side, side, device=device)).mean
            else:
                z = torch.zeros(batch, model.embed_dim, model.z_side, model.z_side, device=device)
                out = model.decode(z)
        del out
    finally:
        for hook in hooks:
            hook.remove()
    return counter.peak


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class VFMVAECost:
    """The static bytes of one part of the VFM-VAE (named lines) and its activation bytes per image."""

    part: str
    weights: tuple[tuple[str, int], ...]
    per_image: int
    options: str

    @property
    def static(self) -> int:
        return sum(b for _, b in self.weights)

    def total(self, batch: int) -> int:
        return self.static + batch * self.per_image

    def budget(self, batch: int) -> MemoryBudget:
        act = f"activations: {batch} x {self.per_image / MiB:.1f} MiB per image ({self.options})"
        return MemoryBudget(list(self.weights) + [(act, batch * self.per_image)])

    def largest_batch(self, total_memory: int, max_batch: int = 4096) -> int:
        """The largest power of two whose total fits `usable_bytes(total_memory)`; 0 when not even 1 does."""
        limit, batch = usable_bytes(total_memory), 0
        while batch < max_batch and self.total(max(1, 2 * batch)) <= limit:
            batch = max(1, 2 * batch)
        return batch


def cost_of(model: nn.Module, part: str, *, siglip_precision: str = "fp32", num_fp16_res: int = 0,
            attention: str = "fused") -> VFMVAECost:
    """The cost of `part` for this model as the kit loads it: encoding holds the whole model (step 6 loads it
    with the encoder), decoding holds the generator only (steps 4/7 load it with `with_encoder=False`)."""
    params = [(n, p) for n, p in model.named_parameters() if part == ENCODE or not n.startswith("vfm_encoder.")]
    buffers = [(n, b) for n, b in model.named_buffers() if part == ENCODE or not n.startswith("vfm_encoder.")]
    tower = [p for n, p in params if n.startswith("vfm_encoder.")]
    rest = [p for n, p in params if not n.startswith("vfm_encoder.")]
    dtype = str(rest[0].dtype).replace("torch.float", "fp")
    lines = []
    if tower:
        lines.append((f"weights {dtype}: SigLIP2 vision tower, {sum(p.numel() for p in tower) / 1e6:.1f}M parameters",
                      _bytes(tower)))
    lines.append((f"weights {dtype}: generator, {sum(p.numel() for p in rest) / 1e6:.1f}M parameters", _bytes(rest)))
    lines.append(("buffers (noise maps, blur kernels, position ids)", _bytes(b for _, b in buffers)))
    opts = (f"SigLIP2 {siglip_precision}" if part == ENCODE else
            f"{num_fp16_res} fp16 blocks" if num_fp16_res else "fp32")
    opts += ", fused attn" if attention == "fused" else ", math attn"
    per_image = activation_peak(model, part, 1, siglip_precision=siglip_precision, num_fp16_res=num_fp16_res,
                                attention=attention)
    return VFMVAECost(part, tuple(lines), per_image, opts)


@functools.lru_cache(maxsize=2)
def official_meta_model(with_encoder: bool = True) -> nn.Module:
    """The official f16d32 VFM-VAE on the meta device (with the SigLIP2 tower: needs transformers)."""
    from repro.tokenizer.vfm_vae import VFMVAE

    with torch.device("meta"):
        return VFMVAE(with_encoder=with_encoder).eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def vfm_vae_cost(part: str, siglip_precision: str = "fp32", num_fp16_res: int = 0,
                 attention: str = "fused") -> VFMVAECost:
    """The official f16d32's cost of `part` (encode needs transformers for the SigLIP2 tower)."""
    model = official_meta_model(with_encoder=part == ENCODE)
    return cost_of(model, part, siglip_precision=siglip_precision, num_fp16_res=num_fp16_res, attention=attention)


def vfm_vae_memory_budget(part: str, batch: int, **options) -> MemoryBudget:
    """The official f16d32's memory for one `part` ("encode"/"decode") of `batch` images (a MemoryBudget)."""
    return vfm_vae_cost(part, **options).budget(batch)


def plan(name: str, total_memory: int, note: str = "") -> dict[str, Any]:
    """Step 1's plan for the official VFM-VAE (fp32, as the kit loads it) on a card of `total_memory` bytes:
    the largest power-of-two encode and decode batches, with a one-line reason."""
    usable = usable_bytes(total_memory)
    out: dict[str, Any] = {"card": name, "total_memory_bytes": total_memory, "reference": bool(note)}
    batches, costs, missing = [], [], []
    for part in (ENCODE, DECODE):
        try:
            cost = vfm_vae_cost(part)
        except Exception as err:  # noqa: BLE001 (transformers missing or too old: the other part still plans)
            out[f"{part}_batch"] = None
            text = str(err).splitlines()[0]
            out[f"{part}_why"] = ("it needs transformers (pip install 'repro-latent-kit[vfm-vae]')"
                                  if "transformers" in text else text[:160])
            missing.append(f"{part} not planned: {out[f'{part}_why']}")
            continue
        out[f"{part}_batch"] = batch = cost.largest_batch(total_memory)
        batches.append(f"{part} batch {batch}" if batch else f"{part}: not even 1 image fits")
        costs.append(f"{part} {cost.static / GiB:.2f} GiB weights + {cost.per_image / MiB:.1f} MiB per image")
    enc = out[f"{ENCODE}_batch"]
    flips = f"; step 6 --batch-size up to {enc // 2} (it encodes each image with its flip)" if enc and enc > 1 else ""
    out["line"] = (f"{name}, {total_memory / GiB:.1f} GiB{note}: {', '.join(batches + missing)} (fp32 as the kit loads "
                   f"it; computed: {', '.join(costs)}, of {usable / GiB:.1f} GiB usable){flips}")
    return out


def budget_tables(name: str, total_memory: int, planned: Optional[dict[str, Any]] = None) -> list[str]:
    """Step 3's printout: each part's budget table at the planned batch on this card (`planned`: its `plan`)."""
    planned = planned or plan(name, total_memory)
    limit = usable_bytes(total_memory) / GiB
    lines = [f"VFM-VAE f16d32 memory on {name} ({total_memory / GiB:.1f} GiB, {limit:.1f} GiB usable), computed "
             "on the meta device (official architecture, fp32 as the kit loads it):"]
    for part in (ENCODE, DECODE):
        batch = planned.get(f"{part}_batch")
        if not batch:
            lines.append(f"  {part}: not planned: {planned.get(f'{part}_why')}" if batch is None else
                         f"  {part}: not even 1 image fits")
            continue
        lines.append(f"  {part}, batch {batch} (the largest power of two that fits):")
        lines.append(vfm_vae_memory_budget(part, batch).table(limit))
    return lines
