"""The one place that knows about the hardware: device, precision, autocast, backends, memory, determinism.

Sampling (step 4), training (step 7) and the benchmarks take every hardware decision from here, so
the same rule picks the same precision everywhere:

    device = default_device()                       # cuda:LOCAL_RANK when a GPU is present, else cpu
    precision = resolve_precision("auto", device)   # bf16 on sm_80+, fp16 on T4/P100, fp32 on CPU
    with autocast(device, precision): ...           # a no-op for fp32
    scaler = make_scaler(device, precision)         # enabled for fp16 only

The pure decisions on fabricated GPUs (step 1's report, `--profile t4`) live in repro.setup.envinfo
and use `capability_has_bf16` from here.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path
from typing import Optional

import torch

from repro.errors import ReproError

GiB = 1024**3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)


# ----------------------------------------------------------------------------------------------
# Device


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else cpu. Never hard-codes `.cuda()`."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ----------------------------------------------------------------------------------------------
# Precision


def capability_has_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores exist from Ampere (sm_80) on; older GPUs only emulate bf16 (slow or failing)."""
    return tuple(capability) >= (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (the CPU's autocast supports bf16, slowly without AMX)."""
    if device.type != "cuda":
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation
        return capability_has_bf16(torch.cuda.get_device_capability(device))


def resolve_precision(requested: Optional[str], device: torch.device, key: str = "sample.precision") -> str:
    """'auto'/None -> fp32 on CPU, bf16 on GPUs with native bf16, fp16 on older GPUs (T4, P100);
    an explicit value is checked against the device. `key` names the setting in errors."""
    if requested in (None, "auto"):
        return "fp32" if device.type != "cuda" else "bf16" if native_bf16(device) else "fp16"
    if requested not in DTYPES:
        raise ReproError(f"{key}={requested!r} is not a precision; choose auto, fp32, bf16 or fp16")
    if requested == "bf16" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ReproError(f"{key}=bf16 but this GPU ({name}) has no native bf16: use fp16 or fp32")
    return requested


def autocast(device: torch.device, precision: str):
    """The context running matmuls/convs in `precision` (a no-op for fp32).

    cache_enabled=False: each DiT weight is used once per forward, so the cast cache saves no work,
    and with gradient checkpointing it would hold a low-precision copy of every weight until the
    forward ends (1.35 GB for XL/1). Sampling's weights need no grad, so they are never cached anyway.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=False)


# torch features the kit uses that are newer than some torch a platform may ship: (first release, what uses it).
# The floor in pyproject.toml covers every feature on the common path; the rest are checked where they are used.
TORCH_FEATURES = {
    "grad_scaler": ("2.3", "fp16 training's gradient scaler (torch.amp.GradScaler)"),
    "fsdp2": ("2.6", "train.strategy: fsdp (FSDP2's torch.distributed.fsdp.fully_shard)"),
}


def require_torch(feature: str, installed: Optional[str] = None) -> None:
    """ReproError naming the feature and the torch release it needs when this torch (`installed`) is older."""
    from packaging.version import Version

    needed, what = TORCH_FEATURES[feature]
    installed = installed or torch.__version__
    if Version(installed).release < Version(needed).release:
        raise ReproError(f"{what} needs torch >= {needed}; this is torch {installed}: upgrade it "
                         f"(pip install -U 'torch>={needed}', the CUDA build for this machine) or do without it")


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
    require_torch("grad_scaler")
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def configure_backends(device: torch.device) -> None:
    # upstream inference.py: torch.backends.cuda.matmul.allow_tf32 = True (TF32 exists from Ampere, sm_80)
    if device.type == "cuda" and capability_has_bf16(torch.cuda.get_device_capability(device)):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def set_determinism(enabled: bool, device: torch.device) -> None:
    """Bitwise-repeatable kernels: `torch.use_deterministic_algorithms` (+ the cuBLAS workspace it needs).

    A resumed run then recomputes exactly what the uninterrupted one would (same kernels, same
    reduction order); the thread count must also be the same on both sides (OMP_NUM_THREADS).
    """
    if not enabled:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------------------------
# Compilation


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_mode(requested, device: torch.device, *, auto: Optional[str]) -> Optional[str]:
    """The torch.compile mode to use, or None for eager.

    requested: None/"auto" -> `auto` on CUDA and eager on CPU (CPU runs stay exactly as they were);
    False/"none"/"eager" -> eager; True -> "default"; or one of COMPILE_MODES.
    """
    if requested is None or requested == "auto":
        return auto if device.type == "cuda" else None
    if requested is False or requested in ("none", "eager", "false"):
        return None
    if requested is True or requested == "true":
        return "default"
    if requested not in COMPILE_MODES:
        raise ReproError(f"compile mode {requested!r} is not one of auto, none, {', '.join(COMPILE_MODES)}")
    return requested


def use_compile_cache(folder: Path) -> Path:
    """Keep torch.compile's caches (Inductor's FX graph and kernel caches) under `folder`, so a resumed
    Kaggle/Colab session whose work root survived does not compile from scratch; an explicit
    TORCHINDUCTOR_CACHE_DIR wins."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(folder).resolve())))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class CompiledOrEager(torch.nn.Module):
    """`torch.compile(model)` that falls back to the eager model, with one clear line, if compiling fails.

    torch.compile is lazy: a backend or graph-capture failure surfaces at the first call of each new
    shape. Such a failure switches this wrapper to eager for good; out-of-memory errors and interrupts
    are re-raised, never hidden. `forward` keeps the model's signature; `num_classes` is forwarded for
    the CFG null label.
    """

    def __init__(self, model: torch.nn.Module, mode: Optional[str], what: str, backend=None,
                 note=print):
        super().__init__()
        self.eager = model
        kwargs = {"backend": backend} if backend is not None else {}
        self.compiled = torch.compile(model, mode=None if mode == "default" else mode, **kwargs)
        self.num_classes = getattr(model, "num_classes", None)
        self.what, self.note, self.failed = what, note, None
        self.graphs = mode in ("reduce-overhead", "max-autotune")

    def forward(self, *args, **kwargs):
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        try:
            if self.graphs:  # outputs of a CUDA graph live in its pool until the next replay: copy them out
                torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(*args, **kwargs).clone()
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- any compiler failure; OOM is re-raised below
            if is_oom(e):
                raise
            root, seen = e, {id(e)}
            while (inner := root.__cause__ or root.__context__) is not None and id(inner) not in seen:
                root = inner  # the compiler's own error, under torch's wrappers
                seen.add(id(root))
            first = (str(root).strip().splitlines() or [""])[0][:200]
            self.failed = f"{type(root).__name__}: {first}"
            self.note(f"note: torch.compile failed for {self.what} ({self.failed}); running eager instead "
                      "(same results, slower; pass --no-compile / train.compile=false to skip compiling)")
            return self.eager(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Memory


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error (CUDA's, or the CPU allocator's)."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):  # torch.OutOfMemoryError is the same class
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what): torch.cuda.max_memory_allocated on GPU; the process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "GPU max allocated"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process peak RSS"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"
