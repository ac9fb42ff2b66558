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

work = env.root / "own_data"
times = {}
t_start = t0 = time.perf_counter()
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

PLAN = '''\
from repro.setup.own_data_plan import FLIP_MIN_EPOCHS, horizontal_flip_for, load_or_plan, planned_epochs
t0 = time.perf_counter()
plan = load_or_plan(work / "plan.json", budget_s=time_budget_minutes * 60,
                    image_size=image_size, num_images=len(source), num_classes=num_classes,
                    latent_side=latent_side, latent_channels=latent_channels,
                    tokenizer_config=tokenizer_config, denoiser=denoiser, samples_per_class=samples_per_class,
                    sampling_steps=sampling_steps, cfg_scale=guidance, check_steps=check_steps,
                    tokenizer_steps=tokenizer_steps or None,
                    dit_steps=dit_steps or None, threads=threads or None)
if plan.threads:  # the plan's thread count (the faster one it timed, or `threads`), also when a rerun reuses it
    torch.set_num_threads(plan.threads)
print("\\n".join(plan.lines))
epochs = planned_epochs(plan.dit_steps, len(source))
flip = horizontal_flip_for(horizontal_flip, own_folder=bool(image_folder), epochs=epochs)
print(f"horizontal flips {'on' if flip else 'off'} (horizontal_flip={horizontal_flip}; the denoiser sees each image "
      f"~{epochs:.0f} times, auto flips from {FLIP_MIN_EPOCHS})")
times["plan"] = time.perf_counter() - t0'''

TOKENIZER = '''\
from steps import step9_train_tokenizer
t0 = time.perf_counter()
tok = launch(step9_train_tokenizer.main, gpus=gpus, config=tokenizer_config,
             set=[f"data.image_folder={folder}", *plan.tokenizer_set, f"train.output_dir={work}",
                  "train.exp_name=tokenizer"],
             time_budget=tokenizer_time_budget or None)
times["tokenizer"] = time.perf_counter() - t0
tokenizer_done = tok["step"] >= plan.tokenizer_steps
print(f"tokenizer: step {tok['step']} of {plan.tokenizer_steps} ({tok['stopped']}), {tok['tokenizer']}")
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
from repro.models.denoisers import own_data_overrides
from repro.resources import find_config
from repro.setup.own_data_plan import load_or_replan
from steps import step6_extract
dit_yaml = work / "dit.yaml"
if tokenizer_done and not dit_steps:  # the denoiser gets the time the tokenizer and the plan's margins left over
    plan = load_or_replan(work / "denoiser_plan.json", plan, tokenizer_log=work / "tokenizer" / "log.jsonl")
    print(plan.lines[-1].strip())
# the plan chose (and timed) the denoiser; the process keys: its family's own process unless set, DDPM with v on the
# cosine schedule (LightningDiT's timesteps logit-normal) unless `prediction` / `schedule` / `timesteps` say otherwise
process, family = own_data_overrides(denoiser, process, prediction, schedule, timesteps)
dit_set = tok["dit_overrides"] + plan.dit_set + family + [f"data.data_path={work / 'latents'}", f"train.output_dir={work}",
                                                         "train.exp_name=dit", f"data.num_classes={num_classes}",
                                  f"data.horizontal_flip={str(flip).lower()}",
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
    print(f"DiT: step {dit['step']} of {plan.dit_steps} ({dit['stopped']}); checkpoint {dit['checkpoint']}")
    if dit["step"] < plan.dit_steps:
        print("the time budget stopped training: run the notebook again to continue (sampling waits)")
    show_image(Path(dit["run_dir"]) / "loss.png")'''

SAMPLE = '''\
import numpy as np
from repro.sampling.grid import show_samples
from steps import step4_inference
samples = None
if dit is not None and dit["step"] >= plan.dit_steps:
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
summary = {"times": times, "plan": plan.lines, "tokenizer": tok_eval and {k: tok_eval[k] for k in ("psnr", "ssim", "lpips", "rfid")}}
if samples is not None:
    t0 = time.perf_counter()
    check = recognition_check(folder, samples["npz"], image_size, steps=check_steps)
    print(check["summary"])
    summary["check"] = check
    entries, table = read_asset_table()
    weights = recorded_asset_path(entries, "fid-inception", table.parent)
    if weights is not None and weights.is_file():
        fid = launch(step8_evaluate.main, gpus=gpus, samples=samples["npz"], ref=str(folder), metrics="fid")
        summary["fid"] = fid["fid"]
    else:
        print("Inception FID against your images skipped: its weights are not on disk "
              "(python -m steps.step2_download --only fid-inception)")
    times["evaluation"] = time.perf_counter() - t0
    summary["samples_npz"] = samples["npz"]
times["total"] = time.perf_counter() - t_start
print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
summary_path = work / "summary.json"
summary_path.write_text(json.dumps(summary, indent=1))'''

