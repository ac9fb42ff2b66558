"""Training objective: path, velocity target, losses and timestep distributions."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from repro.transport import linear_path, sample_timesteps, training_losses
from tests.conftest import REFERENCE


def test_lognorm_quantiles_match_upstream():
    ref = json.loads((REFERENCE / "lognorm_t_quantiles.json").read_text())
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(ref["n"], lognorm=True, generator=g)
    for q, v in ref["quantiles"].items():
        assert abs(torch.quantile(t, float(q)).item() - v) < 0.005, q
    assert abs(t.mean().item() - ref["mean"]) < 0.005 and abs(t.std().item() - ref["std"]) < 0.005


def test_uniform_timesteps():
    t = sample_timesteps(100_000, lognorm=False, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.01


def test_linear_path_endpoints_and_target():
    x0, x1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt, ut = linear_path(torch.tensor([0.0, 1.0]), x0, x1)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], x1[1]) and torch.equal(ut, x1 - x0)


def test_losses_are_per_sample_mse_plus_cosine():
    x1, x0, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.rand(3)
    pred = torch.randn(3, 4, 2, 2)
    model = lambda x, tt, y: pred  # noqa: E731  (a fixed prediction, to check the formula)
    out = training_losses(model, x1, torch.zeros(3, dtype=torch.long), t=t, x0=x0)
    ut = x1 - x0
    mse = ((pred - ut) ** 2).mean(dim=(1, 2, 3))
    cos = (1 - F.cosine_similarity(pred, ut, dim=1)).mean(dim=(1, 2))
    assert torch.allclose(out["mse"], mse) and torch.allclose(out["cos"], cos)
    assert torch.allclose(out["loss"], mse + cos)
    plain = training_losses(model, x1, torch.zeros(3, dtype=torch.long), t=t, x0=x0, use_cosine_loss=False)
    assert plain["cos"] is None and torch.allclose(plain["loss"], mse)


def test_generator_makes_losses_reproducible():
    model = lambda x, tt, y: x * tt.view(-1, 1, 1, 1)  # noqa: E731
    x1 = torch.randn(4, 2, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    a = training_losses(model, x1, y, generator=torch.Generator().manual_seed(3))["loss"]
    b = training_losses(model, x1, y, generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(a, b)
