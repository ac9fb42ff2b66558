"""Sampling speed and memory: images/s, NFE per image, peak memory, model FLOP utilisation (MFU).

    python benchmarks/bench_sampling.py                                   # CPU default: B/2, 16x16 latents, 20 steps
    python benchmarks/bench_sampling.py --compare-plain --steps 20        # + the unoptimised upstream-style path
    python benchmarks/bench_sampling.py --model LightningDiT-XL/1 --batch 64 --steps 250 --compare-plain   # GPU
    python benchmarks/bench_sampling.py --decode --vae-ch 128             # + VA-VAE decode and PNG writer

Prints a table and appends it to benchmarks/RESULTS.md with the device, torch version and date.
Weights are random (seeded, non-zero), so the numbers measure speed, not image quality.

- optimised: the kit's path (repro.sampling.sample_latents): autocast in --precision, the
  unconditional half run only where guidance is on (repro.transport), optional torch.compile.
- plain (--compare-plain): upstream's path: fp32, no autocast, every call runs the doubled CFG
  batch (inference.py + forward_with_cfg, which reads t[0] on the host each call).
  Reported: time ratio, work ratio (model rows run / rows the plain path runs) and max |difference|.
- FLOPs are counted from the model: 2 x (per-token weights) x tokens + 2 x (per-row weights: adaLN,
  timestep MLP) + attention 4 x tokens^2 x hidden per layer, per model row. Device peak: on CPU the
  measured rate of a large fp32 matmul; on GPU the vendor's dense bf16/fp16 figure (table below)
  and the measured matmul rate.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results, datasheet_peak, measured_matmul_rate, sync  # noqa: E402
from repro.config import Config  # noqa: E402
from repro.models.cost import model_forward_flops  # noqa: E402
from repro.models.lightningdit import create_model  # noqa: E402
from repro.sampling import engine as gen  # noqa: E402
from repro.utils import hardware  # noqa: E402
from repro.transport import combine_cfg, guidance_active, model_rows_per_sample, sample_ode  # noqa: E402


def build(name: str, latent: int, num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, input_size=latent, in_channels=32, num_classes=num_classes,
                         use_swiglu=True, use_rope=True, use_rmsnorm=True)
    with torch.no_grad():  # upstream init zeroes adaLN/output layers: perturb so every op does real work
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval().requires_grad_(False)


def reset_peak(device: torch.device) -> None:
    hardware.reset_peak_memory(device)
    if device.type == "cpu":
        try:  # Linux: "5" resets VmHWM, so each path's peak is its own
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


class PlainCFG(torch.nn.Module):
    """Upstream's unoptimised call: always the doubled batch, guidance decided from t[0] on the host."""

    def __init__(self, model, y_null: int, scale: float, start: float, channels):
        super().__init__()
        self.model, self.y_null, self.scale, self.start, self.channels = model, y_null, scale, start, channels

    def forward(self, x, t, y):
        if self.scale <= 1.0:
            return self.model(x, t, y)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.y_null)]))
        cond, uncond = out.chunk(2)
        if not guidance_active(float(t[0]), self.scale, self.start):
            return cond
        return combine_cfg(cond, uncond, self.scale, self.channels)


