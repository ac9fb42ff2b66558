"""Notebook 04's check that can tell: a small CNN trained on the real images (per-class recognised share of
samples beside the real held-out share), a feature distance with its real-vs-real floor, the border ring
statistics; the colour sample sets it is benchmarked on; evaluation grids that sample every class."""

from __future__ import annotations

import numpy as np
import pytest

from repro.data.sample_sets import make_sample_set
from repro.evaluation.metrics import kernel_distance
from repro.evaluation.recognition import border_check, folder_images, recognition_check, ring_statistics
from repro.tokenizer_training.data import TokenizerImages


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine two threads spin against each other (3x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_sample_set("textured_shapes", root, size=16, per_class=10, held_out_per_class=3)


def test_sample_sets_write_classes_and_disjoint_held_out(tmp_path, shapes):
    photos = make_sample_set("photo_patches", tmp_path / "p", size=16, per_class=3, held_out_per_class=2)
    assert (photos["num_images"], photos["num_held_out"]) == (12, 8)
    assert photos["classes"] == ["china", "flower", "grace_hopper", "relief"]
    images, labels, names = folder_images(shapes["folder"], 16)
    assert images.shape == (40, 16, 16, 3) and names == sorted(names) and np.bincount(labels).tolist() == [10] * 4
    assert images.std() > 30  # colourful, not blank
    again = make_sample_set("textured_shapes", tmp_path / "s", size=16, per_class=10, held_out_per_class=3)
    assert np.array_equal(folder_images(again["folder"], 16)[0], images)  # seeded: the same set every time


def test_ring_statistics_and_a_bright_frame_is_flagged(shapes):
    real, labels, _ = folder_images(shapes["folder"], 16)
    stats = ring_statistics(real)
    assert stats.shape == (40, 3) and (stats >= 0).all()
    assert border_check(real, labels, real, labels, 4)["ok"]  # real images are inside their own range
    framed = real.copy()
    framed[:, [0, -1]] = 255
    framed[:, :, [0, -1]] = 255
    check = border_check(real, labels, framed, labels, 4)
    assert not check["ok"] and any("ring mean" in p for p in check["problems"])


def test_kernel_distance_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, shifted = kernel_distance(a, b, subset_size=100), kernel_distance(a, b + 1.0, subset_size=100)
    assert abs(same) < 0.05 < shifted


def test_the_check_recognises_real_images_and_tells_a_wrong_class(shapes):
    held, held_labels, names = folder_images(shapes["held_out"], 16)
    right = recognition_check(shapes["folder"], (held, held_labels), 16, steps=30, note=None)
    assert set(right) >= {"recognised", "heldout_accuracy", "per_class", "heldout_per_class", "distance", "border"}
    assert len(right["per_class"]) == 4 and right["distance"]["fd_floor"] is not None
    assert "real held-out" in right["summary"] and names[0] in right["summary"]
    wrong = recognition_check(shapes["folder"], (held, (held_labels + 1) % 4), 16, steps=30, note=None)
    assert wrong["recognised"] < right["recognised"]


def test_one_class_gets_the_distance_alone(tmp_path, shapes):
    import shutil

    one = tmp_path / "one"
    shutil.copytree(f"{shapes['folder']}/ring", one / "ring")
    real, _, _ = folder_images(one, 16)
    check = recognition_check(one, (real[:4], None), 16, steps=20, note=None)
    assert "recognised" not in check and "rotation_accuracy" in check and check["distance"]["fd"] is not None


def test_evaluation_order_takes_the_classes_in_turn(shapes):
    images = TokenizerImages(shapes["folder"], 16, crop="center")
    order = images.class_interleaved()
    assert sorted(order) == list(range(40))
    assert [images.src.items[i].label for i in order[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    _, used = images.centre_crops(limit=4)
    assert {images.src.items[i].label for i in used} == {0, 1, 2, 3}
