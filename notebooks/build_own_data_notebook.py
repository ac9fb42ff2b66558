"""Build notebooks/04_own_data.ipynb with nbformat (no outputs).

    python notebooks/build_all.py            # every notebook (or: python notebooks/build_own_data_notebook.py)

Edit the cells here, not in the .ipynb file, and rebuild.
"""

from __future__ import annotations

import nbformat

from nbbuild import Param, new_code_cell, new_markdown_cell, notebook, parameters_cell, setup_cell, title_cell, write_all

DATA = '''\
import json, time
import torch
from repro.data.image_sources import list_images
from repro.data.synthetic import make_digits_folder

if threads > 0:
    torch.set_num_threads(threads)
work = env.root / "own_data"
times = {}
t0 = time.perf_counter()
if image_folder:
    folder, held_out = Path(image_folder).expanduser().absolute(), held_out_folder or image_folder
    if not held_out_folder:
        print("held_out_folder is empty: the tokenizer is evaluated on its training images")
else:  # scikit-learn's handwritten digits (bundled, offline), written as a class folder
    digits = make_digits_folder(work / "digits", size=image_size, per_class=images_per_class,
                                held_out=work / "digits_held_out")
    folder, held_out = Path(digits["folder"]), digits["held_out"]
source = list_images(folder)
class_names = source.class_names or []
num_classes = len(class_names)
print(f"{len(source)} images in {folder}, {num_classes} class folder(s): {', '.join(class_names[:12])}"
      + (" ..." if num_classes > 12 else ""))
for problem in source.problems[:5]:
    print(f"  listing problem (not used): {problem['path']}: {problem['error']}")
if num_classes < 1:
    raise RuntimeError(f"{folder} needs one sub-folder per class (a single sub-folder trains an unconditional model)")
guidance = cfg_scale if num_classes > 1 else 1.0
if num_classes == 1:
    print("one class: an unconditional model, sampled without classifier-free guidance")
times["data"] = time.perf_counter() - t0'''

TOKENIZER = '''\
from steps import step9_train_tokenizer
t0 = time.perf_counter()
tok = launch(step9_train_tokenizer.main, gpus=gpus, config=tokenizer_config,
             set=[f"data.image_folder={folder}", f"data.image_size={image_size}", f"train.max_steps={tokenizer_steps}",
                  f"train.output_dir={work}", "train.exp_name=tokenizer"],
             time_budget=tokenizer_time_budget or None)
times["tokenizer"] = time.perf_counter() - t0
tokenizer_done = tok["step"] >= tokenizer_steps
print(f"tokenizer: step {tok['step']} of {tokenizer_steps} ({tok['stopped']}), {tok['tokenizer']}")
if not tokenizer_done:
    print("the time budget stopped the tokenizer: run the notebook again to continue (the next stages wait)")
show_image(tok["loss_plot"])'''

TOKENIZER_EVAL = '''\
from steps import step10_evaluate_tokenizer
t0 = time.perf_counter()
tok_eval = step10_evaluate_tokenizer.main(tokenizer=tok["tokenizer"], folder=str(held_out), out=str(work / "tokenizer_eval"),
                                          rfid_images=rfid_images or None) if tok["tokenizer"] else None
times["tokenizer_eval"] = time.perf_counter() - t0
if tok_eval:
    show_image(tok_eval["grid"])'''

EXTRACT = '''\
from repro.config import load_config, save_config
from repro.models.denoisers import combination_overrides
from repro.resources import find_config
from steps import step6_extract
dit_yaml = work / "dit.yaml"
process = process or {"dit": "flow", "unet": "ddpm"}[denoiser]  # each family's own process unless set
dit_set = tok["dit_overrides"] + combination_overrides(denoiser, process) + [f"data.data_path={work / 'latents'}", f"train.output_dir={work}", "train.exp_name=dit",
                                  f"data.num_classes={num_classes}", f"train.max_steps={dit_steps}",
                                  f"sample.cfg_scale={guidance}", f"sample.num_sampling_steps={sampling_steps}"]
save_config(load_config(find_config(dit_config), dit_set), dit_yaml, header="notebook 04: the DiT config of this run")
report = None
if tokenizer_done:
    t0 = time.perf_counter()
    report = launch(step6_extract.main, gpus=gpus, config=str(dit_yaml), source=str(folder), out=str(work / "latents"),
                    store="mean", batch_size=64)
    times["extract"] = time.perf_counter() - t0
    print(f"{report['num_encoded']} latents ({report['num_corrupt']} unreadable, {report['num_listing_problems']} "
          f"listing problem(s): {work / 'latents' / 'extract_report.json'})")'''

