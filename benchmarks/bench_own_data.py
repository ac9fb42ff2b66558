"""Notebook 04 end to end, timed: the own-data path (tokenizer -> evaluation -> latents -> DiT -> samples -> check).

    python benchmarks/bench_own_data.py                       # the notebook's defaults (digits, ~9 min on 2 idle cores)
    python benchmarks/bench_own_data.py -p dit_steps 300 --no-record    # any notebook parameter, not recorded
    python benchmarks/bench_own_data.py --threads 1 2         # one run per torch thread count, side by side

Runs `notebooks/04_own_data.ipynb` under papermill in a fresh work folder, then prints (and appends to
benchmarks/RESULTS.md) the wall time of each stage (the notebook's summary.json), the whole run's wall and
CPU time, the load average before and after (the machine is shared: the numbers mean little without it),
the tokenizer's PSNR / SSIM / rFID (rFID only when the Inception weights are on disk), the DiT's first and
last logged loss, and the share of samples a classifier fitted on the real images recognises beside its
held-out accuracy. The issue's target: <= 20 minutes and >= 90% recognised on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_results  # noqa: E402


def run_once(params: list[str], threads: int, keep: str | None) -> dict:
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_own_data_"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "04_own_data.ipynb"), str(out),
           "--no-progress-bar", "-p", "workdir", str(work / "w"), "-p", "threads", str(threads), *params]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"notebook 04 failed (exit {proc.returncode}); its output notebook: {out}\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "w" / "own_data" / "summary.json").read_text())
    rows = [json.loads(line) for line in (work / "w" / "own_data" / "dit" / "log.jsonl").read_text().splitlines()]
    return {"threads": threads, "wall": wall, "cpu": (cpu_after.ru_utime - cpu_before.ru_utime)
            + (cpu_after.ru_stime - cpu_before.ru_stime), "load_before": load_before, "load_after": os.getloadavg(),
            "summary": summary, "dit_first": rows[0]["loss"], "dit_last": rows[-1]["loss"], "work": str(work)}


def report(results: list[dict], params: list[str]) -> list[str]:
    import torch

    lines = [f"## bench_own_data {time.strftime('%Y-%m-%d')}: notebook 04 "
             f"{'(defaults)' if not params else ' '.join(params)}, cpu ({os.cpu_count()} cores), torch {torch.__version__}",
             "", "| torch threads | data | tokenizer | tok. eval | extract | DiT | sampling | check | whole run (wall / CPU) "
             "| load avg before -> after | PSNR / SSIM / rFID | DiT loss first -> last | recognised (classifier held-out) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, s = r["summary"]["times"], r["summary"]
        tok = s.get("tokenizer") or {}
        rfid = f"{tok['rfid']:.2f}" if tok.get("rfid") is not None else "skipped (no Inception weights)"
        stage = [f"{t.get(k, 0):.0f} s" for k in ("data", "tokenizer", "tokenizer_eval", "extract", "dit", "sampling",
                                                  "evaluation")]
        lines.append(f"| {r['threads']} | " + " | ".join(stage) + f" | {r['wall'] / 60:.1f} min / {r['cpu'] / 60:.1f} min "
                     f"| {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} | {tok.get('psnr', 0):.2f} dB / "
                     f"{tok.get('ssim', 0):.4f} / {rfid} | {r['dit_first']:.3f} -> {r['dit_last']:.3f} | "
                     f"{s.get('recognised', float('nan')):.1%} ({s.get('heldout_accuracy', float('nan')):.1%}) |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a notebook parameter")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts, one run each")
    p.add_argument("--keep", default=None, help="work folder to keep (one thread count only)")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    a = p.parse_args(argv)
    params = [x for name, value in a.p for x in ("-p", name, value)]
    results = []
    for threads in a.threads:
        results.append(run_once(params, threads, a.keep))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "summary"} | {"times": results[-1]["summary"]["times"]}),
              flush=True)
    lines = report(results, [f"{n}={v}" for n, v in a.p])
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)


if __name__ == "__main__":
    main()
