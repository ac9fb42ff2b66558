"""Whole ODE samples against upstream fixtures and torchdiffeq, exact step formulas on ODEs with known
solutions, the time grid, guidance (where it runs, what it combines) and one signature."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from repro.transport import METHODS, model_rows_per_sample, sample_ode, time_grid
from repro.transport.guidance import guided_velocity
from tests.test_lightningdit import DIT_SIDECAR, load_fixture_model, rel_err

SIDE = json.loads(DIT_SIDECAR.read_text())
NULL = SIDE["model"]["num_classes"]  # the fixture model's null label


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


def reference_grid(num_steps: int, shift: float) -> np.ndarray:
    """Upstream's grid from its definition, in float64: linspace(0, 1, n), then s t / (1 + (s - 1) t)."""
    t = np.linspace(0.0, 1.0, num_steps)
    return shift * t / (1 + (shift - 1) * t) if shift > 0 else t


def test_time_grid_is_upstream():
    g = time_grid(250, 0.0)
    assert len(g) == 250 and g[0] == 0 and g[-1] == 1  # 249 intervals: no extra final step
    s = time_grid(5, 0.3)
    assert np.allclose(s.numpy(), reference_grid(5, 0.3), rtol=1e-6, atol=1e-7) and s.dtype == torch.float32
    assert s[1] < 0.25  # shift < 1 spends steps near t = 0 (noise)


# ---------------------------------------------------------------------------------------------
# The steppers: exact results on ODEs with known solutions, and torchdiffeq on the fixture model


class FieldModel(torch.nn.Module):
    """A 'model' whose velocity is a known field v(x, t); it ignores the labels."""

    def __init__(self, field):
        super().__init__()
        self.field, self.num_classes = field, NULL

    def forward(self, x, t, y):
        return self.field(x, t.view(-1, *([1] * (x.dim() - 1))))


# One step of dx/dt = lam * x multiplies x by the method's stability polynomial R(lam * h).
GROWTH = {"euler": lambda z: 1 + z, "midpoint": lambda z: 1 + z + z**2 / 2, "heun2": lambda z: 1 + z + z**2 / 2,
          "rk4": lambda z: 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24}


