"""Step 6 decodes and crops images in DataLoader worker processes with the same output: byte-identical
shards and the same report (corrupt files included) as the serial path of tests/test_extract.py."""

from __future__ import annotations

import json

import pytest
import torch

from repro.data.extract import extract_latents
from repro.data.image_loader import cropped_batches
from repro.data.image_sources import list_images
from repro.errors import ReproError
from tests.test_extract import BATCH, SHARD_SIZE, _shard_bytes, kit  # noqa: F401 (the fixture)


def test_parallel_decoding_writes_byte_identical_shards(kit, tmp_path):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run (convolution rounding depends on the thread count)
    try:
        report = extract_latents(kit["vae"], kit["images"], tmp_path, image_size=64, batch_size=BATCH,
                                 shard_size=SHARD_SIZE, seed=0, stats_subset=16, workers=2)
    finally:
        torch.set_num_threads(threads)
    assert _shard_bytes(tmp_path) == _shard_bytes(kit["ref"])
    assert (tmp_path / "latents_stats.pt").read_bytes() == (kit["ref"] / "latents_stats.pt").read_bytes()
    ref = json.loads((kit["ref"] / "extract_report.json").read_text())
    assert {k: v for k, v in report.items() if k not in ("out_dir", "stats_path")} == \
        {k: v for k, v in ref.items() if k not in ("out_dir", "stats_path")}
    assert report["num_corrupt"] == 1  # the truncated JPEG, recorded the same way


def test_batches_keep_the_serial_boundaries_and_order(kit):  # noqa: F811
    src = list_images(kit["images"])
    serial = list(cropped_batches(src, 2, 19, image_size=64, batch_size=4, workers=0))
    parallel = list(cropped_batches(src, 2, 19, image_size=64, batch_size=4, workers=2))
    assert len(serial) == len(parallel) == 5  # [2, 6), [6, 10), ..., [18, 19)
    for (im_a, idx_a, lab_a, bad_a), (im_b, idx_b, lab_b, bad_b) in zip(serial, parallel):
        assert idx_a == idx_b and lab_a == lab_b and bad_a == bad_b
        assert all(torch.equal(a, b) for a, b in zip(im_a, im_b))
    covered = sorted(i for _, idx, _, bad in serial for i in idx + [b[0] for b in bad])
    assert covered == list(range(2, 19))


def test_a_negative_worker_count_is_refused(kit, tmp_path):  # noqa: F811
    with pytest.raises(ReproError, match="workers=-1"):
        extract_latents(kit["vae"], kit["images"], tmp_path, image_size=64, workers=-1)
