"""Step 4: sample images: the official demo grid, or FID-scale sampling (resumable, any number of processes).

    python -m steps.step4_inference                                   # the official demo: 2x4 grid PNG
    python -m steps.step4_inference --config tiny --demo              # the demo on the CPU smoke profile
    python -m steps.step4_inference --config lightningdit_xl_800ep --num-samples 50000 --batch-size 64
    python -m steps.step4_inference --config C --num-samples 50000 --class-balanced --set sample.cfg_scale=4.0
    torchrun --nproc_per_node=8 -m steps.step4_inference --config lightningdit_xl_800ep --batch-size 64
    python -m steps.step4_inference --config own.yaml --num-samples 100 --class-balanced --trajectory 8
    python -m steps.step4_inference --labels "golden retriever" "tabby cat" 388   # ImageNet names or ids
    # notebook:  from steps.step4_inference import main; res = main(config="tiny", num_samples=16)

Runs steps 2 and 3 first when their outputs are missing. Writes OUT/images/{i:06d}.png, then
OUT/samples.npz (ADM evaluator format) or OUT/demo_samples.png, with OUT/config.yaml and OUT/run.json.
--trajectory K also writes OUT/trajectories/{i:06d}.png: image i's x0 strip, the model's predicted clean
image at K evenly spread steps of the sampling grid (noisiest left), decoded. The kit's convention: t = 0
noise, t = 1 data, x_t = t x1 + (1 - t) x0, v = x1 - x0, so the prediction is x1_hat = x_t + (1 - t) v
(with the guided v where CFG is on). The preview is titled with the class names step 6 recorded.
--latent-shards also writes OUT/samples_rank00_shard{s:03d}.safetensors (`latents` in the tokenizer's space,
`labels` int32; 10,000 a shard, image order): VFM-VAE's tools/preprocess_for_lightningdit sampling output.
The same command gives byte-identical images on 1 or K processes and after any interruption: run it
again to finish (on CPU, with the same torch thread count per process: see repro/sampling/plan.py). --precision: fp32 (upstream's; the presets' sample.precision) | auto (bf16 on Ampere+, fp16 on older GPUs,
fp32 on CPU: faster, moves the latents slightly) | bf16 | fp16.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from repro.sampling.run import run_sampling
from repro.setup.prepare import prepare_config
from repro.utils import distributed
from repro.utils.hardware import default_device
from repro.utils.cli import add_config_arguments, run_step, step_parser


def main(config: Optional[str] = None, demo: Optional[bool] = None, num_samples: Optional[int] = None,
         out: Optional[str] = None, batch_size: Optional[int | str] = None, seed: Optional[int] = None,
         class_balanced: bool = False, precision: Optional[str] = None, labels: Optional[Sequence[int | str]] = None,
         set: Optional[list[str]] = None, compile: Optional[str | bool] = None, device: Optional[str] = None,
         progress: bool = True, trajectory: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
         latent_shards: bool = False) -> dict:
    """Returns paths (out_dir, images_dir, npz or grid, config, record), counts and the summary line."""
    if demo is None:  # no arguments at all = the official demo
        demo = num_samples is None and config is None
    distributed.init(device)
    dev = torch.device(device) if device else default_device()
    base = config or ("demo" if demo else "lightningdit_xl_800ep")
    cfg, header = prepare_config(base, overrides=set, demo=demo, cuda=dev.type == "cuda")
    return run_sampling(cfg, out_dir=out, num_samples=num_samples, batch_size=batch_size, seed=seed,
                        class_balanced=class_balanced, labels=list(labels) if labels else None,
                        precision=precision, compile=compile, demo=demo, device=device, progress=progress,
                        config_header=header, trajectory=trajectory, class_names=class_names,
                        latent_shards=latent_shards)


def _batch(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _label(text: str) -> int | str:
    return int(text) if text.strip().lstrip("+-").isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step4_inference", __doc__)
    add_config_arguments(p, "preset name or YAML (default: demo, or lightningdit_xl_800ep with --num-samples)",
                         required=False)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true", default=None, help="the official demo: 8 labels, a 2x4 grid")
    mode.add_argument("--num-samples", type=int, help="FID mode: this many images (default sample.fid_num)")
    p.add_argument("--out", help="output folder (default runs/demo or runs/samples/<settings>)")
    p.add_argument("--batch-size", type=_batch, help="images per process per batch, or auto (from free GPU memory)")
    p.add_argument("--seed", type=int, help="global seed (default sample.seed)")
    p.add_argument("--class-balanced", action="store_true", help="exactly N / num_classes images per class")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="transformer precision")
    p.add_argument("--labels", type=_label, nargs="+", metavar="ID_OR_NAME",
                   help='class ids or names, e.g. 207 "golden retriever" (cycled over the images; a typo gets a '
                        'did-you-mean)')
    p.add_argument("--class-names", nargs="+", metavar="NAME",
                   help="the classes' names in label order, or a file with one a line (default: step 6's class "
                        "folders, else ImageNet's for a 1000-class model); they title preview.png")
    p.add_argument("--compile", nargs="?", const="default",
                   help="torch.compile mode (default on a GPU: reduce-overhead = CUDA graphs; on CPU: eager)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="none", help="run the model eagerly")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's GPU, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trajectory", type=int, metavar="K", help="also write each image's x0 strip at K grid steps")
    p.add_argument("--latent-shards", action="store_true",
                   help="also write the latents as upstream's samples_rank00_shardNNN.safetensors (latents, labels)")
    return p


def cli(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    return run_step(lambda: main(config=a.config, demo=a.demo, num_samples=a.num_samples, out=a.out,
                                 batch_size=a.batch_size, seed=a.seed, class_balanced=a.class_balanced,
                                 precision=a.precision, labels=a.labels, set=a.set, compile=a.compile,
                                 device=a.device, progress=not a.no_progress, trajectory=a.trajectory,
                                 class_names=a.class_names, latent_shards=a.latent_shards))


if __name__ == "__main__":
    cli()
