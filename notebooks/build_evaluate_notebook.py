"""Build notebooks/03_evaluate.ipynb with nbformat (no outputs).

    python notebooks/build_all.py            # every notebook (or: python notebooks/build_evaluate_notebook.py)

Edit the cells here, not in the .ipynb file, and rebuild.
"""

from __future__ import annotations

import nbformat

from build_sampling_notebooks import FID_OUTPUT
from nbbuild import Param, new_code_cell, new_markdown_cell, notebook, parameters_cell, setup_cell, title_cell, write_all

INTRO = """\
The paper's numbers for LightningDiT come from OpenAI's ADM evaluator (TensorFlow) run on 50,000
samples against the reference batch `VIRTUAL_imagenet256_labeled.npz`. This notebook computes the
same five numbers in PyTorch, on the GPU when there is one, without TensorFlow:

| metric | Inception feature | compared with |
|---|---|---|
| FID | `pool_3` (2048-d) | the reference npz's precomputed `mu`, `sigma` |
| sFID | `mixed_6/conv`, first 7 channels, 7×17×17 = 2023-d | `mu_s`, `sigma_s` |
| IS | softmax of the unbiased logits (1008 classes), chunks of 5,000 | — |
| Precision / Recall | `pool_3`, k = 3 nearest neighbours | the reference batch's 10,000 images |

By default it evaluates what `notebooks/01_sample_fid.ipynb` wrote in the same work folder. The network
is torch-fidelity's TF-faithful Inception-v3 with the 2015-12-05 weights; step 2 fetches them and the
reference batch when they are not given. The same step runs from a terminal:

```
python -m steps.step8_evaluate --samples runs/fid/samples.npz
torchrun --nproc_per_node=4 -m steps.step8_evaluate --samples runs/fid/samples.npz
```"""


def evaluate_notebook() -> nbformat.NotebookNode:
    cells = [
        title_cell("03_evaluate.ipynb", "# Step 8: evaluate samples with the ADM protocol (FID, sFID, IS, precision, recall)",
                   INTRO),
        parameters_cell([
            Param("samples", str, f"{FID_OUTPUT}/samples.npz", "npz (arr_0 uint8 N x H x W x 3) or a PNG folder; notebook 01 writes runs:fid/samples.npz"),
            Param("ref", str, "", "ADM reference batch npz; empty fetches it with step 2 (VIRTUAL_imagenet256_labeled.npz)"),
            Param("weights", str, "", "torch-fidelity Inception weights file; empty fetches it with step 2"),
            Param("metrics", str, "fid,sfid,is,prec,recall", "comma-separated metric names"),
            Param("batch_size", int, 100, "images per forward pass per process"),
            Param("out", str, "", "metrics.json path; empty writes it next to the samples"),
            Param("device", str, "", "cpu or cuda; empty means the GPU when there is one"),
        ]),
        setup_cell(),
        new_markdown_cell("## Inputs\nThe samples (notebook 01's by default), and the reference batch and Inception "
                          "weights from step 2 unless given: files already downloaded are verified and reused."),
        new_code_cell("from repro import paths\n"
                      "from repro.errors import ReproError\n"
                      "from steps import step2_download\n"
                      "if not paths.runs_path(samples).exists():\n"
                      "    raise ReproError(f\"samples {paths.runs_path(samples)} not found: run notebooks/01_sample_fid.ipynb \"\n"
                      "                     \"with the same workdir first, or set samples\")\n"
                      "wanted = [name for name, given in ((\"adm-ref-imagenet256\", ref), (\"fid-inception\", weights)) if not given]\n"
                      "if wanted:\n"
                      "    step2_download.main(only=wanted)"),
        new_markdown_cell("Extract the Inception features of every sample (streamed in batches), reuse the cached "
                          "features of the reference images (computed once, stored next to the reference file), "
                          "compute the metrics and write `metrics.json` with the hashes of the weights and the "
                          "reference, the sample count and the sampler settings of the run's `config.yaml`. On "
                          "several GPUs one process per GPU (torchrun)."),
        new_code_cell("from steps import step8_evaluate\n"
                      "result = launch(step8_evaluate.main, gpus=gpus, samples=samples, ref=ref or None, metrics=metrics,\n"
                      "                weights=weights or None, batch_size=batch_size, out=out or None, device=device or None)"),
        new_markdown_cell("## Next to the paper\n\nLightningDiT-XL/1 with VA-VAE, ImageNet 256×256, classifier-free "
                          "guidance, 50,000 samples (Yao et al., CVPR 2025, system-level comparison). Numbers from "
                          "fewer samples are not comparable: FID is biased upward when N < 50,000."),
        new_code_cell("from repro.evaluation.evaluate import compare_to_paper\n"
                      "print(compare_to_paper(result))"),
        new_markdown_cell("Where the numbers can differ from the TensorFlow evaluator: the ADM evaluator computes the "
                          "precision/recall distances in float16 (falling back to float32), this kit in float32, "
                          "which can flip near-ties; TF32 is switched off during feature extraction so the network "
                          "runs in true float32."),
        new_code_cell("import math\n"
                      "assert all(math.isfinite(result[m]) for m in metrics.split(\",\")), result\n"
                      "print(result[\"metrics_json\"])"),
    ]
    return notebook(cells)


NOTEBOOKS = {"03_evaluate.ipynb": evaluate_notebook}


def main() -> None:
    write_all(NOTEBOOKS)


if __name__ == "__main__":
    main()
