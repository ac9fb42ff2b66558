"""Whole ODE samples against upstream fixtures, the time grid, guidance work-saving and one signature."""

from __future__ import annotations

import json

import pytest
import torch

from repro.transport import METHODS, model_rows_per_sample, sample_ode, time_grid
from tests.test_lightningdit import DIT_SIDECAR, load_fixture_model, rel_err

SIDE = json.loads(DIT_SIDECAR.read_text())


@pytest.mark.parametrize("key", sorted(SIDE["samples"]))
def test_whole_sample_matches_upstream(key):
    model, t = load_fixture_model()
    s = SIDE["samples"][key]
    start = s["cfg_interval_start"] if s["cfg_interval_start"] is not None else 0.0
    out = sample_ode(model, t["in.sample_z"], t["in.sample_y"], method=s["method"], num_steps=s["num_steps"],
                     timestep_shift=s["timestep_shift"], cfg_scale=s["cfg_scale"], cfg_interval_start=start,
                     atol=s["atol"], rtol=s["rtol"])
    tol = 1e-3 if s["method"] == "dopri5" else 1e-4
    assert rel_err(out, t[f"out.{key}"]) < tol


def test_time_grid_is_upstream():
    g = time_grid(250, 0.0)
    assert len(g) == 250 and g[0] == 0 and g[-1] == 1  # 249 intervals: no extra final step
    s = time_grid(5, 0.3)
    lin = torch.linspace(0, 1, 5)
    ref = torch.tensor([float(0.3 * v / (1 + (0.3 - 1) * v)) for v in lin])
    assert torch.equal(s, ref.float())
    assert s[1] < lin[1]  # shift < 1 spends steps near t = 0 (noise)


def test_unconditional_half_only_where_guided():
    """Work saved: rows below the interval start run once; equals the upstream doubled result."""
    model, t = load_fixture_model()
    z, y = t["in.sample_z"], t["in.sample_y"]
    stats: dict = {}
    sample_ode(model, z, y, num_steps=8, timestep_shift=0.3, cfg_scale=4.0, cfg_interval_start=0.11, stats=stats)
    ours, upstream = model_rows_per_sample(8, "euler", 0.3, 4.0, 0.11)
    assert stats["model_rows"] == ours * z.shape[0]
    assert ours < upstream == 2 * 7
    assert model_rows_per_sample(250, "euler", 0.3, 6.7, 0.125) == (417, 498)


def test_cfg_all_channels_option_differs_from_upstream_quirk():
    model, t = load_fixture_model()
    z, y = t["in.sample_z"], t["in.sample_y"]
    a = sample_ode(model, z, y, num_steps=4, cfg_scale=4.0, cfg_channels=3)
    b = sample_ode(model, z, y, num_steps=4, cfg_scale=4.0, cfg_channels=None)
    assert torch.allclose(a[:, 3:], a[:, 3:]) and not torch.allclose(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_one_signature_for_every_method(method):
    model, t = load_fixture_model()
    calls = []
    out = sample_ode(model, t["in.sample_z"], t["in.sample_y"], method=method, num_steps=3, cfg_scale=2.0,
                     callback=lambda i, n: calls.append((i, n)))
    assert out.shape == t["in.sample_z"].shape and torch.isfinite(out).all()
    if method != "dopri5":
        assert calls[-1] == (2, 2)


def test_bad_method_and_steps():
    model, t = load_fixture_model()
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_ode(model, t["in.sample_z"], t["in.sample_y"], method="ddim")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(model, t["in.sample_z"], t["in.sample_y"], num_steps=1)
