"""The kit against the upstream LightningDiT code on one device: sampling and training, same weights and noise.

    python benchmarks/compare_upstream.py --upstream ../shared/upstream/LightningDiT        # GPU: < 8 min
    python benchmarks/compare_upstream.py --upstream ../shared/upstream/LightningDiT --small  # CPU dry run

On a GPU: LightningDiT-XL/1 at 16x16x32 latents, CFG 6.7 / interval 0.125 / shift 0.3 (the FID-1.35
settings). `--small`: LightningDiT-B/2 and a few steps, to check the script itself on a CPU. Upstream's
model is imported from the given checkout (its blocks carry @torch.compile; its rmsnorm imports
fairscale: `pip install --no-deps ../shared/upstream/wheels/fairscale-0.4.13-py3-none-any.whl`, and it
needs timm and einops). Both models get the same random weights (upstream's init, perturbed so every
layer does work) and the same noise and labels. Sections (each also in the JSON, with `kit_img_s`,
`upstream_img_s`, `kit_tflops`, `batch`, `steps`, `peak_gib`):

- `sampling_tf32`: same precision (fp32 weights, TF32 matmuls: upstream inference.py) and batch; the kit
  as it runs by default (compiled with CUDA graphs, unguided rows skipped below the CFG interval).
- `sampling_default`: each as it ships: upstream's config (per-process batch 4, 250 steps) against the
  kit's FID-1.35 preset (configs/lightningdit_xl_800ep.yaml: its precision, batch chosen from free memory
  (capped at 128 here to bound the run), 250 steps).
- `sampling_bf16`: both under bf16 autocast (upstream's model is not prepared for it by inference.py;
  this is the same-precision comparison).
- `training`: one training step, bf16 autocast, micro-batch 32, AdamW + EMA, no checkpointing
  (upstream train.py's step; the kit's StepRunner through benchmarks/bench_train.py --child).

Writes benchmarks/results/compare_upstream-<device>-<date>.json and prints a table. `kit_tflops` counts
model FLOPs (repro.models.cost) of the rows the kit actually runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repro.config import load_config  # noqa: E402
from repro.models.cost import model_forward_flops  # noqa: E402
from repro.models.lightningdit import LIGHTNINGDIT_MODELS  # noqa: E402
from repro.sampling import engine  # noqa: E402
from repro.transport import model_rows_per_sample  # noqa: E402
from repro.utils import hardware  # noqa: E402

CFG_SCALE, CFG_START, SHIFT, NULL = 6.7, 0.125, 0.3, 1000


class Bench:
    def __init__(self, a):
        self.a, self.t0, self.dev = a, time.perf_counter(), hardware.default_device()
        self.small = a.small
        self.name = "LightningDiT-B/2" if a.small else "LightningDiT-XL/1"
        self.kw = dict(input_size=16, in_channels=32, num_classes=1000, use_swiglu=True, use_rope=True,
                       use_rmsnorm=True)
        self.result = {"device": torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu",
                       "torch": torch.__version__, "model": self.name, "date": datetime.date.today().isoformat()}

    # -- helpers -------------------------------------------------------------------------------

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def peak_gib(self, fn):
        hardware.reset_peak_memory(self.dev)
        out = fn()
        return out, (hardware.peak_memory(self.dev)[0] / 2**30 if self.dev.type == "cuda" else None)

    def noise(self, b, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, 32, 16, 16, generator=g), torch.randint(0, 1000, (b,), generator=g)

    def section(self, name, fn, need=0.0):
        if self.a.only and name not in self.a.only:
            return
        if time.perf_counter() - self.t0 + need > self.a.budget:
            self.result[name] = {"skipped": f"time guard at {time.perf_counter() - self.t0:.0f}s"}
            return
        print(f"== {name} (t={time.perf_counter() - self.t0:.0f}s)", flush=True)
        try:
            self.result[name] = fn()
        except Exception as e:  # keep going: one failed section must not lose the others
            self.result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        print(json.dumps({name: self.result[name]}, default=str)[:2000], flush=True)

    # -- the two models --------------------------------------------------------------------------

    def build(self):
        sys.path.insert(0, str(Path(self.a.upstream).resolve()))
        from models.lightningdit import LightningDiT_models  # upstream
        from transport import Sampler, create_transport  # upstream

        self.up_models, self.up_sampler, self.up_transport = LightningDiT_models, Sampler, create_transport
        torch.manual_seed(0)
        ref = LightningDiT_models[self.name](**self.kw)
        with torch.no_grad():  # upstream init zeroes adaLN and the output layer: perturb so all ops do work
            for n, p in ref.named_parameters():
                if n != "pos_embed":
                    p.add_(torch.randn_like(p) * 0.02)
        self.up = ref.eval().requires_grad_(False).to(self.dev)
        ours = LIGHTNINGDIT_MODELS[self.name](**self.kw)
        ours.load_state_dict(ref.state_dict(), strict=True)
        self.ours = ours.eval().requires_grad_(False).to(self.dev)
        self.flops_per_row = model_forward_flops(self.ours)
        self.result["gflop_per_row"] = self.flops_per_row / 1e9

    def upstream_sample(self, z, y, steps):
        """upstream inference.py's FID path: doubled batch, forward_with_cfg, cfg_interval=True."""
        fn = self.up_sampler(self.up_transport("Linear", "velocity", None, None, None)).sample_ode(
            sampling_method="euler", num_steps=steps, atol=1e-6, rtol=1e-3, reverse=False, timestep_shift=SHIFT)
        z, y = z.to(self.dev), y.to(self.dev)
        with torch.no_grad():
            out = fn(torch.cat([z, z]), self.up.forward_with_cfg, y=torch.cat([y, torch.full_like(y, NULL)]),
                     cfg_scale=CFG_SCALE, cfg_interval=True, cfg_interval_start=CFG_START)
        return out[-1][: len(z)]

    def kit_setup(self, precision, steps, compile=None):
        cfg = load_config(ROOT / "configs" / "lightningdit_xl_800ep.yaml")
        s = cfg.sample
        s.sampling_method, s.num_sampling_steps, s.cfg_scale = "euler", steps, CFG_SCALE
        s.cfg_interval_start, s.timestep_shift = CFG_START, SHIFT
        runner = engine.compile_for_sampling(self.ours, compile, self.dev)
        return engine.sampler_from_parts(cfg, runner, device=self.dev, precision=precision)

    def rows(self, steps):
        return model_rows_per_sample(steps, "euler", SHIFT, CFG_SCALE, CFG_START)  # (kit, upstream) per image

    def row(self, batch, steps, t_kit, t_up, peak, extra=None):
        ours, theirs = self.rows(steps)
        return {"batch": batch, "steps": steps, "kit_img_s": batch / t_kit, "upstream_img_s": batch / t_up,
                "kit_tflops": batch * ours * self.flops_per_row / t_kit / 1e12,
                "upstream_tflops": batch * theirs * self.flops_per_row / t_up / 1e12,
                "speedup": t_up / t_kit, "peak_gib": peak, **(extra or {})}

    # -- sections --------------------------------------------------------------------------------

    def env(self):
        if self.dev.type != "cuda":
            return {"bf16_matmul_tflops": None}
        n = 8192
        a, b = (torch.randn(n, n, device=self.dev, dtype=torch.bfloat16) for _ in range(2))
        a @ b
        t, _ = self.timed(lambda: [a @ b for _ in range(10)])
        self.result["bf16_matmul_tflops"] = 2 * n**3 * 10 / t / 1e12
        return {"bf16_matmul_tflops": self.result["bf16_matmul_tflops"]}

    def sampling_tf32(self):
        hardware.configure_backends(self.dev)  # TF32 on sm_80+, as upstream inference.py
        b, steps = (4, 6) if self.small else (64, 50)
        z, y = self.noise(b)
        self.upstream_sample(z, y, 3)  # upstream's @torch.compile blocks compile here
        t_up, a = self.timed(lambda: self.upstream_sample(z, y, steps))
        setup = self.kit_setup("fp32", steps)
        compile_s = engine.warm_up(setup, b)
        (t_kit, k), peak = self.peak_gib(lambda: self.timed(lambda: engine.sample_latents(setup, z, y)))
        rel = float((k.float().cpu() - a.float().cpu()).norm() / a.float().cpu().norm())
        return self.row(b, steps, t_kit, t_up, peak, {"kit_compile_s": compile_s, "rel_diff_vs_upstream": rel})

    def sampling_default(self):
        hardware.configure_backends(self.dev)
        steps = 8 if self.small else 250
        z, y = self.noise(4)
        self.upstream_sample(z, y, 3)
        t_up, _ = self.timed(lambda: self.upstream_sample(z, y, steps))
        preset = load_config(ROOT / "configs" / "lightningdit_xl_800ep.yaml")
        precision = hardware.resolve_precision(preset.sample.precision, self.dev)
        setup = self.kit_setup(precision, steps)
        kb = 4 if self.small else min(128, engine.auto_batch_size(setup, limit=128)[0])
        zk, yk = self.noise(kb, seed=2)
        compile_s = engine.warm_up(setup, kb)
        (t_kit, _), peak = self.peak_gib(lambda: self.timed(lambda: engine.sample_latents(setup, zk, yk)))
        out = self.row(kb, steps, t_kit, t_up * kb / 4, peak, {"upstream_batch": 4, "kit_precision": precision,
                                                               "kit_compile_s": compile_s})
        out["upstream_img_s"] = 4 / t_up
        out["speedup"] = out["kit_img_s"] / out["upstream_img_s"]
        out["fid50k_hours_upstream"] = 50000 / out["upstream_img_s"] / 3600
        out["fid50k_hours_kit"] = 50000 / out["kit_img_s"] / 3600
        return out

    def sampling_bf16(self):
        if self.dev.type != "cuda":
            return {"skipped": "bf16 timing needs a GPU"}
        b, steps = 64, 50
        z, y = self.noise(b, seed=3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            self.upstream_sample(z, y, 3)
            t_up, _ = self.timed(lambda: self.upstream_sample(z, y, steps))
        setup = self.kit_setup("bf16", steps)
        compile_s = engine.warm_up(setup, b)
        (t_kit, _), peak = self.peak_gib(lambda: self.timed(lambda: engine.sample_latents(setup, z, y)))
        out = self.row(b, steps, t_kit, t_up, peak, {"kit_compile_s": compile_s})
        if self.result.get("bf16_matmul_tflops"):
            out["kit_share_of_bf16_matmul_rate"] = out["kit_tflops"] / self.result["bf16_matmul_tflops"]
        return out

    def upstream_train(self, mb, steps, warm):
        from collections import OrderedDict
        from copy import deepcopy

        torch.manual_seed(0)
        model = self.up_models[self.name](**self.kw).to(self.dev).train()
        ema = deepcopy(model).requires_grad_(False)
        transport = self.up_transport("Linear", "velocity", None, None, None, use_cosine_loss=True, use_lognorm=True)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0, betas=(0.9, 0.95))
        x = torch.randn(mb, 32, 16, 16, device=self.dev)
        y = torch.randint(0, 1000, (mb,), device=self.dev)

        def step():
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
                d = transport.training_losses(model, x, dict(y=y))
                loss = d["cos_loss"].mean() + d["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # train.py's update_ema: one parameter at a time
                ep, mp = OrderedDict(ema.named_parameters()), OrderedDict(model.named_parameters())
                for n, p in mp.items():
                    ep[n].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

        for _ in range(warm):
            step()
        (t, _), peak = self.peak_gib(lambda: self.timed(lambda: [step() for _ in range(steps)]))
        del model, ema, opt
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        return t / steps, peak

    def training(self):
        mb, steps, warm = (2, 2, 1) if self.small else (32, 8, 3)
        t_up, peak_up = self.upstream_train(mb, steps, warm)
        spec = dict(device=str(self.dev), model=self.name, latent=16, micro_batch=mb,
                    precision="bf16" if self.dev.type == "cuda" else "fp32", checkpointing=False, ema_on_cpu=False,
                    channels_last=False, compile=None, steps=steps, warmup=warm)
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--child", json.dumps(spec)],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                           timeout=600)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-1500:])
        k = json.loads(p.stdout.strip().splitlines()[-1])
        flops = 3 * self.flops_per_row  # forward + backward per image
        out = {"batch": mb, "steps": steps, "kit_img_s": mb / k["seconds"], "upstream_img_s": mb / t_up,
               "kit_tflops": mb / k["seconds"] * flops / 1e12, "upstream_tflops": mb / t_up * flops / 1e12,
               "peak_gib": k["peak"] / 2**30 if self.dev.type == "cuda" else None, "upstream_peak_gib": peak_up}
        out["speedup"] = out["kit_img_s"] / out["upstream_img_s"]
        if self.result.get("bf16_matmul_tflops"):
            out["kit_share_of_bf16_matmul_rate"] = out["kit_tflops"] / self.result["bf16_matmul_tflops"]
        return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, help="path of a hustvl/LightningDiT checkout")
    p.add_argument("--small", action="store_true", help="LightningDiT-B/2, a few steps: a CPU dry run")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated section names")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON")
    a = p.parse_args(argv)
    bench = Bench(a)
    bench.build()
    bench.section("env", bench.env)
    bench.section("sampling_tf32", bench.sampling_tf32, need=60)
    bench.section("training", bench.training, need=90)
    bench.section("sampling_default", bench.sampling_default, need=120)
    bench.section("sampling_bf16", bench.sampling_bf16, need=60)
    r = bench.result
    r["total_s"] = time.perf_counter() - bench.t0
    slug = re.sub(r"[^A-Za-z0-9]+", "-", r["device"]).strip("-").lower()
    path = Path(a.out) / f"compare_upstream-{slug}-{r['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1, default=str) + "\n")
    print(f"\n{'section':<18}{'batch':>6}{'steps':>6}{'kit img/s':>11}{'upstream img/s':>16}{'speedup':>9}"
          f"{'kit TFLOP/s':>13}{'peak GiB':>10}")
    for name in ("sampling_tf32", "sampling_default", "sampling_bf16", "training"):
        s = r.get(name, {})
        if "kit_img_s" in s:
            print(f"{name:<18}{s['batch']:>6}{s['steps']:>6}{s['kit_img_s']:>11.2f}{s['upstream_img_s']:>16.2f}"
                  f"{s['speedup']:>9.2f}{s['kit_tflops']:>13.2f}"
                  f"{s['peak_gib'] if s['peak_gib'] is not None else float('nan'):>10.2f}")
        else:
            print(f"{name:<18} {s}")
    print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main()