TRAIN = '''\
from steps import step7_train
dit = None
if report is not None:
    t0 = time.perf_counter()
    dit = launch(step7_train.main, gpus=gpus, config=str(dit_yaml), time_budget=dit_time_budget or None)
    times["dit"] = time.perf_counter() - t0
    print(f"DiT: step {dit['step']} of {dit_steps} ({dit['stopped']}); checkpoint {dit['checkpoint']}")
    if dit["step"] < dit_steps:
        print("the time budget stopped training: run the notebook again to continue (sampling waits)")
    show_image(Path(dit["run_dir"]) / "loss.png")'''

SAMPLE = '''\
import numpy as np
from repro.sampling.grid import show_samples
from steps import step4_inference
samples = None
if dit is not None and dit["step"] >= dit_steps:
    t0 = time.perf_counter()
    samples = launch(step4_inference.main, gpus=gpus, config=str(dit_yaml), out=str(work / "samples"),
                     num_samples=samples_per_class * num_classes, class_balanced=True,
                     set=[f"ckpt_path={dit['checkpoint']}"], trajectory=trajectory or None, batch_size=100)
    times["sampling"] = time.perf_counter() - t0
    with np.load(samples["npz"]) as f:
        images, labels = f["arr_0"], f["arr_1"]
    order = np.argsort(labels, kind="stable")  # one row per class, in sorted folder order
    per_row = min(samples_per_class, 10)
    keep = np.concatenate([order[labels[order] == c][:per_row] for c in range(num_classes)])
    show_figure(show_samples(images[keep], labels[keep], class_names, cols=per_row, max_images=len(keep), size=1.0,
                             title=f"samples, cfg {guidance:g}"), work / "sample_grid.png")
    if trajectory:
        clean = "x_t + (1 - t) v" if process == "flow" else "x̂ of each DDIM/DDPM step"
        print(f"x0 strip of image 0 ({class_names[labels[0]]}): the predicted clean image {clean} at "
              f"steps {samples['trajectory_steps']}, noisiest left")
        show_image(Path(samples["trajectories_dir"]) / "000000.png")'''

EVALUATE = '''\
from repro.evaluation.recognition import recognition_check
from repro.paths import read_asset_table, recorded_asset_path
from steps import step8_evaluate
summary = {"times": times, "tokenizer": tok_eval and {k: tok_eval[k] for k in ("psnr", "ssim", "lpips", "rfid")}}
if samples is not None:
    t0 = time.perf_counter()
    if num_classes > 1:
        check = recognition_check(folder, samples["npz"], image_size)
        print(check["summary"])
        summary.update(recognised=check["recognised"], heldout_accuracy=check["heldout_accuracy"],
                       per_class=check["per_class"])
    entries, table = read_asset_table()
    weights = recorded_asset_path(entries, "fid-inception", table.parent)
    if weights is not None and weights.is_file():
        fid = launch(step8_evaluate.main, gpus=gpus, samples=samples["npz"], ref=str(folder), metrics="fid")
        summary["fid"] = fid["fid"]
    else:
        print("FID against your images skipped: the Inception weights are not on disk "
              "(python -m steps.step2_download --only fid-inception)")
    times["evaluation"] = time.perf_counter() - t0
    summary["samples_npz"] = samples["npz"]
print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
summary_path = work / "summary.json"
summary_path.write_text(json.dumps(summary, indent=1))'''