def run_paths(paths, device, repeats):
    """Time each (label, fn) `repeats` times, interleaved (A B A B ...) so that load from other
    processes on a shared machine hits every path alike; keep each path's best time and peak memory."""
    res = [{"label": label, "seconds": float("inf"), "cpu_seconds": float("inf"), "out": None, "stats": {},
            "peak": 0, "peak_kind": ""} for label, _ in paths]
    for _ in range(repeats):
        for r, (_, fn) in zip(res, paths):
            reset_peak(device)
            stats: dict = {}
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            r["out"] = fn(stats)
            sync(device)
            r["seconds"] = min(r["seconds"], time.perf_counter() - t)
            # CPU seconds of this process (all threads): barely moved by other jobs on a shared machine
            r["cpu_seconds"] = min(r["cpu_seconds"], time.process_time() - c)
            peak, r["peak_kind"] = hardware.peak_memory(device)
            r["peak"], r["stats"] = max(r["peak"], peak), stats
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="LightningDiT-B/2")
    p.add_argument("--latent", type=int, default=16, help="latent side (16 = 256 px with the f16 VA-VAE)")
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--method", default="euler")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=6.7)
    p.add_argument("--interval-start", type=float, default=0.125)
    p.add_argument("--shift", type=float, default=0.3)
    p.add_argument("--cfg-channels", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path (best is kept)")
    p.add_argument("--compare-plain", action="store_true")
    p.add_argument("--compile", nargs="?", const="default")
    p.add_argument("--decode", action="store_true", help="also time VA-VAE decode + PNG writing (background)")
    p.add_argument("--vae-ch", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device) if a.device else hardware.default_device()
    precision = hardware.resolve_precision(a.precision, device, "--precision")
    hardware.configure_backends(device)
    model = build(a.model, a.latent).to(device)
    cfg = Config()
    s = cfg.sample
    s.sampling_method, s.num_sampling_steps, s.cfg_scale = a.method, a.steps, a.cfg_scale
    s.cfg_interval_start, s.timestep_shift, s.cfg_channels = a.interval_start, a.shift, a.cfg_channels
    runner = gen.compile_for_sampling(model, a.compile, device)
    setup = gen.SamplerSetup(cfg=cfg, model=runner, eager_model=model, vae=None, mean=torch.zeros(1, 32, 1, 1, device=device),
                             std=torch.ones(1, 32, 1, 1, device=device), device=device, precision=precision,
                             vae_precision="fp32", latent_shape=(32, a.latent, a.latent), num_classes=1000)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(a.batch, 32, a.latent, a.latent, generator=g)
    y = torch.randint(0, 1000, (a.batch,), generator=g)

    paths = [(f"optimised ({precision})", lambda st: gen.sample_latents(setup, z, y, st))]
    if a.compare_plain:
        plain = PlainCFG(model, 1000, a.cfg_scale, a.interval_start, a.cfg_channels)

        def plain_fn(st):
            with torch.inference_mode():
                return sample_ode(plain, z.to(device), y.to(device), method=a.method, num_steps=a.steps,
                                  timestep_shift=a.shift, cfg_scale=1.0, stats=st)
        paths.append(("plain (fp32, doubled CFG)", plain_fn))
    if a.decode:
        paths.append(decode_path(a, setup, z, y, device))
    for rows in (a.batch, 2 * a.batch):  # warm-up at the timed shapes (oneDNN primitives, compilation)
        zz = torch.zeros(rows, 32, a.latent, a.latent, device=device)
        tt, yy = torch.zeros(rows, device=device), torch.zeros(rows, dtype=torch.int64, device=device)
        with torch.inference_mode():
            model(zz, tt, yy)
            with hardware.autocast(device, precision):
                runner(zz, tt, yy)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rate_before = measured_matmul_rate(device, hardware.DTYPES[precision] if device.type == "cuda" else torch.float32,
                                       n=8192 if device.type == "cuda" else 2048)
    results = run_paths(paths, device, a.repeats)
    rate_after = measured_matmul_rate(device, hardware.DTYPES[precision] if device.type == "cuda" else torch.float32,
                                      n=8192 if device.type == "cuda" else 2048)
    matmul_rate = max(rate_before, rate_after)  # the best of two, taken around the timed runs

    ours, theirs = model_rows_per_sample(a.steps, a.method, a.shift, a.cfg_scale, a.interval_start)
    per_row = model_forward_flops(model)
    if device.type == "cpu":
        peak_rate, peak_src = matmul_rate, "measured fp32 matmul 2048^3, best of before/after"
    else:
        peak_rate, peak_src = datasheet_peak(device, precision)
        if peak_rate is None:
            peak_rate, peak_src = matmul_rate, f"measured matmul ({peak_src})"
    rows = []
    for r in results:
        nfe = r["stats"].get("nfe", 0)
        model_rows = r["stats"].get("model_rows", 0)
        if "plain" in r["label"] and a.cfg_scale > 1:
            model_rows *= 2  # the wrapper doubles every call itself
        rate = model_rows * per_row / r["seconds"] if model_rows else 0.0
        rows.append((r["label"], a.batch / r["seconds"], r["seconds"], r["cpu_seconds"], nfe, model_rows / a.batch,
                     r["peak"] / 2**30, rate / 1e9, 100 * rate / peak_rate, r["peak_kind"]))
    load = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    lines = format_table(a, device, precision, rows, per_row, peak_rate, peak_src, matmul_rate, ours, theirs, results,
                         load)
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)
    return {"rows": rows, "work_ratio": ours / theirs}