IMAGES_ON_COLAB_KAGGLE = (
    "## Your images\nOne sub-folder per class, sorted names → labels (as ImageNet's train folder); grayscale, "
    "RGBA, CMYK and 16-bit images are converted to RGB as step 6 does, unreadable files are reported, never "
    "silently dropped. Put about a tenth of each class aside in a second folder with the same sub-folders "
    "(`held_out_folder`) for the tokenizer's evaluation.\n\n"
    "**Getting them here.** Colab: zip the class folders, upload the zip in the file panel (or "
    "`from google.colab import files; files.upload()`), then `!unzip -q my_images.zip -d /content/my_images`; "
    "for more than a few hundred MB, put the zip on Google Drive and run this notebook with `drive_mount=True` "
    "(the folder is `/content/drive/MyDrive/...`). Kaggle: *Add data* → *Upload* a data set (the zip is unpacked "
    "for you); it appears read-only under `/kaggle/input/<data-set-name>/`, which `image_folder` can name "
    "directly (the kit writes only to the work folder). Anywhere: any folder path works.\n\n"
    "**Size and budget.** 32 px is what a 2-core CPU can learn in the default 15 minutes (a few hundred to a "
    "few thousand images, 2 to 10 classes); the kit resizes the short side and centre-crops, so cut "
    "photographs into the patches you want generated. 64 px needs about 4x the time per step: give "
    "`time_budget_minutes` 45 or more, or a GPU. More images help the DiT only when its budget lets it see "
    "each several times (the plan prints its steps).")