@pytest.mark.parametrize("method", sorted(GROWTH))
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_linear_ode_grows_by_each_methods_stability_polynomial(method, shift):
    lam, steps = -2.5, 6
    z = torch.linspace(-1.0, 1.0, 8).view(2, 4, 1, 1)
    out = sample_ode(FieldModel(lambda x, t: lam * x), z, torch.zeros(2, dtype=torch.long), method=method,
                     num_steps=steps, timestep_shift=shift)
    grid = reference_grid(steps, shift)
    factor = math.prod(GROWTH[method](lam * h) for h in np.diff(grid))
    torch.testing.assert_close(out, z * factor, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("method,degree", [("midpoint", 1), ("heun2", 1), ("rk4", 3)])
def test_time_only_fields_are_integrated_exactly_to_the_methods_order(method, degree):
    """Midpoint and Heun integrate a linear f(t) exactly, rk4's 3/8 rule a cubic: x(1) = x(0) + 1."""
    field = lambda x, t: (degree + 1) * t**degree * torch.ones_like(x)  # noqa: E731 (integral over [0, 1] = 1)
    z = torch.zeros(1, 2, 1, 1)
    for steps in (2, 3, 7):
        out = sample_ode(FieldModel(field), z, torch.zeros(1, dtype=torch.long), method=method, num_steps=steps)
        torch.testing.assert_close(out, z + 1.0, rtol=0, atol=2e-6)
    euler = sample_ode(FieldModel(field), z, torch.zeros(1, dtype=torch.long), method="euler", num_steps=7)
    assert (euler - 1.0).abs().max() > 0.05  # a first-order step is not exact here: the check can fail


def upstream_cfg_field(model, y, scale, start):
    """Upstream's guided velocity written from its definition: always the doubled batch with the null
    label; where t >= start, uncond + s (cond - uncond) on channels 0-2, cond elsewhere; else cond."""
    def f(t, x):
        tt = torch.full((2 * x.shape[0],), float(t))
        cond, uncond = model(torch.cat([x, x]), tt, torch.cat([y, torch.full_like(y, NULL)])).chunk(2)
        if float(t) < start:
            return cond
        guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
        return torch.cat([guided, cond[:, 3:]], dim=1)
    return f


@pytest.mark.parametrize("method", ["midpoint", "rk4"])
def test_midpoint_and_rk4_match_torchdiffeq_on_the_fixture_model(method):
    from torchdiffeq import odeint

    model, t = load_fixture_model()
    z, y = t["in.sample_z"], t["in.sample_y"]
    grid = torch.tensor(reference_grid(6, 0.3), dtype=torch.float32)
    with torch.no_grad():
        ref = odeint(upstream_cfg_field(model, y, 3.0, 0.11), z, grid, method=method)[-1]
    out = sample_ode(model, z, y, method=method, num_steps=6, timestep_shift=0.3, cfg_scale=3.0,
                     cfg_interval_start=0.11)
    assert rel_err(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# Guidance: where the unconditional half runs, and what is combined


class Recorder(torch.nn.Module):
    """Wraps the model and records, per call, the time, the rows and whether the null label was run."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.calls = model, model.num_classes, []

    def forward(self, x, t, y):
        assert (t == t[0]).all()
        self.calls.append((float(t[0]), x.shape[0], bool((y == self.num_classes).any())))
        return self.model(x, t, y)


def stage_times(grid: np.ndarray, method: str) -> list[float]:
    """The times each method evaluates the model at, from the Butcher tableaux."""
    nodes = {"euler": [0.0], "midpoint": [0.0, 0.5], "heun2": [0.0, 1.0], "rk4": [0.0, 1 / 3, 2 / 3, 1.0]}[method]
    return [t0 + c * (t1 - t0) for t0, t1 in zip(grid[:-1], grid[1:]) for c in nodes]


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "rk4"])
def test_the_unconditional_half_runs_exactly_where_t_is_at_least_the_start(method):
    model, t = load_fixture_model()
    z, y = t["in.sample_z"], t["in.sample_y"]
    n = z.shape[0]
    grid = reference_grid(4, 0.0)
    # start 0 (the demo preset: guided from the first step), a start exactly on a grid point (upstream's
    # float32 linspace(0, 1, 4)[1] is the float32 nearest 1/3), and one between grid points
    for start in (0.0, float(np.float32(1 / 3)), 0.5):
        rec, stats = Recorder(model), {}
        sample_ode(rec, z, y, method=method, num_steps=4, cfg_scale=4.0, cfg_interval_start=start, stats=stats)
        times = stage_times(grid, method)
        assert np.allclose([c[0] for c in rec.calls], times, atol=1e-6)
        guided = [tt >= start - 1e-6 for tt in times]  # float64 times; a time within 1e-6 of start is start
        assert [c[1] for c in rec.calls] == [2 * n if g else n for g in guided], (start, rec.calls)
        assert [c[2] for c in rec.calls] == guided  # the extra rows are the null label's
        assert stats["model_rows"] == sum(c[1] for c in rec.calls)
        # the planner's count (benchmarks, step 4's summary) from the tableaux, not from the sampler's calls
        assert model_rows_per_sample(4, method, 0.0, 4.0, start) == (sum(2 if g else 1 for g in guided),
                                                                     2 * len(times))
    assert model_rows_per_sample(250, "euler", 0.3, 6.7, 0.125) == (417, 498)  # README's 800-epoch figure


def test_guidance_touches_only_the_first_channels():
    """cfg_channels=3 (upstream): channels 0-2 guided, 3+ the conditional output; None: every channel."""
    model, t = load_fixture_model()
    z, y = t["in.sample_z"], t["in.sample_y"]
    n, time = z.shape[0], 0.7
    with torch.no_grad():
        cond = model(z, torch.full((n,), time), y)
        uncond = model(z, torch.full((n,), time), torch.full_like(y, NULL))
    for channels, guided in ((3, 3), (None, z.shape[1])):
        expected = cond.clone()
        expected[:, :guided] = uncond[:, :guided] + 4.0 * (cond[:, :guided] - uncond[:, :guided])
        with torch.no_grad():
            v = guided_velocity(model, z, time, y, cfg_scale=4.0, cfg_channels=channels)
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
    a = sample_ode(model, z, y, num_steps=4, cfg_scale=4.0, cfg_channels=3)
    b = sample_ode(model, z, y, num_steps=4, cfg_scale=4.0, cfg_channels=None)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_one_signature_for_every_method(method):
    model, t = load_fixture_model()
    calls = []
    out = sample_ode(model, t["in.sample_z"], t["in.sample_y"], method=method, num_steps=3, cfg_scale=2.0,
                     callback=lambda i, n: calls.append((i, n)))
    assert out.shape == t["in.sample_z"].shape and torch.isfinite(out).all()
    if method != "dopri5":
        assert calls == [(1, 2), (2, 2)]


def test_bad_method_and_steps():
    model, t = load_fixture_model()
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_ode(model, t["in.sample_z"], t["in.sample_y"], method="ddim")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(model, t["in.sample_z"], t["in.sample_y"], num_steps=1)