def own_data_notebook() -> nbformat.NotebookNode:
    cells = [
        title_cell("04_own_data.ipynb", "# Your own images, end to end: tokenizer → latents → LightningDiT → samples",
                   "Trains a VA-VAE-architecture tokenizer on an image folder (one sub-folder per class), evaluates "
                   "its reconstructions, extracts latents with it, trains a class-conditional LightningDiT (one class: "
                   "unconditional, no guidance), samples a grid with class names and x0 trajectories, and checks the "
                   "samples with a plain classifier fitted on the real images. With `image_folder` empty it writes "
                   "scikit-learn's handwritten digits (1,600 images, 10 classes, offline) and runs on a 2-core CPU in about "
                   "9 minutes (15 when the machine is busy). Every stage resumes; with the time budgets a stage saves and stops, and "
                   "the next run of the notebook continues. Use a new `workdir` for another folder."),
        parameters_cell([
            Param("image_folder", str, "", "one sub-folder per class; empty writes the digits folder"),
            Param("held_out_folder", str, "", "images for the tokenizer evaluation; empty uses the digits' rest"),
            Param("image_size", int, 32, "training resolution; a multiple of the tokenizer's factor (4)"),
            Param("images_per_class", int, 160, "digits per class (scikit-learn has about 175)"),
            Param("tokenizer_config", str, "tokenizer/digits_f4", "step 9 preset or YAML (upstream's VA-VAE YAMLs too)"),
            Param("dit_config", str, "train/own_data", "DiT preset or YAML (LightningDiT-Mini/2)"),
            Param("denoiser", str, "dit", "dit (LightningDiT-Mini/2) or unet (UNet-Mini)"),
            Param("process", str, "", "flow or ddpm (ε, DDIM); empty: flow for dit, ddpm for unet"),
            Param("tokenizer_steps", int, 300, "tokenizer optimizer steps (batch 32)"),
            Param("dit_steps", int, 1500, "DiT optimizer steps (batch 64)"),
            Param("samples_per_class", int, 20, "samples per class for the grid and the check"),
            Param("cfg_scale", float, 3.0, "classifier-free guidance on all channels (1 class: none)"),
            Param("sampling_steps", int, 50, "Euler grid points (DDIM: steps)"),
            Param("trajectory", int, 8, "x0 strip panels per sample (0: none)"),
            Param("rfid_images", int, 500, "rFID on this many held-out images when the Inception weights exist"),
            Param("tokenizer_time_budget", float, 0.0, "seconds for the tokenizer stage, 0 for none"),
            Param("dit_time_budget", float, 0.0, "seconds for the DiT stage, 0 for none"),
            Param("threads", int, 1, "torch CPU threads (1 was fastest on a busy 2-core machine); 0 keeps torch's"),
        ]),
        setup_cell(),
        new_markdown_cell("## Your images\nOne sub-folder per class, sorted names → labels (as ImageNet's train "
                          "folder); grayscale, RGBA, CMYK and 16-bit images are converted to RGB as step 6 does, "
                          "unreadable files are reported, never silently dropped."),
        new_code_cell(DATA),
        new_markdown_cell("## Step 9: train the tokenizer\nAn f4 autoencoder with 4 latent channels (L1 + KL; the "
                          "preset's loss keys add LPIPS, PatchGAN and VA-VAE's VF loss for natural images). "
                          "Checkpoints and `tokenizer.safetensors` go to `own_data/tokenizer/`; the loss curve:"),
        new_code_cell(TOKENIZER),
        new_markdown_cell("## Step 10: evaluate the tokenizer\nPSNR, SSIM (and LPIPS / rFID when their weights are "
                          "on disk) on held-out images; originals above their reconstructions:"),
        new_code_cell(TOKENIZER_EVAL),
        new_markdown_cell("## Step 6: extract latents with your tokenizer\nThe DiT config (`own_data/dit.yaml`) "
                          "names the tokenizer (`vae.model_name: custom`) and the class count of the folder; latents "
                          "are the posterior means (`--store mean`: a small tokenizer's posterior is wide, and the "
                          "DiT learns its draws much more slowly)."),
        new_code_cell(EXTRACT),
        new_markdown_cell("## Step 7: train LightningDiT\nNo horizontal flips (`data.horizontal_flip: false`), "
                          "label dropout 0.1 for guidance; the loss curve:"),
        new_code_cell(TRAIN),
        new_markdown_cell("## Step 4: sample, with class names and x0 trajectories\n`samples.npz` holds `arr_0` "
                          "(uint8 N×H×W×3) and `arr_1` (the class index, sorted folder order)."),
        new_code_cell(SAMPLE),
        new_markdown_cell("## Are the samples their class?\nA logistic regression on grey pixels, fitted on 80% of "
                          "the real images; its accuracy on the other 20% is printed beside the share of samples it "
                          "recognises as the class they were asked for. FID against your images (step 8) runs when "
                          "the Inception weights are on disk."),
        new_code_cell(EVALUATE),
    ]
    return notebook(cells)


NOTEBOOKS = {"04_own_data.ipynb": own_data_notebook}


def main() -> None:
    write_all(NOTEBOOKS)


if __name__ == "__main__":
    main()
