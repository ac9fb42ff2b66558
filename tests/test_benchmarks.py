"""The benchmark scripts run end to end on a tiny model (they measure; these tests only check they work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args, "--no-record"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bench_sampling_compares_with_the_plain_path():
    out = bench("benchmarks/bench_sampling.py", "--model", "LightningDiT-T/1", "--latent", "4", "--batch", "2",
                "--steps", "6", "--repeats", "1", "--compare-plain")
    assert "plain (fp32, doubled CFG)" in out and "max" in out.lower()


def test_bench_train_measures_and_prints_the_t4_budget():
    out = bench("benchmarks/bench_train.py", "--model", "LightningDiT-T/1", "--latent", "4", "--micro-batch", "2",
                "--steps", "1", "--warmup", "0", "--checkpointing", "on", "--precision", "fp32")
    assert "| fp32 | on |" in out and "Step 3's choice for a T4" in out
