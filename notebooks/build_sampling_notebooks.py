"""Build notebooks/00_quickstart.ipynb and notebooks/01_sample_fid.ipynb with nbformat (no outputs).

    python notebooks/build_all.py            # every notebook (or: python notebooks/build_sampling_notebooks.py)

Edit the cells here, not in the .ipynb files, and rebuild.
"""

from __future__ import annotations

import nbformat

from nbbuild import (CPU_FALLBACK, Param, new_code_cell, new_markdown_cell, notebook, parameters_cell, setup_cell,
                     title_cell, write_all)

# Where notebook 01 writes by default and notebook 03 reads by default (runs:REL is under the work folder).
FID_OUTPUT = "runs:fid"

STEP2_CELL = """\
from repro.setup.prepare import sampling_assets
from steps import step2_download

needed = sampling_assets(config)
if needed:
    assets = step2_download.main(only=needed)
    assert all(Path(assets["assets"][name]["path"]).is_file() for name in needed), assets
else:
    print(f"config {config}: its weights are kit-local stand-ins, generated in step 3; nothing to download")"""


QUICKSTART_PARAMS = [
    Param("config", str, "demo", "preset: demo (official XL/1 demo), tiny (offline CPU smoke run), lightningdit_xl_800ep",
          choices=("demo", "tiny", "lightningdit_xl_800ep")),
    Param("profile", str, "", "step 3 hardware profile; empty means this machine",
          choices=("", "t4", "t4x2", "p100", "l4", "a100-40gb", "a100-80gb", "h100-80gb", "cpu")),
    Param("output_dir", str, "", "where the grid goes; empty means runs/demo in the work folder"),
    Param("num_samples", int, 8, "8 is one per demo label, tiled 2x4"),
    Param("steps", int, 0, "Euler grid points; 0 takes the preset's (demo: 250 as upstream, tiny: 8)"),
    Param("cfg", float, 0.0, "classifier-free guidance scale; 0 takes the demo's 9.0 (on every step)"),
    Param("device", str, "", "cpu or cuda; empty means the GPU when there is one"),
    Param("install", bool, True, "step 1 pip-installs missing packages (never torch); False only reports"),
    CPU_FALLBACK,
]

EXPLORER_CELL = """\
from repro.explorer import draw_grid, explorer
ui = explorer(config=resolved["path"], steps=steps or resolved["config"].sample.num_sampling_steps, device=device or None)"""


