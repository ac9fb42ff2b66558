"""repro.transport pieces that survived mutation testing (docs/mutation_testing.md), checked against hand-written
formulas: the training loss reaches the model with its labels and the logit-normal t by default, t and noise
come from the generator only, CFG combines by hand on the first cfg_channels channels (default 3) of any
batch size, guidance is off at scale 1 (no unconditional rows) and on above it, and the call statistics count.
"""

from __future__ import annotations

import pytest
import torch

from repro.transport import sample_timesteps, training_losses
from repro.transport.guidance import combine_cfg, guided_velocity
from repro.transport.ode import model_rows_per_sample, time_grid
from tests.tiny_assets import TINY_CHANNELS, TINY_CLASSES, TINY_LATENT, tiny_model


class RowRecorder(torch.nn.Module):
    """A real tiny LightningDiT, recording the rows and labels of every call."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model(seed=1).eval()
        self.num_classes = self.inner.num_classes
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, y):
        self.calls.append(y.clone())
        return self.inner(x, t, y)


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY_CHANNELS, TINY_LATENT, TINY_LATENT, generator=g), torch.arange(n) % TINY_CLASSES


def test_training_losses_pass_the_labels_and_draw_logit_normal_t_by_default():
    model = tiny_model(seed=1).eval()
    x1, _ = _batch(4)
    losses = {}
    with torch.no_grad():
        for label in (0, 1):
            y = torch.full((4,), label)
            losses[label] = training_losses(model, x1, y, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(losses[0]["loss"], losses[1]["loss"])  # the label reaches the model
    expected_t = sample_timesteps(4, True, torch.Generator().manual_seed(5))  # use_lognorm defaults to True
    torch.testing.assert_close(losses[0]["t"], expected_t)
    uniform = training_losses(model, x1, torch.zeros(4, dtype=torch.int64), use_lognorm=False,
                              generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(uniform["t"], sample_timesteps(4, False, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("lognorm", [True, False])
def test_timesteps_come_from_the_generator_only(lognorm):
    torch.manual_seed(0)
    a = sample_timesteps(64, lognorm, torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # another global state: no effect
    b = sample_timesteps(64, lognorm, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    # logit-normal: sigmoid of N(0, 1) has median 1/2 and most mass inside (0.12, 0.88); uniform: a quarter outside
    outside = float(((a < 0.12) | (a > 0.88)).float().mean())
    assert (outside < 0.15) if lognorm else (outside > 0.1)


def test_combine_cfg_by_hand_default_channels_and_small_spatial_sizes():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)  # C=4 > H=W=2
    out = combine_cfg(cond, uncond, 2.5)  # cfg_channels defaults to 3 (upstream)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])
    every = combine_cfg(cond, uncond, 2.5, cfg_channels=None)
    torch.testing.assert_close(every, uncond + 2.5 * (cond - uncond))


def test_guided_velocity_rows_scale_one_off_above_one_on_batch_of_three():
    model = RowRecorder()
    x, y = _batch(3)
    t = 0.4
    with torch.no_grad():
        plain = model.inner(x, torch.full((3,), t), y)
        stats: dict = {}
        off = guided_velocity(model, x, t, y, cfg_scale=1.0, stats=stats)  # scale 1: no unconditional rows
        assert stats == {"nfe": 1, "model_rows": 3} and len(model.calls[-1]) == 3
        torch.testing.assert_close(off, plain)
        torch.testing.assert_close(guided_velocity(model, x, t, y), plain)  # defaults: no guidance
        on = guided_velocity(model, x, t, y, cfg_scale=1.5, stats=stats)
        assert stats == {"nfe": 2, "model_rows": 9}
        assert model.calls[-1].tolist() == y.tolist() + [TINY_CLASSES] * 3  # null class from model.num_classes
        uncond = model.inner(x, torch.full((3,), t), torch.full((3,), TINY_CLASSES))
        torch.testing.assert_close(on[:, :3], uncond[:, :3] + 1.5 * (plain[:, :3] - uncond[:, :3]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(on[:, 3:], plain[:, 3:], rtol=1e-5, atol=1e-6)


def test_a_model_without_num_classes_needs_null_class():
    class Bare(torch.nn.Module):
        def forward(self, x, t, y):
            return x

    x, y = _batch(2)
    with pytest.raises(ValueError, match=r"^pass null_class= \(the model has no num_classes attribute\)$"):
        guided_velocity(Bare(), x, 0.5, y, cfg_scale=2.0)


def test_defaults_of_time_grid_and_model_rows_per_sample():
    torch.testing.assert_close(time_grid(5), torch.linspace(0.0, 1.0, 5))  # no shift by default
    assert model_rows_per_sample(10) == (9, 9)  # euler, no guidance: one row per step of the 9 intervals
    assert model_rows_per_sample(10, cfg_scale=1.0) == (9, 9)
    assert model_rows_per_sample(10, cfg_scale=1.5) == (18, 18)
    assert model_rows_per_sample(10, cfg_scale=1.5, cfg_interval_start=0.5) == (9 + 4, 18)  # t = 5/9 .. 8/9 guided
