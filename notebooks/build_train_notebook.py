"""Build notebooks/02_train.ipynb with nbformat (no outputs).

    python notebooks/build_all.py            # every notebook (or: python notebooks/build_train_notebook.py)

Edit the cells here, not in the .ipynb file, and rebuild.
"""

from __future__ import annotations

import nbformat

from nbbuild import Param, new_code_cell, new_markdown_cell, notebook, parameters_cell, setup_cell, title_cell, write_all


def train_notebook() -> nbformat.NotebookNode:
    cells = [
        title_cell("02_train.ipynb", "# Train LightningDiT: extract latents → train (two stages) → sample from the EMA",
                   "The whole training path of the kit on a CPU in a few minutes, offline: a small generated image "
                   "folder (one coloured shape per class) and a narrow VA-VAE stand in for ImageNet and the official "
                   "tokenizer, LightningDiT-T/1 for XL/1. The calls are the ones a real run makes "
                   "(`configs/train/lightningdit_xl_800ep_stage_{0,1}.yaml` on ImageNet). Finished latent shards "
                   "are kept and training resumes from its newest checkpoint; with `time_budget` each training "
                   "call saves and stops in time, and the next run of the notebook continues."),
        parameters_cell([
            Param("num_classes", int, 4, "generated classes, one shape and colour each"),
            Param("images_per_class", int, 16, "generated images per class"),
            Param("image_size", int, 64, "64 px gives 4x4x32 latents"),
            Param("stage0_steps", int, 150, "stage 0 (lognorm timesteps) ends at this step"),
            Param("stage1_steps", int, 200, "stage 1 (uniform timesteps) continues to this step"),
            Param("lr", float, 0.002, "the recipe's 2e-4 is for batch 1024; a tiny run learns faster with more"),
            Param("grid_steps", int, 16, "Euler steps for the final sample grid"),
            Param("time_budget", float, 0.0, "seconds per training call, 0 for none (Kaggle: stop before 12 h)"),
        ]),
        setup_cell(),
        new_markdown_cell("## Data: a small image folder and a narrow VA-VAE\n"
                          "One sub-folder per class (sorted names → labels), as ImageNet's train folder. "
                          "Everything of this notebook goes to `train_demo/` in the work folder; the training run "
                          "to `runs/tiny_two_stage/`."),
        new_code_cell("from repro.data.synthetic import make_demo_images, make_narrow_vavae\n"
                      "data = env.root / \"train_demo\"\n"
                      "images = make_demo_images(data / \"images\", num_classes=num_classes, "
                      "per_class=images_per_class, size=image_size)\n"
                      "vae_path = make_narrow_vavae(data / \"vavae_ch32.safetensors\", ch=32)\n"
                      "assert images[\"num_images\"] == num_classes * images_per_class and vae_path.is_file()"),
        new_markdown_cell("## Step 6: extract latents\nUpstream shard format (`latents`, `latents_flip`, "
                          "`labels`) plus `latents_stats.pt`; a rerun skips finished shards."),
        new_code_cell("from steps import step6_extract\n"
                      "from repro.resources import find_config\n"
                      "stage0_config = str(find_config(\"train/tiny_stage_0\"))\n"
                      "stage1_config = str(find_config(\"train/tiny_stage_1\"))\n"
                      "common = [f\"vae.ckpt_path={vae_path}\", f\"data.image_size={image_size}\", "
                      "f\"data.num_classes={num_classes}\"]\n"
                      "report = step6_extract.main(stage0_config, source=str(data / \"images\"),\n"
                      "                            out=str(data / \"latents\"), batch_size=16, shard_size=32, set=common)\n"
                      "assert report[\"num_encoded\"] == num_classes * images_per_class, report"),
        new_markdown_cell("## Step 7, stage 0: lognorm timesteps\nCheckpoints, `log.jsonl` and `loss.png` go to "
                          "`runs/tiny_two_stage/` (upstream layout). On several GPUs one process per GPU "
                          "(torchrun). Run the cell again after an interruption: it resumes from the newest "
                          "complete checkpoint, or says there is nothing to do."),
        new_code_cell("from steps import step7_train\n"
                      "train_set = common + [f\"data.data_path={data / 'latents'}\", f\"train.output_dir={env.runs}\",\n"
                      "                      f\"optimizer.lr={lr}\", \"train.log_every=25\", \"train.ckpt_every=50\"]\n"
                      "budget = time_budget or None\n"
                      "stage0 = launch(step7_train.main, gpus=gpus, config=stage0_config,\n"
                      "                set=train_set + [f\"train.max_steps={stage0_steps}\"], time_budget=budget)\n"
                      "stage0_done = stage0[\"step\"] >= stage0_steps\n"
                      "if stage0_done:\n"
                      "    print(f\"stage 0 done: step {stage0['step']} ({stage0['stopped']}), checkpoint {stage0['checkpoint']}\")\n"
                      "else:\n"
                      "    print(f\"stage 0 stopped by the time budget at step {stage0['step']} of {stage0_steps}: \"\n"
                      "          \"run the notebook again to continue (stage 1 waits for it)\")"),
        new_markdown_cell("## Step 7, stage 1: the same run, lognorm off\nThe stage-1 config names the same "
                          "run folder, so it continues stage 0's newest checkpoint (model, EMA, optimizer, step, "
                          "data order). It starts only once stage 0 has finished."),
        new_code_cell("stage1 = None\n"
                      "if stage0_done:\n"
                      "    stage1 = launch(step7_train.main, gpus=gpus, config=stage1_config,\n"
                      "                    set=train_set + [f\"train.max_steps={stage1_steps}\"], time_budget=budget)\n"
                      "    assert stage1[\"run_dir\"] == stage0[\"run_dir\"], stage1\n"
                      "    if stage1[\"step\"] >= stage1_steps:\n"
                      "        print(f\"stage 1 done: step {stage1['step']} ({stage1['stopped']})\")\n"
                      "    else:\n"
                      "        print(f\"stage 1 stopped by the time budget at step {stage1['step']} of {stage1_steps}: \"\n"
                      "              \"run the notebook again to continue\")\n"
                      "latest = stage1 or stage0\n"
                      "loss_png = Path(latest[\"run_dir\"]) / \"loss.png\"\n"
                      "if loss_png.is_file():\n"
                      "    show_image(loss_png)"),
        new_markdown_cell("## Sample a grid from the EMA weights\nThe kit's sampling engine loads the newest "
                          "checkpoint's `ema` strictly, samples with Euler and decodes with the VA-VAE."),
        new_code_cell("from repro.config import load_config\n"
                      "from repro.training.grids import grid_from_checkpoint\n"
                      "if latest[\"checkpoint\"] is None:\n"
                      "    print(\"no checkpoint yet (the time budget ended before the first save): run the notebook again\")\n"
                      "else:\n"
                      "    cfg = load_config(stage1_config, train_set + [f\"sample.num_sampling_steps={grid_steps}\"])\n"
                      "    grid = grid_from_checkpoint(cfg, latest[\"checkpoint\"], Path(latest[\"run_dir\"]) / \"ema_grid.png\", n=8)\n"
                      "    assert Path(grid[\"grid\"]).is_file() and grid[\"images\"].shape == (8, image_size, image_size, 3)\n"
                      "    print(f\"EMA samples at step {latest['step']}:\")\n"
                      "    show_image(grid[\"grid\"])"),
    ]
    return notebook(cells)


NOTEBOOKS = {"02_train.ipynb": train_notebook}


def main() -> None:
    write_all(NOTEBOOKS)


if __name__ == "__main__":
    main()
