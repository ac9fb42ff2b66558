"""Build notebooks/00_quickstart.ipynb and notebooks/01_sample_fid.ipynb with nbformat (no outputs).

    python notebooks/build_sampling_notebooks.py

Edit the cells here, not in the .ipynb files, and rebuild.
"""

from __future__ import annotations


import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell

from nbbuild import find_root_source, notebook, write

FIND_ROOT = find_root_source("step4_inference.py", '\nprint("kit root:", root)')

ASSETS = '["lightningdit-xl-800ep", "vavae-f16d32", "latents-stats"]'


def quickstart() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# LightningDiT quickstart: install → download → configure → sample\n\n"
            "Reproduces the official demo grid of LightningDiT-XL/1 (800 epochs) with the VA-VAE f16d32 "
            "tokenizer: labels 975, 3, 207, 387, 388, 88, 979, 279, CFG 9.0 on every step, no timestep "
            "shift, 250 Euler steps. Works on Kaggle and Colab (GPU: bf16 on Ampere+, fp16 on T4/P100) and "
            "headless under papermill. Each cell calls one step's `main(...)` and checks its result."),
        new_code_cell(
            "# Parameters (papermill overrides these)\n"
            'config: str = "demo"  # preset: demo (official XL/1 demo), tiny (CPU smoke test), lightningdit_xl_800ep\n'
            'profile: str = ""  # step 3 hardware profile: "" = this machine; t4, p100, a100-80gb, h100-80gb, cpu\n'
            'output_dir: str = ""  # "" = runs/demo\n'
            "num_samples: int = 8  # 8 = one per demo label, tiled 2x4\n"
            "steps: int = 250  # Euler grid points (upstream: 250 -> 249 steps)\n"
            "cfg: float = 9.0  # classifier-free guidance scale (demo: 9.0 on every step)\n"
            'device: str = ""  # "" = the GPU when there is one, else cpu\n'
            "install: bool = True  # step 1 pip-installs what is missing (False: report only)",
            metadata={"tags": ["parameters"]}),
        new_code_cell(FIND_ROOT),
        new_markdown_cell("## Step 1: environment\nReports GPU, precision and batch recommendations; "
                          "installs only missing packages, never torch. Writes `runs/env.json`."),
        new_code_cell("from steps import step1_install\n"
                      "env = step1_install.main(dry_run=not install)\n"
                      'assert env["recommended"]["precision"] in ("fp32", "bf16", "fp16"), env["recommended"]'),
        new_markdown_cell("## Step 2: weights\nLightningDiT-XL/1 (800 ep), the VA-VAE and `latents_stats.pt` "
                          "from the Hugging Face Hub, verified by sha256; a killed download resumes."),
        new_code_cell("from steps import step2_download\n"
                      f"assets = step2_download.main(only={ASSETS})\n"
                      f"assert all(Path(assets['assets'][n]['path']).is_file() for n in {ASSETS})"),
        new_markdown_cell("## Step 3: config\nFills the preset's asset paths and `auto` values for this "
                          "machine. The FID reference batch is not needed for sampling, so it stays unset here."),
        new_code_cell("from steps import step3_configs\n"
                      "resolved = step3_configs.main(base=config, set=[\"data.fid_reference_file=null\"],\n"
                      "                              profile=profile or None)\n"
                      "assert Path(resolved[\"path\"]).is_file() and Path(resolved[\"config\"].ckpt_path).is_file()"),
        new_markdown_cell("## Step 4: the demo grid\nRun the cell again after an interruption: it finishes only "
                          "the missing images."),
        new_code_cell("from steps import step4_inference\n"
                      "demo = step4_inference.main(config=config, demo=True, num_samples=num_samples,\n"
                      "                            out=output_dir or None, device=device or None,\n"
                      "                            set=[f\"sample.num_sampling_steps={steps}\", f\"sample.cfg_scale={cfg}\"])\n"
                      "assert Path(demo[\"grid\"]).is_file() and demo[\"num_samples\"] == num_samples\n"
                      "print(demo[\"summary\"])"),
        new_code_cell("from IPython.display import Image, display\n"
                      "from repro.sampling import load_images, show_samples\n"
                      "display(Image(filename=demo[\"grid\"]))\n"
                      "images = load_images([Path(demo[\"images_dir\"]) / f\"{i:06d}.png\" for i in range(num_samples)])\n"
                      "fig = show_samples(images, demo[\"labels\"], title=\"LightningDiT samples\")\n"
                      "display(fig)"),
    ]
    return notebook(cells)


