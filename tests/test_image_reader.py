"""The one image reader (repro.data.image_loader): the same pixels as ADM's centre crop, offset squares as the
tokenizer's random crops, unreadable files named; and the file-value markers of repro.paths."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from repro import paths
from repro.data.image_loader import read_file_square, read_square, read_squares
from repro.data.image_sources import ImageLoadError, list_images
from repro.errors import ConfigError
from repro.tokenizer.images import center_crop_arr, resize_short_side, square_crop
from repro.training.step import lr_factor


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls, sizes in (("a", [(40, 30), (16, 16)]), ("b", [(20, 64)])):
        (tmp_path / cls).mkdir()
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / cls / f"{k}.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return tmp_path


def test_read_square_is_adm_centre_crop_and_offsets_move_the_square(folder):
    src = list_images(folder)
    image, label = read_square(src, 0, 16)
    raw, raw_label = src.load(0)
    assert label == raw_label == 0
    assert np.array_equal(np.asarray(image), np.asarray(center_crop_arr(raw, 16)))
    resized = np.asarray(resize_short_side(raw, 16))  # 40x30 -> 21x16: five columns to choose from
    assert resized.shape == (16, 21, 3)
    u = torch.tensor([0.99, 0.0])
    right = np.asarray(read_square(src, 0, 16, offset=(u[0], u[1]))[0])
    assert np.array_equal(right, resized[:, 5:21]) and np.array_equal(np.asarray(square_crop(raw, 16)), resized[:, 2:18])
    assert np.array_equal(read_file_square(src.items[0].ref, 16), np.asarray(image))


def test_unreadable_images_are_named_and_counted(folder):
    src = list_images(folder)
    bad = next(i for i, item in enumerate(src.items) if item.ref.endswith("broken.jpg"))
    with pytest.raises(ImageLoadError) as info:
        read_square(src, bad, 16)
    err = info.value
    assert err.ref.endswith("broken.jpg") and err.named.startswith(err.ref + ": ") and "broken" not in str(err)
    again = pickle.loads(pickle.dumps(err))  # DataLoader workers send it across processes
    assert (again.ref, str(again)) == (err.ref, str(err))
    with pytest.raises(ImageLoadError, match="FileNotFoundError") as missing:
        read_file_square(folder / "gone.png", 16)
    assert missing.value.ref.endswith("gone.png")
    notes = []
    images, labels, skipped = read_squares(src, 8, what="test", note=notes.append)
    assert len(images) == 3 and labels == [0, 0, 1] and len(skipped) == 1
    assert len(notes) == 1 and "1 unreadable" in notes[0] and "broken.jpg" in notes[0]


def test_file_values_resolve_through_repro_paths(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    paths.assets_json().parent.mkdir(parents=True, exist_ok=True)
    paths.assets_json().write_text(json.dumps({"assets": {"lpips": {"path": str(weights)}, "gone": {"path": "no.pt"}}}))
    assert paths.resolve_file_value("asset:lpips", "loss.lpips_trunk") == weights.absolute()
    assert paths.resolve_file_value("asset:gone", "k") is None and paths.resolve_file_value("", "k") is None
    assert paths.resolve_file_value("runs:x/y.pt", "k") == paths.runs_dir().resolve() / "x" / "y.pt"
    assert paths.resolve_file_value("plain.pt", "k") == paths.runs_path("plain.pt")
    with pytest.raises(ConfigError, match="config key 'k' is 'asset-dir:d': name a file"):
        paths.resolve_file_value("asset-dir:d", "k")
    assert paths.asset_name("asset:lpips") == "lpips" and paths.asset_name("asset-dir:d") is None


def test_lr_factor_warms_up_then_decays():
    assert lr_factor(1, 10, 4, "constant") == 0.25 and lr_factor(8, 10, 4, "constant") == 1.0
    assert lr_factor(1, 10, 0, "cosine") == 1.0 and lr_factor(11, 10, 0, "cosine") == pytest.approx(0.0)
