"""The benchmark scripts run end to end on a tiny model. They measure; these tests check that what they
print is right where it can be known independently: the work counts from the time grid and the CFG
interval, the optimised-vs-plain difference, the memory table's bytes per parameter, the T4 choice."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
XL1_PARAMS, XL1_FROZEN = 675_256_736, 256 * 1152  # LightningDiT-XL/1; pos_embed (16x16 tokens x 1152) is frozen
GiB = 2**30


def bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args, "--no-record"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    """Markdown table rows of the output: first cell -> the other cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not line.startswith("|---") and len(cells) > 2:
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_sampling_prints_the_right_work_and_a_tiny_difference_from_the_plain_path():
    steps, shift, start = 6, 0.3, 0.125
    out = bench("benchmarks/bench_sampling.py", "--model", "LightningDiT-T/1", "--latent", "4", "--batch", "2",
                "--steps", str(steps), "--repeats", "1", "--compare-plain", "--shift", str(shift),
                "--interval-start", str(start), "--cfg-scale", "4.0")
    # Euler evaluates at every grid point but the last; the unconditional half runs where t >= start
    u = np.linspace(0, 1, steps)
    times = (shift * u / (1 + (shift - 1) * u))[:-1]
    ours, plain = int(sum(2 if t >= start else 1 for t in times)), 2 * len(times)
    rows = table_rows(out)
    optimised, doubled = rows["optimised (fp32)"], rows["plain (fp32, doubled CFG)"]
    assert (optimised[3], optimised[4]) == (str(len(times)), str(ours))  # NFE/image, model rows/image
    assert (doubled[3], doubled[4]) == (str(len(times)), str(plain))
    # images/s x s/batch = the batch of 2, up to the 4 significant figures each is printed with
    assert abs(float(optimised[0]) * float(optimised[1]) - 2.0) < 2.0 * 2e-3
    assert f"work ratio {ours}/{plain} = {ours / plain:.3f}" in out
    diff = float(re.search(r"max \|diff\| ([0-9.eE+-]+)", out).group(1))
    assert diff < 1e-5, out  # the same samples up to float rounding: skipping work changed nothing


def test_bench_train_prints_the_right_memory_table_and_the_t4_budget():
    out = bench("benchmarks/bench_train.py", "--model", "LightningDiT-T/1", "--latent", "4", "--micro-batch", "2",
                "--steps", "1", "--warmup", "0", "--checkpointing", "on", "--precision", "fp32")
    row = table_rows(out)["fp32"]
    # images/s = 2 / s/step, up to the 4 significant figures each is printed with
    assert row[0] == "on" and abs(2 / float(row[1]) - float(row[2])) < 2e-3 * float(row[2])

    def gib(label: str) -> float:  # the first table line with this label (the EMA-on-GPU table)
        return float(re.search(re.escape(label) + r".*?\s([0-9.]+) GiB", out).group(1))

    trained = XL1_PARAMS - XL1_FROZEN
    assert "675.3M parameters" in out
    assert gib("weights fp32") == round(4 * XL1_PARAMS / GiB, 3)
    assert gib("gradients fp32") == round(4 * trained / GiB, 3)
    assert gib("AdamW exp_avg + exp_avg_sq fp32") == round(8 * trained / GiB, 3)
    assert gib("EMA fp32 on the GPU") == round(4 * XL1_PARAMS / GiB, 3)
    gpu_table = out.split("EMA on the GPU:")[1].split("```")[1]
    items = [float(v) for v in re.findall(r"\s([0-9.]+) GiB\n", gpu_table)]
    assert abs(sum(items[:-1]) - items[-1]) <= 0.0005 * len(items) + 1e-9  # the total is the sum of its lines, each rounded to 3 decimals
    cpu_table = out.split("(train.ema_on_cpu=true):")[1].split("```")[1]
    assert abs(float(re.findall(r"total \(allocated tensors\)\s+([0-9.]+)", cpu_table)[0])
               - (items[-1] - gib("EMA fp32 on the GPU"))) < 0.002  # the host-memory EMA saves exactly its weights
    # README: XL/1 on a 16 GB T4 trains at micro-batch 32 with checkpointing and the EMA in host memory
    assert "Step 3's choice for a T4" in out and "micro-batch 32, checkpointing on, EMA in host memory" in out