def quickstart() -> nbformat.NotebookNode:
    cells = [
        title_cell("00_quickstart.ipynb", "# LightningDiT quickstart: install → download → configure → sample",
                   "Reproduces the official demo grid of LightningDiT-XL/1 (800 epochs) with the VA-VAE f16d32 "
                   "tokenizer: labels 975, 3, 207, 387, 388, 88, 979, 279, CFG 9.0 on every step, no timestep "
                   "shift, 250 Euler steps, in fp32 with TF32 matmuls as upstream (`--set sample.precision=auto` for bf16/fp16 "
                   "speed, which moves the latents slightly). Each cell calls one step's "
                   "`main(...)` and checks its result. `config=\"tiny\"` runs every step offline on a CPU in a "
                   "minute with generated stand-in weights (coloured noise, no download); without a GPU the "
                   "first cell switches to it (`cpu_fallback`)."),
        parameters_cell(QUICKSTART_PARAMS),
        setup_cell(QUICKSTART_PARAMS, fallback={"config": "tiny"}),
        new_markdown_cell("## Step 1: environment\nReports GPU, precision and batch recommendations; "
                          "installs only missing packages, never torch. Writes `runs/env.json`."),
        new_code_cell("from steps import step1_install\n"
                      "env_report = step1_install.main(dry_run=not install)\n"
                      'assert env_report["recommended"]["precision"] in ("fp32", "bf16", "fp16"), env_report["recommended"]'),
        new_markdown_cell("## Step 2: weights\nThe files this config samples with, from the Hugging Face Hub, "
                          "verified by sha256; a killed download resumes. `tiny` downloads nothing."),
        new_code_cell(STEP2_CELL),
        new_markdown_cell("## Step 3: config\nFills the preset's asset paths and `auto` values for this "
                          "machine, or for the hardware `profile` names. The FID reference batch is not needed "
                          "for sampling, so it stays unset here. Step 4 samples with the file written here."),
        new_code_cell("from steps import step3_configs\n"
                      "resolved = step3_configs.main(config=config, set=[\"data.fid_reference_file=null\"],\n"
                      "                              profile=profile or None)\n"
                      "assert Path(resolved[\"path\"]).is_file() and Path(resolved[\"config\"].ckpt_path).is_file()"),
        new_markdown_cell("## Step 4: the demo grid\nWith step 3's config (its profile and paths as resolved). On "
                          "several GPUs one process per GPU (torchrun, its log streamed here). Run the cell again "
                          "after an interruption: it finishes only the missing images, or says there is nothing to do."),
        new_code_cell("from steps import step4_inference\n"
                      "overrides = ([f\"sample.num_sampling_steps={steps}\"] if steps else []) + "
                      "([f\"sample.cfg_scale={cfg}\"] if cfg else [])\n"
                      "demo = launch(step4_inference.main, gpus=gpus, config=str(resolved[\"path\"]), demo=True,\n"
                      "              num_samples=num_samples, out=output_dir or None, device=device or None,\n"
                      "              set=overrides or None)\n"
                      "assert Path(demo[\"grid\"]).is_file() and demo[\"num_samples\"] == num_samples"),
        new_code_cell("from repro.sampling import load_images, show_samples\n"
                      "show_image(demo[\"grid\"])\n"
                      "images = load_images([Path(demo[\"images_dir\"]) / f\"{i:06d}.png\" for i in range(num_samples)])\n"
                      "figure = show_samples(images, demo[\"labels\"], demo[\"class_names\"], title=\"LightningDiT samples\")\n"
                      "show_figure(figure, Path(demo[\"out_dir\"]) / \"samples_figure.png\")"),
        new_markdown_cell("## Explore\nType a class name (it completes ImageNet's names; a typo gets a "
                          "did-you-mean), set the guidance, the steps and the seed, press the button: a grid of "
                          "that class. The widgets need a live notebook (Colab, Jupyter); under papermill the cell "
                          "says how to call `draw_grid` instead."),
        new_code_cell(EXPLORER_CELL),
    ]
    return notebook(cells)


SAMPLE_FID_PARAMS = [
    Param("config", str, "lightningdit_xl_800ep", "preset (official FID 1.35 settings), or tiny for an offline CPU run",
          choices=("lightningdit_xl_800ep", "lightningdit_xl_64ep", "tiny")),
    Param("output_dir", str, FID_OUTPUT, "samples folder; runs:REL is REL in the work folder's runs/ (03 reads runs:fid)"),
    Param("num_samples", int, 50000, "the ADM protocol uses 50,000"),
    Param("batch_size", int, 0, "images per batch per process; 0 takes the config's (auto sizes it to GPU memory)"),
    Param("class_balanced", bool, False, "True gives exactly num_samples / classes images per class"),
    Param("seed", int, 0, "global seed: image i depends only on it and i"),
    Param("steps", int, 0, "Euler grid points; 0 takes the config's (250)"),
    Param("cfg", float, 0.0, "guidance scale; 0 takes the config's (6.7, interval 0.125, shift 0.3)"),
    Param("device", str, "", "cpu or cuda; empty means the GPU when there is one"),
    CPU_FALLBACK,
]


