"""Environment doctor: what this machine can run, and the traps it would fall into.

Step 1 writes the report to `runs/env.json`; step 3 reads its `recommended` block to turn
`precision: auto` and `per_proc_batch_size: auto` into concrete values. The decisions
(architecture support, bf16, batch sizes) are pure functions of a `GPUInfo` list so they
can be tested on a CPU machine with fabricated GPUs (a P100, a T4, an A100).

    report = collect_env()              # dict, JSON-ready
    print(format_report(report))
    write_env_json(report)              # runs/env.json, atomically
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform as _platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from repro import paths
from repro.utils.hardware import GiB, capability_has_bf16
from repro.utils.io import atomic_write_json


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as torch sees it (or as a test fabricates it)."""

    name: str
    capability: tuple[int, int]
    total_memory: int  # bytes
    index: int = 0

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


# ----------------------------------------------------------------------------------------------
# Pure decisions: testable with fabricated GPUs (the training budget runs on the CPU and `meta`)

_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")


def parse_arch(entry: str) -> Optional[tuple[str, tuple[int, int], str]]:
    """'sm_86' -> ('sm', (8, 6), ''); 'sm_90a' -> ('sm', (9, 0), 'a'); 'compute_120' -> ('compute', (12, 0), '')."""
    m = _ARCH_RE.match(entry.strip())
    if not m:
        return None
    return m.group(1), (int(m.group(2)), int(m.group(3))), m.group(4)


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch compiled for `arch_list` has kernels that run on a GPU of `capability`.

    CUDA binary compatibility: a cubin for sm_XY runs on X.Z with Z >= Y (same major);
    'a' (arch-specific) cubins run only on exactly X.Y; PTX (compute_XY) JIT-compiles for any
    newer GPU.
    """
    for entry in arch_list:
        parsed = parse_arch(entry)
        if parsed is None:
            continue
        kind, (major, minor), suffix = parsed
        if kind == "compute" and tuple(capability) >= (major, minor):
            return True
        if kind == "sm":
            if suffix == "a" and tuple(capability) == (major, minor):
                return True
            if suffix != "a" and capability[0] == major and capability[1] >= minor:
                return True
    return False


def arch_trap(gpu: GPUInfo, arch_list: list[str], *, torch_version: str = "?", cuda_version: Optional[str] = None,
              platform: str = "local") -> Optional[str]:
    """A message with the fix when the installed torch has no kernels for this GPU, else None."""
    if not arch_list or arch_supported(gpu.capability, arch_list):
        return None
    parsed = [p[1] for p in map(parse_arch, arch_list) if p is not None]
    gpu_is_older = bool(parsed) and all(cap > tuple(gpu.capability) for cap in parsed)
    head = (f"GPU {gpu.index} ({gpu.name}) is {gpu.sm} (compute capability {gpu.capability[0]}.{gpu.capability[1]}), "
            f"but the installed torch {torch_version} (CUDA {cuda_version}) has kernels only for {', '.join(arch_list)}: "
            f"every CUDA op would fail with 'no kernel image is available for execution on the device'.")
    if gpu_is_older:
        # PyTorch's CUDA 12.8+ wheels dropped Maxwell/Pascal/Volta (sm_50-sm_70); the cu126 wheels kept them.
        fix = (f" Fix: install a torch built with {gpu.sm} kernels and restart the kernel, e.g. "
               "`pip install 'torch==2.8.*' 'torchvision==0.23.*' --index-url https://download.pytorch.org/whl/cu126` "
               "(check with `python -c \"import torch; print(torch.cuda.get_arch_list())\"`)")
        if platform == "kaggle":
            fix += "; or switch the notebook to Settings > Accelerator > 'GPU T4 x2' (sm_75), which Kaggle's torch supports."
        elif platform == "colab":
            fix += "; or change the Colab runtime to a T4/L4/A100 GPU."
        else:
            fix += "."
    else:
        fix = (f" Fix: install a torch built for a newer CUDA that includes {gpu.sm}, e.g. "
               "`pip install torch torchvision --index-url https://download.pytorch.org/whl/cu128` (or newer), "
               "then restart the kernel.")
    return head + fix


def choose_precision(gpus: list[GPUInfo], bf16_runtime: Optional[bool] = None) -> tuple[str, str]:
    """(precision, why) for `auto`: bf16 with native bf16 everywhere, fp16 on older GPUs, fp32 on CPU.

    True of training only: upstream trains under `accelerate --mixed_precision bf16` but samples in
    fp32 (+TF32), so the reproduction presets set `sample.precision: fp32` and `auto` there is an opt-in.
    """
    if not gpus:
        return "fp32", "no CUDA GPU: fp32 on CPU"
    lacking = [g for g in gpus if not capability_has_bf16(g.capability)]
    if lacking or bf16_runtime is False:
        g = lacking[0] if lacking else gpus[0]
        return "fp16", (f"{g.name} ({g.sm}) has no native bf16: fp16 autocast (with a gradient scaler in training) "
                        "instead of the bf16 autocast upstream trains with")
    return "bf16", (f"native bf16 on {gpus[0].name} ({gpus[0].sm}): bf16 autocast, as upstream trains "
                    "(accelerate --mixed_precision bf16)")


def _pow2_floor(x: float) -> int:
    n = 1
    while n * 2 <= x:
        n *= 2
    return n


# Rough memory model for LightningDiT-XL/1 sampling at 256 px (16x16 latents) with the VA-VAE decoder; it only
# picks a safe power of two (step 4 probes the real free memory when the batch is left to it).
_SAMPLE_FIXED_GIB = 4.0  # weights for sampling, CUDA context, allocator slack
_SAMPLE_PER_ITEM_GIB = {"half": 0.25, "fp32": 0.5}  # one sample with its CFG twin + VAE decode


@functools.lru_cache(maxsize=None)
def _xl_block_saved(precision: str):
    from repro.config import ModelConfig
    from repro.models.cost import block_saved_fn

    return block_saved_fn(ModelConfig(), 16, precision)


def recommend_training(gpus: list[GPUInfo], precision: str, shards: int = 1) -> dict[str, Any]:
    """Micro-batch, checkpointing and EMA placement for LightningDiT-XL/1 at 256 px on the smallest GPU,
    from the computed training budget (repro.models.cost; benchmarks/bench_train.py measures it).
    `shards` > 1: train.strategy fsdp over that many processes (kit: issue 16)."""
    if not gpus:
        return {"train_micro_batch_size": 8, "train_use_checkpoint": False, "train_ema_on_cpu": False,
                "train_batch_reason": "CPU: a small micro batch"}
    from repro.config import ModelConfig
    from repro.models.cost import choose_training_layout

    gpu = min(gpus, key=lambda g: g.total_memory)
    layout = choose_training_layout(ModelConfig(), 16, gpu.total_memory, precision,
                                    block_saved=_xl_block_saved(precision), shards=shards)
    why = f"{gpu.total_memory / GiB:.1f} GiB {gpu.name}, {precision}, XL/1 at 256 px: {layout.reason}"
    return {"train_micro_batch_size": layout.micro_batch, "train_use_checkpoint": layout.checkpointing,
            "train_ema_on_cpu": layout.ema_on_cpu, "train_batch_reason": why}


def fsdp_recommendation(rec: dict[str, Any]) -> dict[str, Any]:
    """`rec` with the training plan for train.strategy fsdp (sharded over this machine's GPUs), which
    step 1 records as `train_fsdp`; an older env.json without it keeps the DDP plan (FSDP needs less)."""
    plan = rec.get("train_fsdp")
    if not isinstance(plan, dict):
        return dict(rec, train_batch_reason=f"{rec.get('train_batch_reason', '')} (the DDP plan: this environment "
                                            "report has no FSDP plan; run step 1 again for one)")
    return dict(rec, **plan)


def recommend_sampling(gpus: list[GPUInfo], precision: str) -> dict[str, Any]:
    """Per-process sampling batch for LightningDiT-XL/1 at 256 px, with a one-line reason."""
    if not gpus:
        return {"sample": 4, "sample_reason": "CPU: upstream's sampling batch 4"}
    mem_gib = min(g.total_memory for g in gpus) / GiB
    kind = "fp32" if precision == "fp32" else "half"
    sample = min(256, _pow2_floor(max(1.0, (mem_gib - _SAMPLE_FIXED_GIB) / _SAMPLE_PER_ITEM_GIB[kind])))
    return {"sample": sample, "sample_reason": f"{mem_gib:.0f} GiB GPU, {precision}, XL/1 at 256 px"}


# A 16 GB T4 (torch's total_memory on Kaggle/Colab) and an 80 GB H100: the plans printed on a machine without a
# GPU, and step 3's hardware profiles "t4" and "h100-80gb" (repro.setup.resolve.HARDWARE_PROFILES)
REFERENCE_CARDS = (GPUInfo("Tesla T4", (7, 5), 15_835_398_144), GPUInfo("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB))


def vfm_vae_plans(gpus: list[GPUInfo]) -> list[dict[str, Any]]:
    """The VFM-VAE's largest encode and decode batches (computed budget, repro.tokenizer.vfm_vae_budget) on each
    kind of card here, or on a T4 and an H100 for reference on a CPU machine."""
    from repro.tokenizer.vfm_vae_budget import plan

    if gpus:
        return [plan(name, memory) for name, memory in dict.fromkeys((g.name, g.total_memory) for g in gpus)]
    return [plan(g.name, g.total_memory, " (reference: no GPU here)") for g in REFERENCE_CARDS]


def vfm_vae_budget_lines(gpus: list[GPUInfo]) -> list[str]:
    """Step 3's VFM-VAE memory tables, for the cards `vfm_vae_plans` plans for."""
    from repro.tokenizer.vfm_vae_budget import budget_tables

    return [line for p in vfm_vae_plans(gpus) for line in budget_tables(p["card"], p["total_memory_bytes"], p)]


def sdpa_kernels(capability: Optional[tuple[int, int]], enabled: Mapping[str, bool]) -> dict[str, bool]:
    """Which scaled_dot_product_attention back-ends can run: enabled in torch and supported by the device."""
    if capability is None:  # CPU: torch has a flash-style CPU kernel and the math fallback
        return {"flash": bool(enabled.get("flash")), "mem_efficient": False, "cudnn": False,
                "math": bool(enabled.get("math"))}
    cap = tuple(capability)
    return {
        "flash": bool(enabled.get("flash")) and cap >= (8, 0),  # FlashAttention-2 kernels need sm_80+
        "mem_efficient": bool(enabled.get("mem_efficient")) and cap >= (5, 0),
        "cudnn": bool(enabled.get("cudnn")) and cap >= (8, 0),
        "math": bool(enabled.get("math")),
    }


def detect_platform(environ: Optional[Mapping[str, str]] = None, colab_importable: Optional[bool] = None) -> str:
    """'kaggle', 'colab' or 'local' from the environment variables these services set."""
    env = os.environ if environ is None else environ
    if env.get("KAGGLE_KERNEL_RUN_TYPE") or env.get("KAGGLE_URL_BASE"):
        return "kaggle"
    if "COLAB_GPU" in env or "COLAB_RELEASE_TAG" in env:
        return "colab"
    if colab_importable is None:
        try:
            colab_importable = importlib.util.find_spec("google.colab") is not None
        except (ImportError, ValueError):
            colab_importable = False
    return "colab" if colab_importable else "local"


def recommend(gpus: list[GPUInfo], bf16_runtime: Optional[bool] = None) -> dict[str, Any]:
    """The `recommended` block of env.json for these GPUs (step 3 reads it)."""
    precision, why = choose_precision(gpus, bf16_runtime)
    sampling = recommend_sampling(gpus, precision)
    ddp = recommend_training(gpus, precision)  # one GPU or none: FSDP shards nothing, the same plan
    return {"device": "cuda" if gpus else "cpu", "precision": precision, "precision_reason": why,
            "sample_per_proc_batch_size": sampling["sample"], "sample_batch_reason": sampling["sample_reason"],
            **ddp, "train_fsdp": recommend_training(gpus, precision, shards=len(gpus)) if len(gpus) > 1 else ddp}


# ----------------------------------------------------------------------------------------------
# Reading this machine


def detect_gpus() -> list[GPUInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(GPUInfo(name=p.name, capability=(p.major, p.minor), total_memory=int(p.total_memory), index=i))
    return out


def _ram() -> dict[str, Optional[int]]:
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "MemTotal" not in info:
        try:
            info["MemTotal"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return {"total_bytes": info.get("MemTotal"), "available_bytes": info.get("MemAvailable")}


def _disk(folder: Path) -> dict[str, Any]:
    probe = folder.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the outputs folder may not exist yet: measure the disk it will live on
    usage = shutil.disk_usage(probe)
    return {"path": str(folder.resolve()), "free_bytes": usage.free, "total_bytes": usage.total}


def collect_env(outputs_dir: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Everything step 1 reports, as a JSON-ready dict."""
    import torch

    # The platform, torch's CUDA build and the GPUs it sees.
    outputs = Path(outputs_dir) if outputs_dir is not None else paths.runs_dir()
    where = detect_platform()
    arch_list = list(torch.cuda.get_arch_list()) if torch.backends.cuda.is_built() else []
    gpus = detect_gpus()
    # What the runtime says about bf16 (it can refuse what the capability promises).
    bf16_runtime = None
    if gpus:
        try:
            bf16_runtime = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            bf16_runtime = bool(torch.cuda.is_bf16_supported())
        except RuntimeError:  # e.g. a GPU this torch has no kernels for
            bf16_runtime = None
    # TF32 and attention kernels as this torch is configured, and GPUs it has no kernels for.
    with warnings.catch_warnings():  # torch >= 2.9 warns that allow_tf32 is superseded by fp32_precision
        warnings.simplefilter("ignore")
        tf32 = {"capable": bool(gpus) and all(g.capability >= (8, 0) for g in gpus),
                "matmul_allowed": bool(torch.backends.cuda.matmul.allow_tf32),
                "cudnn_allowed": bool(torch.backends.cudnn.allow_tf32),
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    enabled = {"flash": torch.backends.cuda.flash_sdp_enabled(),
               "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "math": torch.backends.cuda.math_sdp_enabled(),
               "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)()}
    problems = [m for m in (arch_trap(g, arch_list, torch_version=torch.__version__, cuda_version=torch.version.cuda,
                                      platform=where) for g in gpus) if m]

    # The report (JSON-ready); `recommended` is what step 3 turns `auto` into.
    return {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": {"version": _platform.python_version(), "executable": sys.executable},
        "platform": {"kind": where, "os": _platform.platform(), "cpu_count": os.cpu_count()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "arch_list": arch_list,
                  "cuda_available": bool(gpus), "device_count": len(gpus)},
        "gpus": [{"index": g.index, "name": g.name, "capability": list(g.capability), "sm": g.sm,
                  "total_memory_bytes": g.total_memory, "native_bf16": capability_has_bf16(g.capability),
                  "tf32": g.capability >= (8, 0), "arch_supported": arch_supported(g.capability, arch_list)
                  if arch_list else None} for g in gpus],
        "bf16": {"native": bool(gpus) and all(capability_has_bf16(g.capability) for g in gpus) and bf16_runtime is not False,
                 "torch_is_bf16_supported": bf16_runtime},
        "tf32": tf32,
        "sdpa": sdpa_kernels(min((g.capability for g in gpus), default=None), enabled),
        "ram": _ram(),
        "disk": _disk(outputs),
        "recommended": recommend(gpus, bf16_runtime),
        "vfm_vae": vfm_vae_plans(gpus),
        "problems": problems,
    }


def _gib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def format_report(report: Mapping[str, Any]) -> str:
    """Human-readable lines for the notebook / terminal."""
    t, rec = report["torch"], report["recommended"]
    lines = [
        f"python     {report['python']['version']} ({report['python']['executable']})",
        f"platform   {report['platform']['kind']} ({report['platform']['os']}, {report['platform']['cpu_count']} CPUs)",
        f"torch      {t['version']}, CUDA build {t['cuda']}, GPU archs {' '.join(t['arch_list']) or '-'}",
    ]
    for g in report["gpus"]:
        lines.append(f"gpu {g['index']}      {g['name']}, {g['sm']}, {_gib(g['total_memory_bytes'])}, "
                     f"native bf16 {'yes' if g['native_bf16'] else 'no'}, TF32 {'yes' if g['tf32'] else 'no'}")
    if not report["gpus"]:
        lines.append("gpu        none (CPU only)")
    sdpa = [k for k, v in report["sdpa"].items() if v]
    lines += [
        f"bf16       native: {'yes' if report['bf16']['native'] else 'no'}; TF32 capable: "
        f"{'yes' if report['tf32']['capable'] else 'no'}",
        f"attention  SDPA kernels: {', '.join(sdpa) or 'none'}",
        f"ram        {_gib(report['ram']['total_bytes'])} total, {_gib(report['ram']['available_bytes'])} available",
        f"disk       {_gib(report['disk']['free_bytes'])} free at {report['disk']['path']}",
        f"precision  {rec['precision']} for `auto` ({rec['precision_reason']})"
        + ("; the sampling presets keep fp32 + TF32, as upstream inference.py" if rec["precision"] != "fp32" else ""),
        f"batch      sample {rec['sample_per_proc_batch_size']} per process ({rec['sample_batch_reason']}), "
        f"train micro batch {rec['train_micro_batch_size']} ({rec['train_batch_reason']})",
    ]
    lines += [f"vfm-vae    {p['line']}" for p in report.get("vfm_vae", [])]
    lines += [f"PROBLEM    {p}" for p in report["problems"]]
    return "\n".join(lines)


def write_env_json(report: Mapping[str, Any], path: Optional[str | os.PathLike] = None) -> Path:
    """Write the report (atomically) to `path` or `runs/env.json`."""
    return atomic_write_json(path if path is not None else paths.env_json(), dict(report))
