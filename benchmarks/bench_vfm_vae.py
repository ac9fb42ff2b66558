"""VFM-VAE encode and decode: throughput (images/s) and peak memory, with the computed budget beside them.

    python benchmarks/bench_vfm_vae.py                          # CPU: tiny + small random configs (official: GPU only)
    python benchmarks/bench_vfm_vae.py --configs official --batch 32     # GPU: the official f16d32
    python benchmarks/bench_vfm_vae.py --configs official --num-fp16-res 3 --siglip-precision bf16   # GPU options
    python benchmarks/bench_vfm_vae.py --budget-only            # the official model's computed T4 / H100 table

Configurations (random seeded weights: the numbers measure speed and memory, not images):
- tiny: the parity fixture's tiny_a (tests/fixtures/reference/vfm_vae/tiny_a.json): 64 px images, 4x4x4 latents,
  a 3-layer SigLIP tower of width 32.
- small: the official layout at 256 px (512 px into the tower, 32 x 16 x 16 latents), narrow: a 4-layer SigLIP of
  width 256 and decoder channels capped at 64 (16 at 256 px), so activations are large enough to measure on a CPU.
- official: OFFICIAL_G_KWARGS with SigLIP2-Large (456M parameters); run on a GPU, skipped with a message on a CPU.

Peak memory: on a GPU `torch.cuda.max_memory_allocated` minus the memory allocated before the call (the weights
and the input batch). On a CPU the increase of the process's peak resident set (VmHWM, reset before the call)
over its size before the call, with glibc's malloc told to return every block of 64 KiB or more to the system
when it is freed (mallopt), so the resident size follows the live tensors; it includes the CPU kernels' scratch
(oneDNN), which a GPU run does not count. tracemalloc sees no torch allocation and is not used. The computed
columns are repro.tokenizer.vfm_vae_budget's activation peak (batch x the peak of one image, counted on the meta
device) with fused attention (what the GPU kernels keep: compare a GPU run with it) and with the math path
(the L x S scores materialized: a CPU takes it where its flash kernel does not apply, e.g. the decoder's
attention). CPU images/s are for ratios only (a shared 2-core machine); absolute throughput comes from a GPU.
Appends the table (and with --budget the official model's computed budget) to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results, sync  # noqa: E402
from repro.models.cost import usable_bytes  # noqa: E402
from repro.tokenizer.vfm_vae import OFFICIAL_G_KWARGS, SIGLIP2_LARGE_512, VFMVAE, parameter_count  # noqa: E402
from repro.tokenizer.vfm_vae_budget import DECODE, ENCODE, MiB, cost_of, vfm_vae_cost  # noqa: E402
from repro.utils.hardware import GiB, capability_has_bf16, default_device, describe_device  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "reference" / "vfm_vae" / "tiny_a.json"
SMALL_SIGLIP = dict(SIGLIP2_LARGE_512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4)
SMALL_G = dict(OFFICIAL_G_KWARGS, patch_from_layers=[0, 2, -1], patch_in_dimensions=[256, 256, 256],
               concat_z_mapped_dims=[64, 64, 32, 32],
               synthesis_kwargs=dict(OFFICIAL_G_KWARGS["synthesis_kwargs"], channel_base=4096, channel_max=64))
DEFAULT_BATCH = {"tiny": 8, "small": 2, "official": 32}


def architecture(name: str) -> tuple[dict, dict]:
    if name == "tiny":
        side = json.loads(FIXTURE.read_text())
        return side["g_kwargs"], side["siglip_config"]
    if name == "small":
        return SMALL_G, SMALL_SIGLIP
    return OFFICIAL_G_KWARGS, SIGLIP2_LARGE_512


def build(name: str, device: torch.device) -> VFMVAE:
    g_kwargs, siglip = architecture(name)
    torch.manual_seed(0)
    with torch.device(device):
        return VFMVAE(g_kwargs, siglip_config=siglip).eval().requires_grad_(False)


def return_freed_memory() -> str:
    """glibc: blocks >= 64 KiB from mmap and unmapped when freed (no dynamic threshold), so RSS follows tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) and libc.mallopt(-1, 0)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        return "" if ok else " (mallopt refused: RSS may keep freed blocks)"
    except OSError:
        return " (no glibc: RSS may keep freed blocks)"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def measure(model: VFMVAE, part: str, batch: int, device: torch.device, repeats: int) -> dict:
    """Best seconds of `repeats` calls after a warm-up, and the peak memory of the first (see the docstring)."""
    side = model.img_resolution
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, side, side, generator=g) * 2 - 1) if part == ENCODE else \
        torch.randn(batch, model.embed_dim, model.z_side, model.z_side, generator=g)
    x = x.to(device)
    run = (lambda: model.encode(x).mean) if part == ENCODE else (lambda: model.decode(x))
    with torch.inference_mode():
        run()  # warm-up: kernels chosen, caches filled
        best, peak, kind = float("inf"), 0, ""
        for i in range(max(1, repeats)):
            sync(device)
            if i == 0:  # the first timed call also measures the peak
                if device.type == "cuda":
                    base, kind = torch.cuda.memory_allocated(device), "GPU max allocated - before"
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                    base, kind = _status_kib("VmRSS"), "RSS peak - before"
            t = time.perf_counter()
            run()
            sync(device)
            best = min(best, time.perf_counter() - t)
            if i == 0:
                peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_kib("VmHWM")) - base
    return {"seconds": best, "peak": peak, "kind": kind}


