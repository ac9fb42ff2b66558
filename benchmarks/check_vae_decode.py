"""Does a half-precision VA-VAE decode keep the images within +-1 level of the fp32 decode?

    python benchmarks/check_vae_decode.py --config runs/configs/lightningdit_xl_800ep.resolved.yaml
    python benchmarks/check_vae_decode.py --config CFG --precision fp16 --num 64 --batch 16

Issue 7 asks for the VA-VAE decode "in the precision that keeps images within +-1 level of fp32".
The answer depends on the real weights, so this check needs the real files (steps 2 and 3 done): it
samples `--num` latents with the config's LightningDiT and sampler (as step 4 does, seeded), decodes
them once in fp32 and once in `--precision` under autocast, and reports the largest level difference,
the share of pixel values that differ by more than one level, and the decode time of each. The kit
decodes in fp32 (`vae.precision: fp32`) until this check, run on a GPU with the real weights, passes;
then `--set vae.precision=auto` is safe. Appends its table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results, sync  # noqa: E402
from repro.config import load_config  # noqa: E402
from repro.sampling import engine as gen  # noqa: E402
from repro.utils import hardware  # noqa: E402


def compare_levels(ref: np.ndarray, other: np.ndarray) -> dict:
    """Level differences between two uint8 image batches of the same shape."""
    d = np.abs(ref.astype(np.int16) - other.astype(np.int16))
    return {"max_level_diff": int(d.max()), "frac_over_1": float((d > 1).mean()), "mean_abs": float(d.mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a resolved config (step 3) with the real files")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16"],
                   help="the decode precision to check (auto: bf16 where native, else fp16)")
    p.add_argument("--num", type=int, default=32, help="images to sample and decode")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args(argv)

    cfg = load_config(a.config)
    setup = gen.build_sampler(cfg, device=a.device)
    half = hardware.resolve_precision(a.precision, setup.device, "--precision")
    if half == "fp32":  # 'auto' on a CPU
        half = "bf16"
    g = torch.Generator().manual_seed(a.seed)
    c, h, w = setup.latent_shape
    latents = []
    for start in range(0, a.num, a.batch):
        n = min(a.batch, a.num - start)
        z = torch.randn(n, c, h, w, generator=g)
        y = torch.randint(0, setup.num_classes, (n,), generator=g)
        latents.append(gen.sample_latents(setup, z, y))
    x = torch.cat(latents)

    images, seconds = {}, {}
    for prec in ("fp32", half):
        setup.vae_precision = prec
        gen.decode_to_uint8(setup, x[: min(len(x), gen.DECODE_CHUNK)])  # warm-up (kernels, autotuning)
        sync(setup.device)
        t = time.perf_counter()
        images[prec] = gen.decode_to_uint8(setup, x)
        sync(setup.device)
        seconds[prec] = time.perf_counter() - t
    diff = compare_levels(images["fp32"], images[half])
    verdict = "within +-1 level" if diff["max_level_diff"] <= 1 else "NOT within +-1 level: keep vae.precision=fp32"

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"### check_vae_decode: {half} vs fp32 VA-VAE decode, {len(x)} images",
             f"{when} | {hardware.describe_device(setup.device)} | torch {torch.__version__} | python "
             f"benchmarks/check_vae_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}", "",
             f"transformer {setup.precision}; vae {Path(cfg.vae.ckpt_path).name}", "",
             "| decode | seconds | images/s | max level diff | share > 1 level | mean abs diff |",
             "|---|---|---|---|---|---|",
             f"| fp32 | {seconds['fp32']:.3f} | {len(x) / seconds['fp32']:.1f} | 0 | 0 | 0 |",
             f"| {half} | {seconds[half]:.3f} | {len(x) / seconds[half]:.1f} | {diff['max_level_diff']} | "
             f"{diff['frac_over_1']:.2e} | {diff['mean_abs']:.4f} |", "", f"-> {verdict}"]
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)
    return {"precision": half, "seconds": seconds, **diff, "ok": diff["max_level_diff"] <= 1}


if __name__ == "__main__":
    main()
