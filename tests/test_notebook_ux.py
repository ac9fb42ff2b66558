"""What a notebook user touches: Colab forms that papermill still reads, the GPU runtime the notebooks ask
for, the first cell on a runtime without a GPU (how to get one, a run that finishes in minutes), a foreign
`repro` package refused, notebook 00's rough edges (the preset's steps, one summary, step 3 once, no FID-50K
estimate for a demo grid, step 3's profile honoured by step 4) and its class explorer, pressed headless."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from repro.errors import ReproError
from repro.setup.notebook import GPU_HOWTO, gpu_check
from tests.conftest import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
sys.path.insert(0, str(NOTEBOOKS))
import nbbuild  # noqa: E402


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


# ---------------------------------------------------------------------------------------------
# Forms, metadata, the first cell


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_colab_form_fields_are_what_papermill_help_lists_with_types(path):
    nb = read(path)
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    assert nb.metadata["kaggle"]["accelerator"] == "nvidiaTeslaT4" and nb.metadata["kaggle"]["isInternetEnabled"]
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source.startswith("# @title ")
    fields = re.findall(r"^(\w+): (str|int|float|bool) = .*  # @param (.+)$", cell.source, re.M)
    assigned = re.findall(r"^(\w+)\s*:", cell.source, re.M)
    assert fields and [f[0] for f in fields] == assigned, "every parameter is a form field"
    helped = re.findall(r"^# @markdown `(\w+)`: \S", cell.source, re.M)
    assert helped == assigned, "every form field has its help line"
    listed = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for name, type_name, _ in fields:
        assert re.search(rf"^\s+{name}: {type_name} \(default ", listed.stdout, re.M), (name, listed.stdout)


def test_help_may_hold_hash_and_equals_but_a_default_may_not():
    line = nbbuild._literal(nbbuild.Param("n", int, 3, "number of images (#) per row, n = 3 tiles 3 per row"))
    assert line.splitlines()[1] == 'n: int = 3  # @param {type:"integer"}'
    with pytest.raises(ValueError, match="'=' or '#' in a default"):
        nbbuild._literal(nbbuild.Param("s", str, "a#b", "help"))
    with pytest.raises(ValueError, match="hold the default"):
        nbbuild._literal(nbbuild.Param("s", str, "x", "help", choices=("a", "b")))


def test_without_a_gpu_the_first_cell_says_how_to_get_one_and_falls_back_only_from_defaults(capsys):
    values, defaults, fallback = {"config": "demo", "steps": 0}, {"config": "demo", "steps": 0}, {"config": "tiny"}
    assert gpu_check("colab", values, defaults, fallback, gpu=True) == values
    assert capsys.readouterr().out == ""
    assert gpu_check("colab", values, defaults, fallback, gpu=False) == {"config": "tiny", "steps": 0}
    out = capsys.readouterr().out
    assert "Runtime -> Change runtime type -> Hardware accelerator: T4 GPU" in out and "config='tiny'" in out
    gpu_check("kaggle", {"config": "lightningdit_xl_800ep"}, {"config": "demo"}, fallback, gpu=False)
    out = capsys.readouterr().out
    assert GPU_HOWTO["kaggle"] in out and "Internet on" in out and "the values you set are kept" in out


def test_setup_cell_refuses_a_foreign_package_named_repro(tmp_path):
    (tmp_path / "repro").mkdir()
    (tmp_path / "repro" / "__init__.py").write_text('"""someone else\'s repro"""\n')
    code = f"kit_source = 'unused'\nworkdir = {str(tmp_path / 'w')!r}\ndrive_mount = False\n" + nbbuild.SETUP
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is not this kit (it has no repro.KIT_SOURCE): pip uninstall it" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Notebook 00 under papermill on this CPU: the defaults fall back to tiny


def test_quickstart_defaults_on_a_cpu(tmp_path, monkeypatch, python3_kernel):
    import papermill

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any download attempt fails
    out_nb = tmp_path / "00.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "00_quickstart.ipynb"), str(out_nb), kernel_name=python3_kernel,
                               parameters=dict(workdir=str(tmp_path / "work"), install=False, profile="t4"),
                               cwd=str(PROJECT_ROOT), progress_bar=False)
    text = "".join(o.get("text", "") for c in read(out_nb).cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o["output_type"] == "stream")
    assert "no GPU on this runtime" in text and "this run uses config='tiny'" in text  # said, then done
    assert "7 NFE per image" in text  # the preset's 8 grid points, not the demo's 250
    assert text.count("8 images (8 new)") == 1  # the summary once
    assert "50,000" not in text  # no FID-50K estimate for a demo grid
    assert text.count("wrote: ") >= 1 and text.count("tiny.resolved.yaml\n") == 1  # step 3 ran once
    assert "running step 3" not in text and "used as written, step 3 is not run again" in text
    assert "explorer: no notebook frontend here" in text


# ---------------------------------------------------------------------------------------------
# Step 3's profile reaches step 4; the explorer's button, headless


@pytest.fixture
def tiny_resolved(monkeypatch):
    from steps import step3_configs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def resolve(*sets: str, profile=None) -> str:
        return str(step3_configs.main(config="tiny", set=["data.fid_reference_file=null", *sets],
                                      profile=profile)["path"])
    return resolve


def test_step4_samples_with_step3s_profile(tiny_resolved, tmp_path, capsys):
    from steps import step4_inference

    path = tiny_resolved("sample.per_proc_batch_size=auto", "sample.precision=auto", profile="t4")
    planned = yaml.safe_load(Path(path).read_text())["sample"]
    assert (planned["per_proc_batch_size"], planned["precision"]) == (32, "fp16")  # a T4's plan, not this CPU's 4, fp32
    run = step4_inference.main(config=path, demo=True, num_samples=2, out=str(tmp_path / "d"), device="cpu",
                               set=["sample.num_sampling_steps=2", "sample.precision=fp32"], progress=False)
    assert run["batch_size"] == 32  # sampled with step 3's file (fp16 does not run on this CPU: fp32 set here)
    assert "used as written" in capsys.readouterr().out
    assert yaml.safe_load(Path(path).read_text())["sample"] == planned  # step 4 did not overwrite step 3's file


def test_explorer_button_draws_a_grid_of_the_typed_class(tiny_resolved, capsys):
    from PIL import Image

    from repro.explorer import build_explorer, class_choices, draw_grid, explorer

    path = tiny_resolved()
    choices = class_choices(path)
    assert choices == [str(i) for i in range(10)]  # the tiny model's classes have no names: their ids
    result = draw_grid(path, "3", guidance=2.0, steps=3, seed=1, device="cpu", show=False)
    assert result["labels"] == [3] * 4 and Image.open(result["grid"]).size == (256, 64)  # 1 x 4
    ui = build_explorer(path, choices, class_name="7", steps=3, device="cpu")
    box, scale, points, seed, button, _ = ui.children
    seed.value = 5
    button.click()  # the real widget's click: its handler draws
    record = yaml.safe_load((Path(result["out_dir"]) / "config.yaml").read_text())
    assert record["sample"]["num_sampling_steps"] == 3 and record["sample"]["cfg_scale"] == 4.0
    box.value = "twelve"
    assert ui.draw() is None and "error: " in capsys.readouterr().out  # a bad class: one line, no traceback
    with pytest.raises(ReproError, match="at least 2 points"):
        draw_grid(path, "3", guidance=2.0, steps=1, seed=1, show=False)
    assert explorer(path) is None and "no notebook frontend here" in capsys.readouterr().out
