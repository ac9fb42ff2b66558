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

import contextlib
import copy
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


# ---------------------------------------------------------------------------------------------------
# From mutation testing (docs/mutation_testing.md): repro/training/step.py


class _TwoLayers(torch.nn.Module):
    """Two trained tensors and a frozen one between them (like LightningDiT's fixed `pos_embed`)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + self.frozen)


def _adamw_steps(opt, model, n):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        model(torch.randn(5, 3, generator=g)).square().sum().backward()
        opt.step()
        opt.zero_grad()


def test_make_optimizer_takes_every_hyper_parameter_and_fuses_on_cuda_unless_told():
    from repro.config import OptimizerConfig
    from repro.training.step import make_optimizer

    model = _TwoLayers()
    cfg = OptimizerConfig(lr=3e-3, beta1=0.8, beta2=0.7, weight_decay=0.05)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    (group,) = opt.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.8, 0.7), 0.05)
    assert group["params"] == list(model.parameters())  # every tensor in model order, the frozen one too
    # optimizer.fused: None = fused exactly on CUDA (only the flag is read; AdamW fuses on the CPU too)
    for fused, device, expected in ((None, "cpu", None), (None, "cuda", True), (True, "cpu", True),
                                    (False, "cuda", None)):
        cfg.fused = fused
        assert make_optimizer(model, cfg, torch.device(device)).param_groups[0]["fused"] is expected, (fused, device)


# (optimizer.fused, the parameters' device): fused as set, else exactly on CUDA (read from the device's type only)
@pytest.mark.parametrize("fused, device, is_fused", [(None, "cpu", False), (True, "cpu", True),
                                                     (None, "cuda", True), (False, "cuda", False)])
def test_a_restored_optimizer_takes_the_configs_hyper_parameters_and_float32_step_counters(fused, device, is_fused):
    from repro.config import OptimizerConfig
    from repro.training.step import make_optimizer, normalise_optimizer_state

    model = _TwoLayers()
    # the checkpoint's optimizer: other hyper-parameters, foreach kernels, and step counters in float64
    old = torch.optim.AdamW(model.parameters(), lr=0.5, betas=(0.5, 0.6), weight_decay=0.2, foreach=True)
    _adamw_steps(old, model, 2)
    saved = old.state_dict()
    for st in saved["state"].values():
        st["step"] = st["step"].double()
    assert len(saved["state"]) == 4  # the frozen tensor never got a gradient: no state to normalise

    cfg = OptimizerConfig(lr=3e-3, beta1=0.8, beta2=0.7, weight_decay=0.05, fused=fused)
    opt = make_optimizer(model, cfg, torch.device(device))
    opt.load_state_dict(saved)  # torch restores the saved group's settings...
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["foreach"] is True
    normalise_optimizer_state(opt, cfg, torch.device(device))  # ...and the config's win
    (group,) = opt.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.8, 0.7), 0.05)
    # fused and foreach exclude each other: a fused optimizer drops foreach, an unfused one keeps its own
    assert (group["fused"], group["foreach"]) == ((True, None) if is_fused else (None, True))
    for p in (model.a.weight, model.a.bias, model.b.weight, model.b.bias):
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 2.0
    assert model.frozen not in opt.state
    _adamw_steps(opt, model, 1)  # AdamW accepts the result (it refuses fused with foreach, float64 fused steps)
    assert opt.state[model.a.weight]["step"].item() == 3.0


class _Velocity(torch.nn.Module):
    """A small velocity model v(x, t, y): a 1x1 convolution, a time ramp and a per-class bias."""

    def __init__(self, channels=3, classes=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.time = torch.nn.Parameter(torch.randn(channels))
        self.y_embedder = torch.nn.Embedding(classes, channels)

    def forward(self, x, t, y):
        return self.conv(x) + (t[:, None] * self.time + self.y_embedder(y))[:, :, None, None]


class _Wrapper(torch.nn.Module):
    """What the runner calls (DDP or a compiled module in training): records each forward's input layout,
    autocast dtype and whether it ran under `no_sync`."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls, self.syncing = model, [], True

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x, t, y):
        self.calls.append({"channels_last": x.is_contiguous(memory_format=torch.channels_last),
                           "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                           "synced": self.syncing})
        return self.inner(x, t, y)


def _flow_losses(model, mb):
    """Per-sample flow-matching losses of a float64 `model`, written out: x_t = t x1 + (1 - t) x0, target
    x1 - x0, MSE over all values and 1 - cosine over channels, averaged over the pixels (LightningDiT's loss)."""
    t = mb.t.double()[:, None, None, None]
    x0, x1 = mb.x0.double(), mb.x1.double()
    pred = model(t * x1 + (1 - t) * x0, mb.t.double(), mb.y)
    u = x1 - x0
    mse = ((pred - u) ** 2).flatten(1).mean(1)
    cos = (1 - (pred * u).sum(1) / (pred.norm(dim=1) * u.norm(dim=1))).flatten(1).mean(1)
    return mse, cos


def _micro_batches(n, m, seed=0, channels=3, size=2):
    from repro.training.data_order import MicroBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(MicroBatch(x1=torch.randn(m, channels, size, size, generator=g) * 2 + 0.5,
                              y=torch.randint(0, 3, (m,), generator=g), t=torch.rand(m, generator=g),
                              x0=torch.randn(m, channels, size, size, generator=g)))
    return out


def _runner(model, opt, *, accum=3, micro=2, world=2, cosine=True, max_grad_norm=None, precision="fp32",
            channels_last=False, scale=None, ema=None):
    from repro.config import Config
    from repro.training.batches import BatchPlan
    from repro.training.ema import EMA
    from repro.training.step import StepRunner

    cfg = Config()
    cfg.optimizer.max_grad_norm = max_grad_norm
    cfg.transport.use_cosine_loss = cosine
    plan = BatchPlan(global_batch=micro * accum * world, micro_batch=micro, world_size=world, accum_steps=accum)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    wrapper = _Wrapper(model)
    runner = StepRunner(model, wrapper, opt, scaler, ema or EMA(model, 0.5), plan, cfg, precision=precision,
                        device=torch.device("cpu"), channels_last=channels_last)
    return runner, wrapper


@pytest.mark.parametrize("max_grad_norm, scale", [(None, None), (0.05, 256.0)], ids=["plain", "clipped-scaled"])
def test_one_step_is_the_mean_gradient_over_the_global_batch_then_the_ema(max_grad_norm, scale):
    torch.manual_seed(0)
    model = _Velocity()
    ref = copy.deepcopy(model).double()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD: the update shows the gradient's size
    runner, wrapper = _runner(model, opt, max_grad_norm=max_grad_norm, scale=scale)
    mbs = _micro_batches(3, 2)
    runner.step(7, iter(mbs))
    # this process's 6 samples, loss x world / global batch: a 2-process run averages two such gradients
    mse, cos = zip(*(_flow_losses(ref, mb) for mb in mbs))
    mse, cos = torch.cat(mse), torch.cat(cos)
    ((mse + cos).sum() * 2 / 12).backward()
    grads = [p.grad.double() for p in ref.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert runner.grad_norm.dtype == torch.float32
    torch.testing.assert_close(runner.grad_norm.double(), norm, rtol=1e-5, atol=0)
    clip = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm.item() + 1e-6))
    assert clip < 0.5 or max_grad_norm is None  # the clipping case does clip
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach().double(), p0.double() - 0.1 * clip * g, rtol=1e-5, atol=1e-6)
        assert p.grad is None  # zeroed (set to None) for the next step
    for e, p, p0 in zip(runner.ema.ema_params, model.parameters(), before):  # EMA after the update, decay 0.5
        torch.testing.assert_close(e, 0.5 * p0 + 0.5 * p.detach(), rtol=1e-6, atol=1e-7)
    # the log's running sums (float64, on the device), the step's loss sum, the count
    torch.testing.assert_close(runner.sums, torch.stack([(mse + cos).sum(), mse.sum(), cos.sum()]), rtol=1e-5, atol=0)
    assert runner.sums.dtype == torch.float64 and runner.samples == 6 and runner.steps_done == 1
    torch.testing.assert_close(runner.last_loss_sum, (mse + cos).sum(), rtol=1e-5, atol=0)
    assert runner.first_bad.item() == -1
    # every micro-batch through the wrapper; gradients synchronised on the last one only (DDP's no_sync)
    assert [c["synced"] for c in wrapper.calls] == [False, False, True]
    assert all(c["autocast"] is None and not c["channels_last"] for c in wrapper.calls)