def sample_fid() -> nbformat.NotebookNode:
    cells = [
        title_cell("01_sample_fid.ipynb", "# FID-scale sampling (50,000 images), resumable",
                   "Writes `images/{i:06d}.png`, then `samples.npz` in the ADM evaluator's format (`arr_0` uint8 "
                   "N×H×W×3, `arr_1` labels), streamed so 50,000 images never sit in memory. Image i depends only "
                   "on (seed, i) and the batch size, so a notebook that dies (Kaggle's 12-hour limit) resumes "
                   "exactly: run all cells again. On several GPUs one process per GPU (torchrun), byte-identical "
                   "files. `notebooks/03_evaluate.ipynb` reads this notebook's `samples.npz` by default."),
        parameters_cell(SAMPLE_FID_PARAMS),
        setup_cell(SAMPLE_FID_PARAMS, fallback={"config": "tiny", "num_samples": 1000}),
        new_markdown_cell("## Assets and config (steps 2 and 3)"),
        new_code_cell(STEP2_CELL + "\n\nfrom steps import step3_configs\n"
                      "resolved = step3_configs.main(base=config, set=[\"data.fid_reference_file=null\"])\n"
                      "assert Path(resolved[\"config\"].vae.ckpt_path).is_file()"),
        new_markdown_cell("## Sample\nProgress shows images/s; the summary gives NFE per image and peak memory."),
        new_code_cell("from repro import paths\n"
                      "from steps import step4_inference\n"
                      "overrides = ([f\"sample.num_sampling_steps={steps}\"] if steps else []) + "
                      "([f\"sample.cfg_scale={cfg}\"] if cfg else [])\n"
                      "kwargs = dict(config=config, num_samples=num_samples, out=str(paths.runs_path(output_dir)), seed=seed,\n"
                      "              batch_size=batch_size or None, class_balanced=class_balanced,\n"
                      "              set=overrides or None, device=device or None)\n"
                      "run = launch(step4_inference.main, gpus=gpus, **kwargs)\n"
                      "assert Path(run[\"npz\"]).is_file() and run[\"num_samples\"] == num_samples\n"
                      "print(run[\"summary\"])"),
        new_markdown_cell("## Resume\nThe same call again finds every image on disk and only re-checks the "
                          "npz: this is what happens after a kernel restart mid-run (it then samples only "
                          "the missing batches)."),
        new_code_cell("again = launch(step4_inference.main, gpus=gpus, **kwargs)\n"
                      "assert again[\"new_images\"] == 0 and again[\"npz\"] == run[\"npz\"]"),
        new_markdown_cell("## The packed `samples.npz`\nRead through the kit's own npz reader (the evaluation's): "
                          "only the headers, the labels and the first 8 images, never the whole file."),
        new_code_cell("import numpy as np\n"
                      "from repro.data.npz import LABEL_KEY\n"
                      "from repro.evaluation.image_batches import ImageBatches\n"
                      "from repro.sampling import show_samples\n"
                      "packed = ImageBatches.open(run[\"npz\"])\n"
                      "first = next(packed.iter_batches(0, min(8, packed.num_images), 8))\n"
                      "with np.load(run[\"npz\"], mmap_mode=\"r\") as npz:\n"
                      "    labels = np.asarray(npz[LABEL_KEY])\n"
                      "assert packed.num_images == num_samples == len(labels) and first.dtype == np.uint8, packed\n"
                      "counts = np.bincount(labels)\n"
                      "print(f\"arr_0 {packed.num_images} x {packed.height} x {packed.width} x 3 uint8 | class counts \"\n"
                      "      f\"min/max: {counts.min()} {counts.max()}\")\n"
                      "show_figure(show_samples(first, labels[:8], run[\"class_names\"], title=\"first samples\"),\n"
                      "            Path(run[\"out_dir\"]) / \"first_samples.png\")"),
    ]
    return notebook(cells)


NOTEBOOKS = {"00_quickstart.ipynb": quickstart, "01_sample_fid.ipynb": sample_fid}


def main() -> None:
    write_all(NOTEBOOKS)


if __name__ == "__main__":
    main()
