"""Pieces both benchmark scripts share: device peaks, a timed matmul, and appending to RESULTS.md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Dense tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA datasheets: (name substring, bf16/fp16, fp32)
GPU_PEAKS = [("H200", 989.0, 67.0), ("H100 PCIe", 756.0, 51.0), ("H100", 989.0, 67.0), ("A100", 312.0, 19.5),
             ("L4", 121.0, 30.3), ("T4", 65.0, 8.1), ("P100", 18.7, 9.3)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                         repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def datasheet_peak(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(dense peak FLOP/s for this GPU and precision, where it comes from), or (None, why) if unknown."""
    if device.type != "cuda":
        return None, "no datasheet for CPUs"
    name = torch.cuda.get_device_name(device)
    entry = next((e for e in GPU_PEAKS if e[0] in name), None)
    half = precision in ("bf16", "fp16")
    if entry is None:
        return None, f"{name} not in the datasheet table"
    return (entry[1] if half else entry[2]) * 1e12, f"{name} datasheet dense {'bf16/fp16' if half else 'fp32'}"


def append_results(lines: list[str]) -> None:
    with open(RESULTS, "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")