def budget_lines() -> list[str]:
    """The official model's computed budget on a T4 and an H100, for each precision option of the loader."""
    from repro.setup import envinfo
    from repro.setup.resolve import HARDWARE_PROFILES

    cards = [HARDWARE_PROFILES["t4"][0], HARDWARE_PROFILES["h100-80gb"][0]]
    options = [(ENCODE, {}), (ENCODE, {"siglip_precision": "bf16"}), (ENCODE, {"attention": "math"}),
               (DECODE, {}), (DECODE, {"num_fp16_res": 3}), (DECODE, {"attention": "math"})]
    lines = ["Official f16d32, computed on the meta device (repro.tokenizer.vfm_vae_budget): static bytes as the kit "
             "loads it (encode: whole model, step 6; decode: generator only, steps 4/7), activation peak of one "
             "image, and the largest power-of-two batch within usable = 92% of the card - 0.5 GiB "
             f"({', '.join(f'{c.name} {usable_bytes(c.total_memory) / GiB:.2f} GiB' for c in cards)}). "
             "bf16 SigLIP2 is for bf16 cards (not a T4); fp16 blocks run on both.", "",
             "| part | loader options | weights + buffers GiB | activations MiB per image | "
             + " | ".join(f"largest batch, {c.name}" for c in cards) + " |",
             "|---|---|---|---|" + "---|" * len(cards)]
    for part, opts in options:
        cost = vfm_vae_cost(part, **opts)
        batches = [str(cost.largest_batch(c.total_memory)) if capability_has_bf16(c.capability)
                   or opts.get("siglip_precision") != "bf16" else "- (no bf16)" for c in cards]
        lines.append(f"| {part} | {cost.options} | {cost.static / GiB:.3f} | {cost.per_image / MiB:.1f} | "
                     + " | ".join(batches) + " |")
    lines += ["", "Step 3's tables (what it prints for vae.model_name vfm_vae_f16d32; on a CPU machine both cards):",
              "```", *envinfo.vfm_vae_budget_lines([]), "```"]
    return lines


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "small", "official"], choices=list(DEFAULT_BATCH))
    p.add_argument("--batch", type=int, default=None, help="images per call (default: per config)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per part after a warm-up (best is kept)")
    p.add_argument("--num-fp16-res", type=int, default=0, help="top decoder blocks in fp16 (CUDA only)")
    p.add_argument("--siglip-precision", default="fp32", choices=["fp32", "bf16"], help="SigLIP2 autocast (CUDA only)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                   help="also print the official model's computed T4 / H100 budget")
    p.add_argument("--budget-only", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device) if a.device else default_device()
    cuda = device.type == "cuda"
    opts = {"num_fp16_res": a.num_fp16_res, "siglip_precision": a.siglip_precision} if cuda else {}
    malloc_note = "" if cuda else return_freed_memory()
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"### bench_vfm_vae: encode / decode throughput and peak memory, {describe_device(device)}",
             f"{when} | torch {torch.__version__} | python benchmarks/bench_vfm_vae.py {' '.join(sys.argv[1:])} | "
             f"load average {load:.2f} ({os.cpu_count()} CPUs)", ""]
    if not a.budget_only:
        lines += ["| config | parameters | part | batch | images/s | s/batch | measured peak MiB | computed MiB, "
                  "fused / math attention | measured / computed |", "|---|---|---|---|---|---|---|---|---|"]
        skipped = []
        for name in a.configs:
            if name == "official" and not cuda:
                skipped.append("official f16d32: skipped (no GPU; its computed budget is below)")
                continue
            model = build(name, device)
            if cuda:
                model.set_fp16_blocks(a.num_fp16_res)
                if model.has_encoder:
                    model.vfm_encoder.encoder.precision = a.siglip_precision
            g_kwargs, siglip = architecture(name)
            with torch.device("meta"):
                meta = VFMVAE(g_kwargs, siglip_config=siglip)
            batch = a.batch or DEFAULT_BATCH[name]
            for part in (ENCODE, DECODE):
                fused, math = (batch * cost_of(meta, part, attention=attention, **opts).per_image
                               for attention in ("fused", "math"))
                r = measure(model, part, batch, device, a.repeats)
                precision = (f"SigLIP2 {a.siglip_precision}" if part == ENCODE else f"{a.num_fp16_res} fp16 blocks") \
                    if cuda else "fp32"
                lines.append(f"| {name} | {parameter_count(model) / 1e6:.1f}M | {part} ({precision}) | {batch} "
                             f"| {batch / r['seconds']:.4g} | {r['seconds']:.4g} | {r['peak'] / MiB:.1f} ({r['kind']}) "
                             f"| {fused / MiB:.1f} / {math / MiB:.1f} | {r['peak'] / fused:.2f} / {r['peak'] / math:.2f} |")
                print(lines[-1], flush=True)
            del model
        lines += [""] + skipped + ([f"CPU memory: glibc returns freed blocks >= 64 KiB{malloc_note}; CPU images/s "
                                    "are for ratios only."] if not cuda else [])
    if a.budget or a.budget_only:
        lines += [""] + budget_lines()
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)
    return lines


if __name__ == "__main__":
    main()
