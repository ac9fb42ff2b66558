"""Labels as ImageNet names or ids (did-you-mean on a typo), step 4's --labels/--class-names, and figures
titled with names: what a newcomer typing `--labels "golden retriever" "tabby cat"` meets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.data.class_names import imagenet_class_names, names_for, resolve_labels
from repro.errors import ReproError
from repro.sampling.grid import show_samples

IMAGENET = "ImageNet's 1000 class names"


def test_imagenet_names_and_ids_resolve():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[281] == "tabby"
    got = resolve_labels(["golden retriever", "tabby cat", 207, "388", "Golden_Retriever", "  TIGER cat "],
                         names, IMAGENET)
    assert got == [207, 281, 207, 388, 207, 282]  # "tabby cat": ImageNet's "tabby"; "tiger cat" is not "tiger"
    assert resolve_labels([torch.tensor(5)], names) == [5]


def test_typo_gets_did_you_mean_naming_the_closest_classes():
    names = imagenet_class_names()
    with pytest.raises(ReproError) as err:
        resolve_labels(["goldn retriever"], names, IMAGENET)
    msg = str(err.value)
    assert "'goldn retriever' is not a class name" in msg and "did you mean 'golden retriever' (207)" in msg
    assert IMAGENET in msg and "\n" not in msg
    with pytest.raises(ReproError, match=r"did you mean .*'tiger cat' \(282\).*'Persian cat' \(283\)"):
        resolve_labels(["cat"], names, IMAGENET)


def test_names_need_a_list_and_duplicates_need_an_id(tmp_path):
    names, why = names_for(10, None)
    assert names is None and "10 classes have no names" in why
    with pytest.raises(ReproError, match=r"label 'zebra' is a name, but this config's 10 classes have no names"
                                         r".*--class-names"):
        resolve_labels(["zebra"], names, why)
    with pytest.raises(ReproError, match=r"'crane' names 2 classes .*\('crane' \(0\), 'crane' \(2\)\); give the id"):
        resolve_labels(["crane"], ["crane", "heron", "crane"], "--class-names")
    listed = tmp_path / "names.txt"
    listed.write_text("cat\ndog\n\nzebra finch\n")
    names, source = names_for(3, None, [str(listed)])
    assert names == ["cat", "dog", "zebra finch"] and str(listed) in source
    with pytest.raises(ReproError, match=r"names.txt: 3 class name\(s\) but data.num_classes is 4"):
        names_for(4, None, str(listed))
    report = tmp_path / "latents"
    report.mkdir()
    (report / "extract_report.json").write_text(json.dumps({"class_names": ["ant", "bee"]}))
    assert names_for(2, report)[0] == ["ant", "bee"]
    assert names_for(1000, report)[0][207] == "golden retriever"  # another folder's record: ImageNet's 1000


def test_demo_figure_is_titled_with_names():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    fig = show_samples(images, [207, 281, 1], imagenet_class_names())
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["207: golden retriever", "281: tabby", "1: goldfish"]
    assert [ax.get_title() for ax in show_samples(images, [0, 1, 2]).axes[:3]] == ["class 0", "class 1", "class 2"]


@pytest.fixture
def imagenet_tiny(tmp_path):
    """configs/tiny.yaml with 1000 classes: a seeded LightningDiT-T/1 whose label table has ImageNet's size."""
    from repro.data import synthetic
    from repro.models.lightningdit import create_model

    spec = synthetic.TINY_DIT
    torch.manual_seed(0)
    model = create_model(spec["name"], input_size=spec["input_size"], in_channels=spec["in_channels"],
                         num_classes=1000, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    ckpt = tmp_path / "tiny1000.pt"
    torch.save({"ema": model.state_dict()}, ckpt)
    return ["--config", "tiny", "--num-samples", "2", "--no-progress", "--out", str(tmp_path / "out"),
            "--set", "data.num_classes=1000", f"ckpt_path={ckpt}", "sample.num_sampling_steps=2"]


def test_step4_labels_by_name_and_id(imagenet_tiny, capsys, monkeypatch):
    import repro.sampling.run as run
    from steps.step4_inference import cli

    titled = []
    real = run.save_preview
    monkeypatch.setattr(run, "save_preview", lambda *a, **k: (titled.append((a[1], k["class_names"])), real(*a, **k))[1])
    res = cli([*imagenet_tiny, "--labels", "golden retriever", "207"])
    assert res["labels"] == [207, 207] and Path(res["preview"]).is_file()
    assert "labels: 207 golden retriever, 207 golden retriever" in capsys.readouterr().out
    (labels, names), = titled
    assert [names[i] for i in labels] == ["golden retriever", "golden retriever"]


def test_step4_typo_is_one_line_did_you_mean(imagenet_tiny, capsys):
    from steps.step4_inference import cli

    with pytest.raises(SystemExit) as exc:
        cli([*imagenet_tiny, "--labels", "tabby cat", "golden retreiver"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: label 'golden retreiver' is not a class name")
    assert "did you mean 'golden retriever' (207)" in err[-1]


def test_step4_class_names_flag_names_own_classes(tmp_path, capsys):
    from steps.step4_inference import cli

    names = [f"flower {c}" for c in "abcdefghij"]
    res = cli(["--config", "tiny", "--num-samples", "2", "--no-progress", "--out", str(tmp_path / "out"),
               "--set", "sample.num_sampling_steps=2", "--labels", "flower c", "9", "--class-names", *names])
    assert res["labels"] == [2, 9] and res["class_names"] == names
    assert "labels: 2 flower c, 9 flower j" in capsys.readouterr().out
