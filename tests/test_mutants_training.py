"""Training pieces that an overall rate or a source scan did not pin down.

- Label dropout (upstream's LabelEmbedder: one coin per sample, p = class_dropout_prob): the kit draws each
  sample's coin from that sample's own generator, so within one micro-batch drops are mixed, and the drop of
  the sample at global position i does not depend on how the batch is cut into micro-batches.
- Resuming reads the checkpoint memory-mapped (`read_checkpoint(mmap=True)`); that path must stay a
  weights-only load: a pickle carrying code is refused and its code never runs, even where the environment
  asks torch to default to full unpickling (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, honoured by torch.load whenever
  the call does not pass weights_only itself).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from repro.errors import CheckpointError
from repro.models.checkpoint import read_checkpoint
from repro.training import build_micro_batch
from repro.training.checkpoints import read_training_checkpoint
from tests.test_training import make_latents

NULL = 4  # make_latents' 4 classes: the null label is 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from repro.data.latents import LatentShardDataset

    return LatentShardDataset(make_latents(tmp_path_factory.mktemp("latents"), channels=4, size=2))


def _dropped(ds, indices, step, first, p=0.5):
    mb = build_micro_batch(ds, indices, step, first, seed=3, lognorm=True, dropout_prob=p, null_class=NULL)
    return mb.y == NULL


def test_label_drops_are_mixed_within_every_micro_batch(dataset):
    indices = torch.arange(64)
    for step in (1, 2, 3):
        for lo in range(0, 64, 16):  # four micro-batches of 16
            drop = _dropped(dataset, indices[lo:lo + 16], step, lo)
            assert drop.any() and (~drop).any(), f"step {step}, micro-batch at {lo}: {drop.tolist()}"
    # over many samples, the rate is p and neighbouring samples are uncorrelated
    drops = torch.cat([_dropped(dataset, indices, s, 0) for s in range(1, 9)]).float()
    assert 0.4 < drops.mean().item() < 0.6
    a, b = drops[:-1] - drops.mean(), drops[1:] - drops.mean()
    assert abs(float((a * b).mean() / (a * a).mean())) < 0.2


def test_label_drop_of_a_sample_does_not_depend_on_the_micro_batch_cut(dataset):
    indices = torch.arange(64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))][:21]
    whole = _dropped(dataset, indices, 5, 0)
    one_by_one = torch.cat([_dropped(dataset, indices[i:i + 1], 5, i) for i in range(21)])
    uneven = torch.cat([_dropped(dataset, indices[lo:hi], 5, lo) for lo, hi in ((0, 8), (8, 13), (13, 21))])
    assert torch.equal(whole, one_by_one) and torch.equal(whole, uneven)
    assert whole.any() and (~whole).any()
    none = build_micro_batch(dataset, indices, 5, 0, seed=3, lognorm=True, dropout_prob=0.0, null_class=NULL)
    every = build_micro_batch(dataset, indices, 5, 0, seed=3, lognorm=True, dropout_prob=1.0, null_class=NULL)
    assert not (none.y == NULL).any() and (every.y == NULL).all()
    kept = build_micro_batch(dataset, indices, 5, 0, seed=3, lognorm=True, dropout_prob=0.5, null_class=NULL)
    assert torch.equal(kept.y[~whole], none.y[~whole])  # a kept sample keeps its own label


# ---------------------------------------------------------------------------------------------------
# The memory-mapped read refuses code-carrying pickles


class _Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("reader", [lambda p: read_checkpoint(p, mmap=True), read_training_checkpoint],
                         ids=["read_checkpoint", "read_training_checkpoint"])
def test_memory_mapped_checkpoint_read_never_runs_pickled_code(tmp_path, monkeypatch, reader):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint-0000010.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 10, "evil": _Payload(marker)}, path)
    assert not marker.exists()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default becomes full unpickling
    with pytest.raises(CheckpointError, match="weights-only load refuses"):
        reader(path)
    assert not marker.exists(), "unpickling ran the payload's code"
    assert os.listdir(tmp_path) == [path.name]