def test_the_running_sums_add_up_over_steps_until_reset_and_without_the_cosine_term():
    torch.manual_seed(0)
    model = _Velocity()
    runner, _ = _runner(model, torch.optim.SGD(model.parameters(), lr=0.0), accum=2, micro=3, world=1, cosine=False)
    first, second = _micro_batches(2, 3, seed=1), _micro_batches(2, 3, seed=2)
    runner.step(1, iter(first))
    runner.step(2, iter(second))
    same = copy.deepcopy(model).double()  # lr 0: the same weights throughout
    mse = torch.cat([_flow_losses(same, mb)[0] for mb in first + second])
    torch.testing.assert_close(runner.sums, torch.stack([mse.sum(), mse.sum(), torch.zeros((), dtype=torch.float64)]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(runner.last_loss_sum, mse[6:].sum(), rtol=1e-5, atol=0)  # the last step's alone
    assert runner.samples == 12 and runner.steps_done == 2
    runner.reset_sums()
    assert runner.samples == 0 and torch.equal(runner.sums, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="step 3: got 1 micro-batches, expected 2"):
        runner.step(3, iter(first[:1]))


def test_the_first_non_finite_step_is_remembered():
    torch.manual_seed(0)
    model = _Velocity()
    runner, _ = _runner(model, torch.optim.SGD(model.parameters(), lr=0.0), accum=1, micro=2, world=1)
    runner.step(4, iter(_micro_batches(1, 2)))
    assert runner.first_bad.item() == -1
    bad = _micro_batches(1, 2, seed=5)
    bad[0].x1[1, 0, 0, 0] = float("inf")
    runner.step(5, iter(bad))
    assert runner.first_bad.item() == 5 and not torch.isfinite(runner.last_loss_sum)
    runner.step(6, iter(bad))
    runner.step(7, iter(_micro_batches(1, 2)))
    assert runner.first_bad.item() == 5  # the first one stays, however many follow


def test_channels_last_and_bf16_reach_the_forward():
    torch.manual_seed(0)
    model = _Velocity()
    runner, wrapper = _runner(model, torch.optim.SGD(model.parameters(), lr=0.0), accum=2, world=1,
                              precision="bf16", channels_last=True)
    mbs = _micro_batches(2, 2)
    runner.step(1, iter(mbs))
    assert [(c["channels_last"], c["autocast"]) for c in wrapper.calls] == [(True, torch.bfloat16)] * 2
    mse, cos = zip(*(_flow_losses(copy.deepcopy(model).double(), mb) for mb in mbs))
    exact = (torch.cat(mse) + torch.cat(cos)).sum()
    got = runner.last_loss_sum
    assert got != exact and torch.isclose(got, exact, rtol=0.05)  # bf16 rounding: close, not equal


def test_under_fsdp_the_gradient_norm_is_the_whole_models_as_a_plain_tensor():
    from repro.training.strategy import Sharded

    torch.manual_seed(0)
    model = _Velocity()
    ref = copy.deepcopy(model).double()
    strategy = Sharded(torch.device("cpu"), 1)
    strategy.shard(model, [model])  # one process with its own gloo group: DTensor parameters and gradients
    try:
        assert type(model.conv.weight).__name__ == "DTensor"
        runner, _ = _runner(model, torch.optim.SGD(model.parameters(), lr=0.0), accum=1, micro=4, world=1,
                            max_grad_norm=1e9, ema=strategy.make_ema(model, 0.5, on_cpu=False))
        mb = _micro_batches(1, 4)[0]
        runner.step(1, iter([mb]))
        # clip_grad_norm_ returns a DTensor over sharded gradients; the log wants the full norm, gathered
        assert type(runner.grad_norm) is torch.Tensor
        mse, cos = _flow_losses(ref, mb)
        ((mse + cos).sum() / 4).backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters()))
        torch.testing.assert_close(runner.grad_norm.double(), norm, rtol=1e-5, atol=0)
    finally:
        strategy.close()


def test_a_one_step_cosine_schedule_ends_at_zero():
    from repro.training.step import lr_factor

    # max(max_steps, 1) guards max_steps = 0 only: one step's cosine runs from 1 at step 1 to 0 at step 2
    assert lr_factor(1, 1, 0, "cosine") == 1.0 and lr_factor(2, 1, 0, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(1, 0, 0, "cosine") == 1.0 and lr_factor(3, 0, 0, "cosine") == 1.0  # no schedule to run
