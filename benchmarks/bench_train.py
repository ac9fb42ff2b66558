"""Training speed and memory: step time, images/s, peak memory and MFU, plus the XL/1-on-a-T4 budget.

    python benchmarks/bench_train.py                                  # CPU default: B/2, 16x16 latents, micro-batch 8
    python benchmarks/bench_train.py --model LightningDiT-XL/1 --micro-batch 8 --precision fp16 --checkpointing on
    python benchmarks/bench_train.py --model LightningDiT-XL/1 --micro-batch 64 --precision bf16   # H100/H200
    python benchmarks/bench_train.py --budget-only                    # only the XL/1 memory budget

Every configuration runs the kit's training step (repro.training.StepRunner: autocast, gradient scaler
for fp16, AdamW (fused on CUDA), EMA update, optional per-block gradient checkpointing) on random
latents in a fresh child process, so each peak is its own: on CUDA `max_memory_allocated`, on CPU the
peak resident set size minus the size before the model was built. A checkpointing row with fp16 at
the same micro-batch is always added ("T4 settings"), and the computed budget for the same settings
is printed beside it, so the budget's model is checked against a measurement on any machine.

FLOPs: analytic forward FLOPs (repro.models.cost.forward_flops, equal to torch's FlopCounterMode);
a step is 3 forwards (MFU) and 4 with checkpointing, which recomputes the forward (HFU). Device peak:
on CPU the measured rate of a large fp32 matmul; on GPU the datasheet dense bf16/fp16 (or fp32) peak.
Prints a table and appends it to benchmarks/RESULTS.md with the device, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results, datasheet_peak, measured_matmul_rate  # noqa: E402
from repro.config import load_config  # noqa: E402
from repro.models.cost import GiB, choose_training_layout, step_flops, training_memory_budget  # noqa: E402
from repro.setup.resolve import HARDWARE_PROFILES  # noqa: E402
from repro.utils.hardware import describe_device, peak_memory  # noqa: E402


def model_cfg(name: str, checkpointing: bool):
    cfg = load_config("configs/train/lightningdit_xl_800ep_stage_0.yaml" if (ROOT / "configs").is_dir() else None)
    cfg.model.model_type = name
    cfg.model.use_checkpoint = checkpointing
    return cfg


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process: build, warm up, time, measure peak memory."""
    from repro.training.data_order import MicroBatch
    from repro.training.ema import EMA
    from repro.training.batches import BatchPlan
    from repro.utils.hardware import CompiledOrEager, compile_mode, make_scaler
    from repro.training.step import StepRunner, make_optimizer, take_over_label_dropout
    from repro.models.lightningdit import build_model

    device = torch.device(spec["device"])
    cfg = model_cfg(spec["model"], spec["checkpointing"])
    cfg.train.ema_on_cpu = spec["ema_on_cpu"]
    m, latent = spec["micro_batch"], spec["latent"]
    base = rss_bytes() if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, latent, 1000).to(device)
    ema = EMA(model, 0.9999, on_cpu=spec["ema_on_cpu"])
    take_over_label_dropout(model)
    opt = make_optimizer(model, cfg.optimizer, device)
    scaler = make_scaler(device, spec["precision"])
    mode = compile_mode(spec["compile"], device, auto="default")  # None = the kit's default (compiled on CUDA)
    fwd = CompiledOrEager(model, mode, "training") if mode else model
    runner = StepRunner(model, fwd, opt, scaler, ema, BatchPlan(m, m, 1, 1), cfg, precision=spec["precision"],
                        device=device, channels_last=spec["channels_last"])
    g = torch.Generator().manual_seed(0)
    batch = MicroBatch(torch.randn(m, 32, latent, latent, generator=g), torch.randint(0, 1000, (m,), generator=g),
                       torch.rand(m, generator=g), torch.randn(m, 32, latent, latent, generator=g))

    # AdamW allocates its moments at the first step it takes; an fp16 run skips its first steps while the
    # gradient scaler finds its scale, so allocate them now (a zero-gradient step changes no weight)
    for p_ in model.parameters():
        p_.grad = torch.zeros_like(p_) if p_.requires_grad else None
    opt.step()
    opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        float(runner.sums[0])

    for i in range(spec["warmup"]):
        runner.step(i + 1, [batch])
    sync()
    t0 = time.perf_counter()
    for i in range(spec["steps"]):
        runner.step(spec["warmup"] + i + 1, [batch])
    sync()
    seconds = (time.perf_counter() - t0) / spec["steps"]
    peak, _ = peak_memory(device)  # GPU max allocated, or the process's peak RSS on CPU
    return {"seconds": seconds, "peak": peak - base, "peak_kind": "allocated" if device.type == "cuda" else "RSS"}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed for {spec}:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def t4_budget_lines() -> list[str]:
    xl = model_cfg("LightningDiT-XL/1", True).model
    lines = ["", "XL/1 training memory on one 16 GB T4 (micro-batch 8, fp16 + gradient scaler, checkpointing "
                 "per block, fused AdamW), computed (activations of one block measured on the CPU):"]
    for on_cpu in (False, True):
        b = training_memory_budget(xl, 16, 8, "fp16", True, ema_on_device=not on_cpu)
        lines += ["", f"EMA {'on the CPU (train.ema_on_cpu=true)' if on_cpu else 'on the GPU'}:", "```",
                  b.table(limit_gib=15e9 / GiB), "```"]  # issue 7's target: <= 15 GB
    on_gpu = training_memory_budget(xl, 16, 8, "fp16", True)
    no = training_memory_budget(xl, 16, 8, "fp16", False)
    foreach = training_memory_budget(xl, 16, 8, "fp16", True, fused_adam=False)
    lines.append(f"Without checkpointing: {no.total / GiB:.2f} GiB. Foreach instead of fused AdamW: "
                 f"+{(foreach.total - on_gpu.total) / GiB:.2f} GiB of temporaries.")
    t4 = HARDWARE_PROFILES["t4"][0]
    pick = choose_training_layout(xl, 16, t4.total_memory, "fp16")
    lines.append(f"Step 3's choice for a T4 ({t4.total_memory / GiB:.2f} GiB card, `--profile t4`): micro-batch "
                 f"{pick.micro_batch}, checkpointing {'on' if pick.checkpointing else 'off'}, EMA "
                 f"{'in host memory' if pick.ema_on_cpu else 'on the GPU'} ({pick.reason}).")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="LightningDiT-B/2")
    p.add_argument("--latent", type=int, default=16, help="latent side (16 = 256 px with the f16 VA-VAE)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    p.add_argument("--ema-on-cpu", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="feed latents in channels-last layout")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-t4-row", action="store_true", help="skip the fp16 + checkpointing row")
    p.add_argument("--budget-only", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return {}
    if a.budget_only:
        print("\n".join(t4_budget_lines()))
        return {}

    from repro.utils.hardware import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(a.precision, device)
    if device.type == "cpu":
        peak_rate, peak_src = measured_matmul_rate(device, n=2048), "measured 2048^3 fp32 matmul"
    else:
        peak_rate, peak_src = datasheet_peak(device, precision)
        if peak_rate is None:
            half = precision in ("bf16", "fp16")
            peak_rate = measured_matmul_rate(device, torch.bfloat16 if half else torch.float32, n=8192)
            peak_src = f"measured matmul ({peak_src})"
    configs = [(precision, c) for c in ({"off": [False], "on": [True], "both": [False, True]}[a.checkpointing])]
    if not a.no_t4_row and ("fp16", True) not in configs:
        configs.append(("fp16", True))
    rows = []
    for prec, ckpt in configs:
        emulated = prec == "fp16" and device.type == "cpu"  # no fp16 matmul units: a memory row, timed once
        spec = dict(device=str(device), model=a.model, latent=a.latent, micro_batch=a.micro_batch, precision=prec,
                    checkpointing=ckpt, ema_on_cpu=a.ema_on_cpu, channels_last=a.channels_last, compile=a.compile,
                    steps=1 if emulated else a.steps, warmup=1 if emulated else a.warmup)
        r = run_child(spec)
        mcfg = model_cfg(a.model, ckpt).model
        fl = step_flops(mcfg, a.latent, a.micro_batch, ckpt)
        budget = training_memory_budget(mcfg, a.latent, a.micro_batch, prec, ckpt,
                                        ema_on_device=not a.ema_on_cpu or device.type == "cpu")
        rows.append(dict(precision=prec + (" (emulated on CPU)" if emulated else ""), ckpt=ckpt, seconds=r["seconds"], ips=a.micro_batch / r["seconds"],
                         peak=r["peak"], kind=r["peak_kind"], budget=budget.total,
                         mfu=100 * fl["model"] / r["seconds"] / peak_rate,
                         hfu=100 * fl["hardware"] / r["seconds"] / peak_rate, gflops=fl["model"] / r["seconds"] / 1e9))
        print(f"  done: {prec}, checkpointing {'on' if ckpt else 'off'}: {r['seconds']:.3f} s/step", flush=True)

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    fwd = step_flops(model_cfg(a.model, False).model, a.latent, 1, False)["forward"]
    lines = [f"### bench_train: {a.model} @ {a.latent}x{a.latent} latents, micro-batch {a.micro_batch}"
             f"{', EMA on CPU' if a.ema_on_cpu else ''}{', channels-last' if a.channels_last else ''}"
             f"{', compile' if a.compile else ''}",
             f"{when} | {describe_device(device)} | torch {torch.__version__} | python benchmarks/bench_train.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}", "",
             f"forward {fwd / 1e9:.2f} GFLOP/image; device peak {peak_rate / 1e12:.3f} TFLOP/s ({peak_src})", "",
             "| precision | checkpointing | s/step | images/s | model GFLOP/s | MFU % | HFU % | peak mem GiB | "
             "computed budget GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {'on' if r['ckpt'] else 'off'} | {r['seconds']:.4g} | {r['ips']:.4g} | "
                     f"{r['gflops']:.1f} | {r['mfu']:.1f} | {r['hfu']:.1f} | {r['peak'] / GiB:.3f} ({r['kind']}) | "
                     f"{r['budget'] / GiB:.3f} |")
    lines += t4_budget_lines()
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)
    return {"rows": rows}


if __name__ == "__main__":
    main()
