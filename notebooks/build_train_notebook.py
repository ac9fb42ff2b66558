"""Build notebooks/02_train.ipynb with nbformat (no outputs).

    python notebooks/build_train_notebook.py

Edit the cells here, not in the .ipynb file, and rebuild.
"""

from __future__ import annotations


import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell

from nbbuild import find_root_source, notebook, write

FIND_ROOT = find_root_source("step7_train.py", '\nwork = Path(workdir or "runs/nb02_train").resolve()\nprint("kit root:", root, "| work folder:", work)')


def train_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# Train LightningDiT: extract latents → train (two stages) → sample from the EMA\n\n"
            "The whole training path of the kit on a CPU in a minute: a small generated image folder and a "
            "narrow VA-VAE stand in for ImageNet and the official tokenizer, LightningDiT-T/1 for XL/1. The "
            "calls are the ones a real run makes (`configs/train/lightningdit_xl_800ep_stage_{0,1}.yaml` on "
            "ImageNet): every cell can be run again after the kernel dies and continues where it stopped "
            "(finished latent shards are kept, training resumes from its newest checkpoint)."),
        new_code_cell(
            "# Parameters (papermill overrides these)\n"
            'workdir: str = ""  # empty: runs/nb02_train\n'
            "num_classes: int = 4  # generated classes (one shape and colour each)\n"
            "images_per_class: int = 16\n"
            "image_size: int = 64  # 64 px -> 4x4x32 latents\n"
            "stage0_steps: int = 150  # stage 0 (lognorm timesteps) ends here\n"
            "stage1_steps: int = 200  # stage 1 (uniform timesteps) continues to here\n"
            "lr: float = 0.002  # the recipe's 2e-4 is for batch 1024; a tiny run learns faster with more\n"
            "grid_steps: int = 16  # Euler steps for the final sample grid\n"
            "time_budget: float = 0.0  # seconds per training call, 0 for none (Kaggle: stop before 12 h)",
            metadata={"tags": ["parameters"]}),
        new_code_cell(FIND_ROOT),
        new_markdown_cell("## Data: a small image folder and a narrow VA-VAE\n"
                          "One sub-folder per class (sorted names → labels), as ImageNet's train folder."),
        new_code_cell("from repro.data.synthetic import make_demo_images, make_narrow_vavae\n"
                      "images = make_demo_images(work / \"images\", num_classes=num_classes, "
                      "per_class=images_per_class, size=image_size)\n"
                      "vae_path = make_narrow_vavae(work / \"vavae_ch32.safetensors\", ch=32)\n"
                      "assert images[\"num_images\"] == num_classes * images_per_class and vae_path.is_file()"),
        new_markdown_cell("## Step 6: extract latents\nUpstream shard format (`latents`, `latents_flip`, "
                          "`labels`) plus `latents_stats.pt`; a rerun skips finished shards."),
        new_code_cell("from steps import step6_extract\n"
                      "common = [f\"vae.ckpt_path={vae_path}\", f\"data.image_size={image_size}\", "
                      "f\"data.num_classes={num_classes}\"]\n"
                      "report = step6_extract.main(\"configs/train/tiny_stage_0.yaml\", source=str(work / \"images\"),\n"
                      "                            out=str(work / \"latents\"), batch_size=16, shard_size=32, set=common)\n"
                      "assert report[\"num_encoded\"] == num_classes * images_per_class, report"),
        new_markdown_cell("## Step 7, stage 0: lognorm timesteps\nCheckpoints, `log.jsonl` and `loss.png` go to "
                          "`<output_dir>/<exp_name>/` (upstream layout). Run the cell again after an interruption: "
                          "it resumes from the newest complete checkpoint."),
        new_code_cell("from steps import step7_train\n"
                      "train_set = common + [f\"data.data_path={work / 'latents'}\", f\"train.output_dir={work / 'runs'}\",\n"
                      "                      f\"optimizer.lr={lr}\", \"train.log_every=25\", \"train.ckpt_every=50\"]\n"
                      "budget = time_budget or None\n"
                      "stage0 = step7_train.main(\"configs/train/tiny_stage_0.yaml\",\n"
                      "                          set=train_set + [f\"train.max_steps={stage0_steps}\"], time_budget=budget)\n"
                      "assert stage0[\"step\"] == stage0_steps and Path(stage0[\"checkpoint\"]).is_file(), stage0"),
        new_markdown_cell("## Step 7, stage 1: the same run, lognorm off\nThe stage-1 config names the same "
                          "run folder, so it continues stage 0's newest checkpoint (model, EMA, optimizer, step, "
                          "data order)."),
        new_code_cell("stage1 = step7_train.main(\"configs/train/tiny_stage_1.yaml\",\n"
                      "                          set=train_set + [f\"train.max_steps={stage1_steps}\"], time_budget=budget)\n"
                      "assert stage1[\"step\"] == stage1_steps and stage1[\"run_dir\"] == stage0[\"run_dir\"], stage1"),
        new_code_cell("from IPython.display import Image, display\n"
                      "display(Image(filename=str(Path(stage1[\"run_dir\"]) / \"loss.png\")))"),
        new_markdown_cell("## Sample a grid from the EMA weights\nThe kit's sampling engine loads the checkpoint's "
                          "`ema` strictly, samples with Euler and decodes with the VA-VAE."),
        new_code_cell("from repro.config import load_config\n"
                      "from repro.training.grids import grid_from_checkpoint\n"
                      "cfg = load_config(\"configs/train/tiny_stage_1.yaml\", train_set + "
                      "[f\"sample.num_sampling_steps={grid_steps}\"])\n"
                      "grid = grid_from_checkpoint(cfg, stage1[\"checkpoint\"], work / \"ema_grid.png\", n=8)\n"
                      "assert Path(grid[\"grid\"]).is_file() and grid[\"images\"].shape == (8, image_size, image_size, 3)\n"
                      "display(Image(filename=str(grid[\"grid\"])))"),
    ]
    return notebook(cells)


def main() -> None:
    write(train_notebook(), "02_train.ipynb")


if __name__ == "__main__":
    main()
