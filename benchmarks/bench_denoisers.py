"""Denoiser families in notebook 04's budget: LightningDiT + flow, UNet + DDIM, LightningDiT + DDPM (issue 23).

    python benchmarks/bench_denoisers.py                                       # 3 families x 3 sets, 15 min each
    python benchmarks/bench_denoisers.py --sets digits --combos unet-ddpm --keep /tmp/bd --no-record
    python benchmarks/bench_denoisers.py --sets digits -p time_budget_minutes 3 --no-record     # a short try

Each (combination, data set) is one headless run of `notebooks/04_own_data.ipynb` (benchmarks/bench_own_data.py's
`run_once`: the same data sets, digits, photo_patches and textured_shapes) with `-p denoiser D -p process P` on top
of the notebook's defaults: the plan times the chosen denoiser on this machine and gives it the steps that fit the
same wall budget (15 minutes for the whole notebook), so a slower family trains fewer steps, not longer. Sampling is
the notebook's: 20 images per class, cfg 3, 50 steps (Euler for flow, DDIM eta 0 for DDPM, which predicts v with the
cosine schedule: the notebook's `prediction` and `schedule` defaults; `-p prediction noise -p schedule linear` gives
lightdiff's ε and linear schedule, benchmarks/RESULTS.md says why they are not the defaults).

Reported per run: wall time, the denoiser's steps, training images/s (steps x batch 64 / its stage time), sampling
images/s (images / its stage time, guided), the share of samples the check's classifier recognises as the class
asked for vs its real held-out accuracy (overall ratio and the worst class's), load average before the run (the
machine is shared: the numbers mean little without it). Appends the table to benchmarks/RESULTS.md unless
--no-record. The issue's bar: every family >= 90% recognised within the default budget on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_own_data import SETS, run_once  # noqa: E402
from common import append_results  # noqa: E402
from repro.setup.own_data_plan import DIT_BATCH as BATCH  # noqa: E402  the plan's denoiser batch

COMBOS = {"dit-flow": ("dit", "flow"), "unet-ddpm": ("unet", "ddpm"), "dit-ddpm": ("dit", "ddpm"),
          "unet-flow": ("unet", "flow")}


def row(combo: str, result: dict) -> dict:
    import numpy as np

    s, plan = result["summary"], result["plan"]
    check, times = s.get("check") or {}, s["times"]
    samples = 0
    if s.get("samples_npz"):
        with np.load(s["samples_npz"]) as f:
            samples = len(f["arr_1"])
    return {"combo": combo, "set": result["set"], "wall": result["wall"], "load": result["load_before"][0],
            "steps": plan["dit_steps"], "threads": plan.get("threads"),
            "train_ips": plan["dit_steps"] * BATCH / times["dit"] if "dit" in times else None,
            "sample_ips": samples / times["sampling"] if "sampling" in times else None,
            "recognised": check.get("recognised"), "heldout": check.get("heldout_accuracy"),
            "ratio": check.get("ratio"), "worst": check.get("worst_ratio")}


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report(rows: list[dict], params: list[str]) -> list[str]:
    import torch

    lines = [f"## bench_denoisers {time.strftime('%Y-%m-%d %H:%M')}: notebook 04 "
             f"{' '.join(params) or '(defaults)'} per family, cpu ({os.cpu_count()} cores), "
             f"torch {torch.__version__}", "",
             "| set | combination | wall (min) | load avg before | torch threads | denoiser steps | training img/s | "
             "sampling img/s | recognised: samples / real held-out (ratio) | worst class ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = "-" if r["recognised"] is None else f"{r['recognised']:.1%} / {r['heldout']:.1%} ({r['ratio']:.2f})"
        lines.append(f"| {r['set']} | {r['combo']} | {r['wall'] / 60:.1f} | {r['load']:.1f} | "
                     f"{r.get('threads') or '-'} | {r['steps']} | "
                     f"{_num(r['train_ips'], '.0f')} | {_num(r['sample_ips'], '.1f')} | {rec} | "
                     f"{_num(r['worst'], '.2f')} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS, help="data sets (bench_own_data's)")
    p.add_argument("--combos", nargs="+", default=["dit-flow", "unet-ddpm", "dit-ddpm"], choices=sorted(COMBOS))
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="another notebook parameter, for every run")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the notebook (its `threads`; 0, its default: the plan times and chooses)")
    p.add_argument("--keep", default=None, help="work folder to keep (one sub-folder per combination and set)")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    a = p.parse_args(argv)
    extra = [x for name, value in a.p for x in ("-p", name, value)]
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_denoisers_"))
    rows = []
    for combo in a.combos:
        denoiser, process = COMBOS[combo]
        for name in a.sets:
            params = ["-p", "denoiser", denoiser, "-p", "process", process, *extra]
            rows.append(row(combo, run_once(name, params, a.threads, root / combo / name)))
            print(json.dumps(rows[-1]), flush=True)
    lines = report(rows, [f"{n}={v}" for n, v in a.p])
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)
    return rows


if __name__ == "__main__":
    main()