def decode_path(a, setup, z, y, device):
    from repro.sampling.writer import ImageWriter
    from repro.tokenizer.vavae import AutoencoderKL

    torch.manual_seed(1)
    setup.vae = AutoencoderKL(ch=a.vae_ch).eval().requires_grad_(False).to(device)
    folder = Path(tempfile.mkdtemp(prefix="bench_png_"))

    def fn(st):
        with ImageWriter(lambda x: gen.decode_to_uint8(setup, x)) as w:
            w.submit(gen.sample_latents(setup, z, y, st), [folder / f"{i:06d}.png" for i in range(a.batch)])
    return ("optimised + decode + PNG", fn)


def format_table(a, device, precision, rows, per_row, peak_rate, peak_src, matmul_rate, ours, theirs, results,
                 load):
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    dev = hardware.describe_device(device)
    lines = [f"### bench_sampling: {a.model} @ {a.latent}x{a.latent} latents, batch {a.batch}, {a.method} "
             f"{a.steps} steps, cfg {a.cfg_scale} (interval {a.interval_start}, channels {a.cfg_channels}), "
             f"shift {a.shift}, {precision}{', compile ' + a.compile if a.compile else ''}",
             f"{when} | {dev} | torch {torch.__version__} | python benchmarks/bench_sampling.py "
             f"{' '.join(sys.argv[1:])} | load average {load[0]:.2f} before, {load[1]:.2f} after "
             f"({os.cpu_count()} CPUs)", "",
             f"model FLOPs per row {per_row / 1e9:.2f} GFLOP; device peak {peak_rate / 1e12:.3f} TFLOP/s ({peak_src}); "
             f"measured matmul {matmul_rate / 1e12:.3f} TFLOP/s", "",
             "| path | images/s | s/batch | process CPU s/batch | NFE/image | model rows/image | peak mem GiB "
             "| model GFLOP/s | MFU % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, ips, sec, cpu, nfe, rpi, mem, gfl, mfu, kind in rows:
        lines.append(f"| {label} | {ips:.4g} | {sec:.4g} | {cpu:.3f} | {nfe} | {rpi:g} | {mem:.2f} ({kind}) "
                     f"| {gfl:.1f} | {mfu:.1f} |")
    if a.compare_plain:
        opt, plain = results[0], results[1]
        diff = (opt["out"].float().cpu() - plain["out"].float().cpu()).abs().max().item()
        t_ratio = opt["seconds"] / plain["seconds"]
        c_ratio = opt["cpu_seconds"] / plain["cpu_seconds"]
        w_ratio = ours / theirs
        lines += ["", f"time ratio optimised/plain {t_ratio:.3f} (wall), {c_ratio:.3f} (process CPU time); "
                      f"work ratio {ours}/{theirs} = {w_ratio:.3f}; time/work {t_ratio / w_ratio:.3f} (wall), "
                      f"{c_ratio / w_ratio:.3f} (CPU time) (target <= 1.05); max |diff| {diff:.2e}"]
    return lines


if __name__ == "__main__":
    main()