def sample_fid() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# FID-scale sampling (50,000 images), resumable\n\n"
            "Writes `images/{i:06d}.png`, then `samples.npz` in the ADM evaluator's format (`arr_0` uint8 "
            "N×H×W×3, `arr_1` labels), streamed so 50,000 images never sit in memory. Image i depends only on "
            "(seed, i) and the batch size, so a notebook that dies (Kaggle's 12-hour limit) resumes exactly: "
            "run all cells again. The same settings under `torchrun --nproc_per_node=K -m steps.step4_inference` "
            "give byte-identical files."),
        new_code_cell(
            "# Parameters (papermill overrides these)\n"
            'config: str = "lightningdit_xl_800ep"  # preset (official FID 1.35 settings), or tiny for a CPU smoke run\n'
            'output_dir: str = ""  # "" = runs/samples/<settings>\n'
            "num_samples: int = 50000  # the ADM protocol uses 50,000\n"
            "batch_size: int = 0  # images per batch; 0 = the config's (auto = from free GPU memory)\n"
            "class_balanced: bool = False  # True: exactly num_samples / 1000 per class (recent papers' protocol)\n"
            "seed: int = 0\n"
            "steps: int = 0  # 0 = the config's (250)\n"
            "cfg: float = 0.0  # 0 = the config's (6.7 with interval 0.125 and shift 0.3)\n"
            'device: str = ""  # "" = the GPU when there is one, else cpu',
            metadata={"tags": ["parameters"]}),
        new_code_cell(FIND_ROOT),
        new_markdown_cell("## Assets and config (steps 2 and 3)"),
        new_code_cell("from steps import step2_download, step3_configs\n"
                      f"assets = step2_download.main(only={ASSETS})\n"
                      "resolved = step3_configs.main(base=config, set=[\"data.fid_reference_file=null\"])\n"
                      "cfg_resolved = resolved[\"config\"]\n"
                      "assert Path(cfg_resolved.vae.ckpt_path).is_file()"),
        new_markdown_cell("## Sample\nProgress shows images/s; the summary gives NFE per image and peak memory."),
        new_code_cell("from steps import step4_inference\n"
                      "overrides = ([f\"sample.num_sampling_steps={steps}\"] if steps else []) + "
                      "([f\"sample.cfg_scale={cfg}\"] if cfg else [])\n"
                      "kwargs = dict(config=config, num_samples=num_samples, out=output_dir or None, seed=seed,\n"
                      "              batch_size=batch_size or None, class_balanced=class_balanced,\n"
                      "              set=overrides or None, device=device or None)\n"
                      "run = step4_inference.main(**kwargs)\n"
                      "assert Path(run[\"npz\"]).is_file() and run[\"num_samples\"] == num_samples\n"
                      "print(run[\"summary\"])"),
        new_markdown_cell("## Resume\nThe same call again finds every image on disk and only re-checks the "
                          "npz: this is what happens after a kernel restart mid-run (it then samples only "
                          "the missing batches)."),
        new_code_cell("again = step4_inference.main(**kwargs)\n"
                      "assert again[\"new_images\"] == 0 and again[\"npz\"] == run[\"npz\"]"),
        new_markdown_cell("## The packed `samples.npz`\nRead lazily: only the header and a few images."),
        new_code_cell("import zipfile\n"
                      "import numpy as np\n"
                      "from IPython.display import display\n"
                      "from repro.sampling import show_samples\n"
                      "with np.load(run[\"npz\"], mmap_mode=\"r\") as npz:\n"
                      "    labels = npz[\"arr_1\"]\n"
                      "    with zipfile.ZipFile(run[\"npz\"]) as zf, zf.open(\"arr_0.npy\") as f:\n"
                      "        assert np.lib.format.read_magic(f) == (1, 0)\n"
                      "        shape, _, dtype = np.lib.format.read_array_header_1_0(f)\n"
                      "        first = np.frombuffer(f.read(8 * int(np.prod(shape[1:]))), dtype).reshape(-1, *shape[1:])\n"
                      "assert shape[0] == num_samples and shape[3] == 3 and dtype == np.uint8, (shape, dtype)\n"
                      "print(\"arr_0\", shape, dtype, \"| class counts min/max:\", np.bincount(labels).min(), np.bincount(labels).max())\n"
                      "display(show_samples(first, labels[:8], title=\"first samples\"))"),
    ]
    return notebook(cells)


def main() -> None:
    for name, build in (("00_quickstart.ipynb", quickstart), ("01_sample_fid.ipynb", sample_fid)):
        write(build(), name)


if __name__ == "__main__":
    main()
