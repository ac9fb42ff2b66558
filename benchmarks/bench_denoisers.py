"""Denoiser families at the same CPU wall budget: LightningDiT + flow, UNet + DDIM, LightningDiT + DDPM (issue 23).

    python benchmarks/bench_denoisers.py                                  # digits and colour shapes, 300 s each
    python benchmarks/bench_denoisers.py --train-seconds 20 --tokenizer-steps 20 --samples-per-class 2 --no-record
    python benchmarks/bench_denoisers.py --datasets digits --combos unet-ddpm --train-seconds 600

Per data set (notebook 04's digits folder; a colour-shapes folder from repro.data.synthetic.make_demo_images), the
notebook's stages up to the latents run once and are shared: step 9 trains the tokenizer (configs/tokenizer/
digits_f4.yaml), step 6 extracts posterior means. Then each combination (`repro.models.denoisers.
combination_overrides` on configs/train/own_data.yaml) trains with step 7 for the same wall budget (`--time-budget`;
max_steps out of reach), samples `samples-per-class` images per class with step 4 (cfg 3, 50 steps: Euler for
flow, DDIM for DDPM) and is scored by notebook 04's check (`repro.evaluation.recognition.recognition_check`: the
share of samples a classifier fitted on the real images recognises as the class asked for). Reported: steps
reached, training images/s, sampling images/s, recognised share (classifier held-out accuracy), load average
(the machine is shared: the numbers mean little without it). Appends a table to benchmarks/RESULTS.md unless
--no-record.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_results  # noqa: E402

COMBOS = {"dit-flow": ("dit", "flow"), "unet-ddpm": ("unet", "ddpm"), "dit-ddpm": ("dit", "ddpm"),
          "unet-flow": ("unet", "flow")}


def make_dataset(name: str, work: Path, size: int, per_class: int) -> tuple[Path, int]:
    from repro.data.synthetic import make_demo_images, make_digits_folder

    if name == "digits":
        folder = Path(make_digits_folder(work / "digits", size=size, per_class=per_class,
                                         held_out=work / "digits_held_out")["folder"])
        return folder, 10
    if name == "colour":
        classes = 6  # colour x shape combinations of the demo images
        make_demo_images(work / "colour", num_classes=classes, per_class=per_class, size=size)
        return work / "colour", classes
    raise SystemExit(f"unknown data set {name!r}: digits or colour")


def prepare_latents(folder: Path, classes: int, work: Path, a) -> Path:
    """Tokenizer (step 9) and latents (step 6), as notebook 04; returns the DiT config they imply."""
    from repro.config import load_config, save_config
    from repro.resources import find_config
    from steps import step6_extract, step9_train_tokenizer

    tok = step9_train_tokenizer.main(config="tokenizer/digits_f4", set=[
        f"data.image_folder={folder}", f"data.image_size={a.image_size}", f"train.max_steps={a.tokenizer_steps}",
        f"train.output_dir={work}", "train.exp_name=tokenizer"])
    base = work / "base.yaml"
    save_config(load_config(find_config("train/own_data"), tok["dit_overrides"] + [
        f"data.data_path={work / 'latents'}", f"train.output_dir={work}", f"data.num_classes={classes}",
        "train.max_steps=1000000", f"sample.cfg_scale={a.cfg_scale}", "sample.num_sampling_steps=50"]), base)
    step6_extract.main(config=str(base), source=str(folder), out=str(work / "latents"), store="mean", batch_size=64)
    return base


def run_combo(base: Path, folder: Path, classes: int, combo: str, work: Path, a) -> dict:
    from repro.evaluation.recognition import recognition_check
    from repro.models.denoisers import combination_overrides
    from steps import step4_inference, step7_train

    denoiser, process = COMBOS[combo]
    overrides = combination_overrides(denoiser, process) + [f"train.exp_name={combo}"]
    t0 = time.perf_counter()
    trained = step7_train.main(config=str(base), set=overrides, time_budget=a.train_seconds)
    train_wall = time.perf_counter() - t0
    batch = 64  # configs/train/own_data.yaml's global batch
    t0 = time.perf_counter()
    samples = step4_inference.main(config=str(base), out=str(work / f"samples_{combo}"),
                                   num_samples=a.samples_per_class * classes, class_balanced=True, batch_size=100,
                                   set=overrides + [f"ckpt_path={trained['checkpoint']}"], progress=False)
    sample_wall = time.perf_counter() - t0
    check = recognition_check(folder, samples["npz"], a.image_size)
    return {"combo": combo, "steps": trained["step"], "train_ips": trained["step"] * batch / train_wall,
            "sample_ips": a.samples_per_class * classes / sample_wall, "recognised": check["recognised"],
            "heldout": check["heldout_accuracy"], "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "colour"])
    p.add_argument("--combos", nargs="+", default=["dit-flow", "unet-ddpm", "dit-ddpm"], choices=sorted(COMBOS))
    p.add_argument("--train-seconds", type=float, default=300.0, help="step 7's wall budget per combination")
    p.add_argument("--tokenizer-steps", type=int, default=300)
    p.add_argument("--images-per-class", type=int, default=160)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--samples-per-class", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (notebook 04's default)")
    p.add_argument("--work", default=None, help="work folder to keep (default: a temporary one)")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    root = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_denoisers_"))
    os.environ.setdefault("REPRO_RUNS_DIR", str(root / "runs"))
    rows = []
    for name in a.datasets:
        work = root / name
        folder, classes = make_dataset(name, work, a.image_size, a.images_per_class)
        base = prepare_latents(folder, classes, work, a)
        for combo in a.combos:
            rows.append({"dataset": name, **run_combo(base, folder, classes, combo, work, a)})
            print(rows[-1], flush=True)
    lines = [f"## bench_denoisers {time.strftime('%Y-%m-%d')}: {a.train_seconds:.0f} s of step 7 per combination, "
             f"{a.tokenizer_steps} tokenizer steps, {a.samples_per_class} samples per class, cfg {a.cfg_scale:g}, "
             f"cpu ({os.cpu_count()} cores, {a.threads} torch thread(s)), torch {torch.__version__}", "",
             "| data set | combination | steps in budget | training img/s | sampling img/s | recognised (classifier "
             "held-out) | load avg |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['combo']} | {r['steps']} | {r['train_ips']:.0f} | {r['sample_ips']:.1f} | "
                     f"{r['recognised']:.1%} ({r['heldout']:.1%}) | {r['load']:.1f} |")
    print("\n".join(lines))
    if not a.no_record:
        append_results(lines)


if __name__ == "__main__":
    main()