def own_data_notebook() -> nbformat.NotebookNode:
    cells = [
        title_cell("04_own_data.ipynb", "# Your own images, end to end: tokenizer → latents → LightningDiT → samples",
                   "Trains a VA-VAE-architecture tokenizer on an image folder (one sub-folder per class), evaluates "
                   "its reconstructions, extracts latents with it, trains a class-conditional LightningDiT (one class: "
                   "unconditional, no guidance), samples a grid with class names and x0 trajectories, and checks the "
                   "samples with a classifier trained on your real images. One knob sets the effort: "
                   "`time_budget_minutes` (15 by default); the kit measures this machine and plans both models "
                   "to fit it. With `image_folder` empty it writes scikit-learn's handwritten digits (1,600 "
                   "images, 10 classes, offline). Every stage resumes; with the stage time budgets a stage saves "
                   "and stops, and the next run of the notebook continues. Use a new `workdir` for another folder."),
        parameters_cell([
            Param("image_folder", str, "", "one sub-folder per class; empty writes the digits folder"),
            Param("held_out_folder", str, "", "images for the tokenizer evaluation; empty uses the digits' rest"),
            Param("image_size", int, 32, "training resolution: 32 suits a CPU (16, 32, 64)"),
            Param("latent_side", int, 16, "latent grid side the tokenizer's factor aims at (16: f2 at 32 px; 8: f4, faster)"),
            Param("latent_channels", int, 4, "latent channels of the tokenizer"),
            Param("images_per_class", int, 160, "digits per class (scikit-learn has about 175)"),
            Param("time_budget_minutes", float, 15.0, "the whole run's wall time: the plan sizes both models to it"),
            Param("tokenizer_config", str, "tokenizer/photos_no_gan", "step 9 preset or YAML (tokenizer/photos_f4: + PatchGAN)"),
            Param("dit_config", str, "train/own_data", "DiT preset or YAML (LightningDiT-Mini, patch for a 4x4 token grid)"),
            Param("denoiser", str, "dit", "dit (LightningDiT-Mini) or unet (UNet-Mini)"),
            Param("process", str, "", "flow or ddpm (DDIM sampling); empty: flow for dit, ddpm for unet"),
            Param("prediction", str, "", "DDPM's target: velocity (v) or noise (ε, lightdiff's); empty: velocity"),
            Param("schedule", str, "", "DDPM's noise schedule: cosine, linear (lightdiff's default) or scaled_linear; "
                  "empty: cosine"),
            Param("timesteps", str, "", "training timesteps: lognorm (logit-normal, LightningDiT's) or uniform "
                  "(DDPM's, Ho et al.); empty: lognorm, and uniform for the UNet under DDPM"),
            Param("tokenizer_steps", int, 0, "tokenizer optimizer steps; 0: the plan's"),
            Param("dit_steps", int, 0, "DiT optimizer steps (batch 64); 0: the plan's"),
            Param("horizontal_flip", str, "auto", "mirrored copies in training: auto (your folder in a run of 100+ "
                  "epochs, digits no), true, false"),
            Param("samples_per_class", int, 20, "samples per class for the grid and the check"),
            Param("cfg_scale", float, 3.0, "classifier-free guidance on all channels (1 class: none)"),
            Param("sampling_steps", int, 50, "Euler grid points (DDIM: steps)"),
            Param("trajectory", int, 8, "x0 strip panels per sample (0: none)"),
            Param("check_steps", int, 400, "training steps of the check's classifier (batch 64)"),
            Param("rfid_images", int, 500, "rFID on this many held-out images when the Inception weights exist"),
            Param("tokenizer_time_budget", float, 0.0, "seconds: stop the tokenizer stage early (0: the plan's steps)"),
            Param("dit_time_budget", float, 0.0, "seconds: stop the DiT stage early (0: the plan's steps)"),
            Param("threads", int, 0, "torch CPU threads; 0: the plan times 1, torch's default and every CPU, and keeps the fastest (1 if other jobs will share the cores)"),
        ]),
        setup_cell(),
        new_markdown_cell(IMAGES_ON_COLAB_KAGGLE),
        new_code_cell(DATA),
        new_markdown_cell("## The plan: one budget, split between the tokenizer and the DiT\nThe kit measures what "
                          "a step of each model costs on this machine now, sets aside sampling and the check, and "
                          "sizes the rest from the image size, the number of images and classes (factor and latent "
                          "channels for a 16x16 latent grid, steps, warm-up and cosine decay, EMA, when a PatchGAN "
                          "starts if the preset has one). It is saved in `own_data/plan.json`: a rerun resumes with "
                          "the same plan. "
                          "`tokenizer_steps` / `dit_steps` override it."),
        new_code_cell(PLAN),
        new_markdown_cell("## Step 9: train the tokenizer\nThe plan's autoencoder (f2 with 4 latent channels at 32 px: "
                          "16x16x4 latents keep fine texture) with the photographs preset's losses: L1 + KL, LPIPS "
                          "when its VGG weights are on disk (else a note, and training goes on without it), and no "
                          "PatchGAN: in a CPU budget it costs steps and PSNR (`tokenizer/photos_f4` has one for the "
                          "last 40% of the steps; `tokenizer/digits_f4` is L1 + KL only). "
                          "Checkpoints and `tokenizer.safetensors` go to `own_data/tokenizer/`; the loss curve:"),
        new_code_cell(TOKENIZER),
        new_markdown_cell("## Step 10: evaluate the tokenizer\nPSNR, SSIM (and LPIPS / rFID when their weights are "
                          "on disk) on held-out images; originals above their reconstructions:"),
        new_code_cell(TOKENIZER_EVAL),
        new_markdown_cell("## Step 6: extract latents with your tokenizer\nThe DiT config (`own_data/dit.yaml`) "
                          "names the tokenizer (`vae.model_name: custom`) and the class count of the folder; the "
                          "denoiser's steps are planned again from the time the tokenizer left (saved in "
                          "`own_data/denoiser_plan.json`, `dit_steps` overrides it); latents "
                          "are the posterior means (`--store mean`: a small tokenizer's posterior is wide, and the "
                          "DiT learns its draws much more slowly)."),
        new_code_cell(EXTRACT),
        new_markdown_cell("## Step 7: train LightningDiT\nMirrored latents (`data.horizontal_flip`, as upstream) for your "
                          "folder when the plan shows each image 100+ times (a shorter run is short of steps, not "
                          "data), none for the digits (a mirrored 2 is not a 2; parameter `horizontal_flip`), "
                          "label dropout 0.1 for guidance; the loss curve:"),
        new_code_cell(TRAIN),
        new_markdown_cell("## Step 4: sample, with class names and x0 trajectories\n`samples.npz` holds `arr_0` "
                          "(uint8 N×H×W×3) and `arr_1` (the class index, sorted folder order)."),
        new_code_cell(SAMPLE),
        new_markdown_cell("## Do the samples look like your images?\nA small convolutional classifier is trained on 80% "
                          "of your real images (colour, a minute or two on a CPU); per class, the share of samples it "
                          "recognises as the class they were asked for is printed beside its accuracy on the other 20% "
                          "of real images (a ratio near 1: as recognisable as real images). A Fréchet distance and KID "
                          "on its features stand beside the same distances between real images (the floor); one "
                          "class gets the distances alone. The outer pixel ring of the samples (brightness, spread, "
                          "step to the next ring) must lie within the real images' range: a frame drawn at the border "
                          "fails it. Inception FID against your images (step 8) runs when its weights are on disk."),
        new_code_cell(EVALUATE),
    ]
    return notebook(cells)


NOTEBOOKS = {"04_own_data.ipynb": own_data_notebook}


def main() -> None:
    write_all(NOTEBOOKS)


if __name__ == "__main__":
    main()
