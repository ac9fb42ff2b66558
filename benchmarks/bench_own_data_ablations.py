"""What limits notebook 04's quality on colour images? Tokenizer ablations at a fixed number of steps.

    python benchmarks/bench_own_data_ablations.py                       # every variant, photo_patches, 300 steps
    python benchmarks/bench_own_data_ablations.py --set textured_shapes --steps 600 --only base c8_fast
    python benchmarks/bench_own_data_ablations.py --no-record

Trains step 9 on a sample set (`repro.data.sample_sets`) once per variant (a list of `--set` overrides on the
`tokenizer/digits_f4` preset at 32 px), evaluates it with step 10 on the set's held-out images, and prints
(and appends to benchmarks/RESULTS.md) PSNR / SSIM, the training wall time and the load average before and
after. The DiT side is ablated with bench_own_data.py's `-p tokenizer_steps N -p dit_steps M` (the same
notebook, a different split of the time). One torch thread: the machine is shared.
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
from common import append_results  # noqa: E402

VARIANTS = {
    "base": [],  # f4, 4 latent channels, L1 + KL, lr 1e-3, betas (0.5, 0.9), batch 32: the old default
    "c8": ["model.z_channels=8", "model.embed_dim=8"],  # twice the latent channels
    "f2": ["model.ch_mult=[1,2]"],  # 16x16x4 latents (the DiT then sees 4x the tokens)
    "c8_fast": ["model.z_channels=8", "model.embed_dim=8", "train.lr=2e-3", "train.beta1=0.9",
                "train.global_batch_size=16"],  # c8, faster optimiser, batch 16 (twice the steps per image seen)
    "f2_fast": ["model.ch_mult=[1,2]", "train.lr=2e-3", "train.beta1=0.9",
                "train.global_batch_size=16"],  # f2 (16x16x4 latents) with c8_fast's optimiser and batch
    "c8_gan": ["model.z_channels=8", "model.embed_dim=8", "loss.disc_start=STEPS60", "loss.disc_num_layers=2"],
}


def run_variant(name: str, overrides: list[str], data: dict, steps: int, out: Path) -> dict:
    from steps import step9_train_tokenizer, step10_evaluate_tokenizer

    overrides = [o.replace("STEPS60", str(int(0.6 * steps))) for o in overrides]
    batch = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.global_batch_size=")), 32)
    steps = steps * 32 // batch  # the same number of images seen
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    tok = step9_train_tokenizer.main(config="tokenizer/digits_f4", set=[
        f"data.image_folder={data['folder']}", "data.image_size=32", f"train.max_steps={steps}",
        f"train.warmup_steps={max(10, steps // 20)}", f"train.output_dir={out}", f"train.exp_name={name}",
        "train.log_every=100", *overrides])
    wall = time.perf_counter() - t0
    ev = step10_evaluate_tokenizer.main(tokenizer=tok["tokenizer"], folder=data["held_out"], out=str(out / f"{name}_eval"))
    return {"variant": name, "steps": steps, "overrides": overrides, "train_s": wall, "psnr": ev["psnr"],
            "ssim": ev["ssim"], "load_before": load_before[0], "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    import torch

    from repro.data.sample_sets import SETS, make_sample_set

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", default="photo_patches", choices=sorted(SETS))
    p.add_argument("--steps", type=int, default=300, help="steps at batch 32 (smaller batches: as many images seen)")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_ablate_"))
    data = make_sample_set(a.set, root / "data")
    rows = []
    for name in a.only:
        rows.append(run_variant(name, VARIANTS[name], data, a.steps, root / "runs"))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"## bench_own_data_ablations {time.strftime('%Y-%m-%d %H:%M')}: tokenizer variants on {a.set}, "
             f"{a.steps} steps of 32 (as many images seen), 32 px, 1 torch thread, torch {torch.__version__}", "",
             "| variant | overrides | steps | train wall (s) | load before -> after | PSNR dB | SSIM |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['steps']} | {r['train_s']:.0f} | "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in rows]
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)


if __name__ == "__main__":
    main()
