"""How far does half-precision sampling move the latents from upstream's fp32 (+TF32) sampling?

    python benchmarks/check_sample_precision.py                       # CPU: the upstream-seeded fixture model
    python benchmarks/check_sample_precision.py --config runs/configs/lightningdit_xl_800ep.resolved.yaml

Upstream inference.py never autocasts: the DiT samples in fp32 (TF32 matmuls on sm_80+). The kit's
presets do the same (`sample.precision: fp32`); `auto` / `bf16` / `fp16` are faster opt-ins. This
script samples the same seeded noise and labels once in fp32 and once under each half precision
autocast and reports the relative latent difference ||x_half - x_fp32|| / ||x_fp32|| (the final
latents, before the VA-VAE).

Without --config it uses tests/fixtures/reference/dit_p1_swiglu_rope_rms (a depth-2, width-64
LightningDiT with weights seeded by the upstream code, 8x8x32 latents, 10 classes) on the CPU, where
bf16 autocast runs too. With --config (steps 2 and 3 done) it uses the real checkpoint on this
machine's device. Appends its table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_results  # noqa: E402
from repro.config import Config, apply_overrides, load_config  # noqa: E402
from repro.sampling import engine as gen  # noqa: E402
from repro.utils import hardware  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "reference" / "dit_p1_swiglu_rope_rms"


def fixture_setup(device: torch.device, precision: str) -> gen.SamplerSetup:
    from safetensors.torch import load_file

    from repro.models.lightningdit import LightningDiT

    side = json.loads(FIXTURE.with_suffix(".json").read_text())["model"]
    model = LightningDiT(**side).eval()
    tensors = load_file(str(FIXTURE.with_suffix(".safetensors")))
    model.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("w.")}, strict=True)
    cfg = apply_overrides(Config(), [f"data.image_size={16 * side['input_size']}",
                                     f"data.num_classes={side['num_classes']}", "model.model_type=LightningDiT-T/1"])
    return gen.sampler_from_parts(cfg, model.to(device), device=device, precision=precision)


def relative_difference(setup_of, settings: list[str], num: int, seed: int) -> dict[str, float]:
    """{precision: relative latent difference to fp32} for the sampler `setup_of(precision)`."""
    latents = {}
    for precision in ("fp32", "bf16", "fp16"):
        try:
            setup = setup_of(precision)
        except Exception as e:  # e.g. bf16 on a GPU without it
            print(f"{precision}: skipped ({e})")
            continue
        setup.cfg = apply_overrides(setup.cfg, settings)
        g = torch.Generator().manual_seed(seed)
        c, h, w = setup.latent_shape
        z = torch.randn(num, c, h, w, generator=g)
        y = torch.randint(0, setup.num_classes, (num,), generator=g)
        latents[precision] = gen.sample_latents(setup, z, y).double().cpu()
    ref = latents["fp32"]
    return {p: float((x - ref).norm() / ref.norm()) for p, x in latents.items() if p != "fp32"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a resolved config with the real checkpoint (default: the fixture)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 250], help="Euler grid points to compare at")
    p.add_argument("--num", type=int, default=16, help="samples per comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args(argv)

    device = torch.device(a.device) if a.device else hardware.default_device()
    hardware.configure_backends(device)  # TF32 on sm_80+, as upstream inference.py
    if a.config:
        cfg = load_config(a.config)
        what = f"{cfg.model.model_type} {cfg.ckpt_path}"
        setup_of = lambda prec: gen.build_sampler(cfg, device=device, precision=prec, compile=False)  # noqa: E731
    else:
        what = "fixture dit_p1_swiglu_rope_rms (upstream-seeded weights)"
        setup_of = lambda prec: fixture_setup(device, prec)  # noqa: E731
    # The 800-epoch preset's guidance (CFG 6.7 on 3 channels from t = 0.125, shift 0.3), and no guidance.
    cases = {"cfg 6.7, interval 0.125, shift 0.3": ["sample.cfg_scale=6.7", "sample.cfg_interval_start=0.125",
                                                    "sample.timestep_shift=0.3"],
             "no cfg": ["sample.cfg_scale=1.0", "sample.timestep_shift=0.0"]}
    rows = []
    for steps in a.steps:
        for name, settings in cases.items():
            diff = relative_difference(setup_of, [f"sample.num_sampling_steps={steps}", "sample.sampling_method=euler",
                                                  *settings], a.num, a.seed)
            rows.append((steps, name, diff))
            print(f"{steps:4d} steps, {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()), flush=True)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"### Sampling precision vs fp32 ({datetime.date.today()}, {device_name}, torch {torch.__version__})",
             "", f"{what}; {a.num} samples, seed {a.seed}; relative latent difference ||x - x_fp32|| / ||x_fp32||", "",
             "| steps | guidance | bf16 | fp16 |", "|---|---|---|---|"]
    for steps, name, diff in rows:
        cells = " | ".join(f"{diff[k]:.2e}" if k in diff else "-" for k in ("bf16", "fp16"))
        lines.append(f"| {steps} | {name} | {cells} |")
    if not a.no_record:
        append_results(lines)
    return {"rows": rows}


if __name__ == "__main__":
    main()
