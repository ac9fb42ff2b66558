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


# ---------------------------------------------------------------------------------------------
# DDPM (repro.transport.ddpm, repro.transport.process): every coefficient against a formula written out here from
# the papers (Ho et al. 2020 eq. 4, 7 and Algorithm 2; Song et al. 2021 eq. 12; Nichol & Dhariwal 2021 eq. 17),
# and every argument against a run that tells it apart. Survivors of mutation testing, each watched failing.

import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from repro.transport import process  # noqa: E402
from repro.transport.ddpm import (DiffusionSchedule, ddpm_losses, make_betas, sample_ddpm,  # noqa: E402
                                  sampling_timesteps, split_prediction, step_coefficients)


def test_ddpm_schedules_closed_forms_defaults_and_messages():
    T = 1000
    k = np.arange(T)
    lin = make_betas("linear", T, 1e-4, 0.02)
    assert lin.dtype == torch.float64
    np.testing.assert_allclose(lin.numpy(), 1e-4 + k / (T - 1) * (0.02 - 1e-4), rtol=1e-12)  # Ho et al.
    assert torch.equal(make_betas("linear", T), lin)  # defaults: Ho et al.'s 1e-4 -> 0.02
    sl = make_betas("scaled_linear", 50, 0.00085, 0.012)
    assert sl.dtype == torch.float64
    j = np.arange(50)
    np.testing.assert_allclose(sl.numpy(), (0.00085 ** 0.5 + j / 49 * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2, rtol=1e-12)
    # cosine at a small T (the clamp bites only at the end): ᾱ_k = f(k + 1)/f(0) (Nichol & Dhariwal eq. 17)
    s = 0.008
    f = lambda t: math.cos((t / 20 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    cos = DiffusionSchedule(make_betas("cosine", 20))
    np.testing.assert_allclose(cos.alphas_cumprod.numpy()[:-1], [f(i + 1) / f(0) for i in range(19)], rtol=1e-12)
    assert cos.betas[-1].item() == 0.999
    sched = DiffusionSchedule(lin)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - lin.numpy()), rtol=1e-12)
    assert sched.prediction == "noise" and sched.num_timesteps == T
    with pytest.raises(ValueError, match=r"^unknown noise schedule 'sigmoid'; choose one of linear, scaled_linear, "
                                         r"cosine$"):
        make_betas("sigmoid", T)
    with pytest.raises(ValueError, match=r"^unknown prediction 'score'; choose one of noise, velocity$"):
        DiffusionSchedule(lin, prediction="score")


def test_ddpm_schedule_from_config_reads_every_key():
    cfg = SimpleNamespace(schedule="scaled_linear", num_timesteps=300, beta_start=0.00085, beta_end=0.012,
                          prediction="velocity")
    sched = DiffusionSchedule.from_config(cfg)
    assert torch.equal(sched.betas, make_betas("scaled_linear", 300, 0.00085, 0.012)) and sched.prediction == "velocity"


def test_ddpm_index_of_is_floor_t_times_T_in_float64_clamped():
    sched = DiffusionSchedule(make_betas("linear", 1000))
    # float32 0.29 is 0.28999999...: floor gives 289 in float64 (a float32 product rounds it up to 290)
    t = torch.tensor([0.0, 0.29, 0.5, 0.9999, 1.0, -0.01], dtype=torch.float32)
    k = sched.index_of(t)
    assert k.dtype == torch.int64 and k.tolist() == [0, 289, 500, 999, 999, 0]


def test_ddpm_forward_process_and_targets_keep_the_data_dtype_and_shape():
    sched = DiffusionSchedule(make_betas("cosine", 1000))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)  # 3-D data: one view per sample
    k = torch.tensor([0, 400, 999])
    a = sched.alphas_cumprod[k].view(3, 1, 1)
    xk = sched.q_sample(x, k, eps)
    assert xk.dtype == torch.float32 and xk.shape == x.shape
    torch.testing.assert_close(xk, (a.sqrt() * x + (1 - a).sqrt() * eps).float())  # Ho et al. eq. 4
    assert torch.equal(sched.target(x, k, eps), eps)  # ε-prediction learns ε itself
    v = DiffusionSchedule(sched.betas, prediction="velocity").target(x, k, eps)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, (a.sqrt() * eps - (1 - a).sqrt() * x).float())  # Salimans & Ho


@pytest.mark.parametrize("alpha_bar", [0.9991, 0.37, 0.004])
def test_ddpm_split_prediction_inverts_the_definitions(alpha_bar):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    xk = a * x0 + s * eps
    for prediction, out in (("noise", eps), ("velocity", a * eps - s * x0)):
        got_x0, got_eps = split_prediction(out, xk, alpha_bar, prediction)
        torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)


def test_ddpm_losses_feed_the_model_x_k_and_float_k_and_report_t():
    sched = DiffusionSchedule(make_betas("linear", 1000))  # ε-prediction
    g = torch.Generator().manual_seed(2)
    x1, x0 = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    t, y = torch.tensor([0.1, 0.5, 0.75]), torch.tensor([4, 5, 6])
    seen = {}

    def model(x, k, labels):
        seen.update(x=x, k=k, y=labels)
        return 0.5 * x

    out = ddpm_losses(model, x1, y, schedule=sched, t=t, x0=x0)
    k = torch.tensor([100, 500, 750])
    assert seen["k"].dtype == torch.float32 and seen["k"].tolist() == [100.0, 500.0, 750.0]
    assert torch.equal(seen["y"], y)
    xk = sched.q_sample(x1, k, x0)
    torch.testing.assert_close(seen["x"], xk)
    mse = ((0.5 * xk - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["loss"], mse)
    torch.testing.assert_close(out["mse"], mse)
    assert out["t"] is t and out["cos"] is None


def test_ddpm_sampling_timesteps_exact_and_refused():
    assert sampling_timesteps(10, 4) == [9, 6, 3, 0]
    assert sampling_timesteps(1000, 3) == [999, 500, 0]
    assert sampling_timesteps(1000, 2) == [999, 0]
    assert sampling_timesteps(1000, 1) == [999]
    assert sampling_timesteps(7, 7) == [6, 5, 4, 3, 2, 1, 0]
    for bad in (0, 11):
        with pytest.raises(ValueError, match=rf"^num_steps must be in \[1, 10\] \(the process has 10 timesteps\), "
                                             rf"got {bad}$"):
            sampling_timesteps(10, bad)


def _ddim_eq12(a, ap, eta):
    """Song et al. 2021 eq. 12/16: x_prev = sqrt(ᾱ_prev) x̂ + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z,
    σ = η sqrt((1 - ᾱ_prev)/(1 - ᾱ)) sqrt(1 - ᾱ/ᾱ_prev)."""
    sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    return math.sqrt(ap), math.sqrt(1 - ap - sigma ** 2), sigma


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_coefficients_are_song_eq_12(eta):
    for a, ap in ((0.02, 0.3), (0.5, 0.52), (0.9, 0.999)):
        for variance in ("beta", "beta_tilde"):  # DDIM ignores the DDPM variance
            assert step_coefficients(a, ap, "ddim", eta, variance) == pytest.approx(_ddim_eq12(a, ap, eta), rel=1e-12)
    # a σ above sqrt(1 - ᾱ_prev) leaves no room for ε̂: its weight is clamped at 0, not NaN
    c_data, c_eps, sigma = step_coefficients(0.5, 0.9, "ddim", 3.0, "beta")
    assert c_eps == 0.0 and sigma == pytest.approx(3 * math.sqrt(0.1 / 0.5 * (1 - 0.5 / 0.9)))


def test_ddpm_last_step_lands_on_x_hat_without_noise():
    for method in ("ddim", "ddpm"):
        for variance in ("beta", "beta_tilde"):
            assert step_coefficients(0.7, 1.0, method, 1.0, variance) == (1.0, 0.0, 0.0)
    # one step before: DDPM with β adds sqrt(β) noise, with β̃ less (Ho et al. §3.2)
    assert step_coefficients(0.7, 0.8, "ddpm", 0.0, "beta")[2] == pytest.approx(math.sqrt(1 - 0.7 / 0.8))
    assert step_coefficients(0.7, 0.8, "ddpm", 0.0, "beta_tilde")[2] == pytest.approx(
        math.sqrt((1 - 0.7 / 0.8) * 0.2 / 0.3))


class LinearEps(torch.nn.Module):
    """A label-dependent linear ε (or v) model that records its calls (t, labels)."""

    num_classes = 5

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        scale = 0.4 + 0.1 * y.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        channel = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        return scale * x + 1e-4 * t.view(-1, *([1] * (x.dim() - 1))) + 0.05 * channel


def _algorithm_2(model, z, y, sched, ks, method, eta, variance, generators, cfg=None):
    """The reference sampler in ε-form, float64: DDIM by eq. 12 (Song et al.), DDPM by Ho et al.'s Algorithm 2,
    x_prev = (x - β/sqrt(1 - ᾱ) ε)/sqrt(α) + σ z with the jump's α = ᾱ/ᾱ_prev, β = 1 - α, σ² = β or β̃."""
    abar = sched.alphas_cumprod.tolist()
    x = z.double()
    for i, k in enumerate(ks):
        a, ap = abar[k], (abar[ks[i + 1]] if i + 1 < len(ks) else 1.0)
        tt = torch.full((len(x),), float(k))
        if cfg is None:
            out = model(x.float(), tt, y).double()
        else:
            scale, null, channels = cfg
            cond, uncond = model(x.float(), tt, y).double(), model(x.float(), tt, torch.full_like(y, null)).double()
            out = cond.clone()
            out[:, :channels] = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
        eps = out if sched.prediction == "noise" else math.sqrt(1 - a) * x + math.sqrt(a) * out
        if method == "ddim":
            c_x0, c_eps, sigma = _ddim_eq12(a, ap, eta)
            x = c_x0 * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + c_eps * eps
        else:
            alpha, beta = a / ap, 1 - a / ap
            x = (x - beta / math.sqrt(1 - a) * eps) / math.sqrt(alpha)
            sigma = math.sqrt(beta if variance == "beta" else beta * (1 - ap) / (1 - a)) if ap < 1 else 0.0
        if sigma > 0:
            x = x + sigma * torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).double()
    return x


@pytest.mark.parametrize("method, eta, variance, prediction, schedule", [
    ("ddim", 0.0, "beta_tilde", "noise", "linear"), ("ddim", 0.5, "beta_tilde", "velocity", "cosine"),
    ("ddpm", 0.0, "beta_tilde", "noise", "cosine"), ("ddpm", 0.0, "beta", "velocity", "scaled_linear")])
def test_ddpm_samplers_step_by_step_against_the_papers(method, eta, variance, prediction, schedule):
    sched = DiffusionSchedule(make_betas(schedule, 1000, 0.00085, 0.012) if schedule == "scaled_linear"
                              else make_betas(schedule, 1000), prediction=prediction)
    z = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 2, 4])
    gens = lambda: [torch.Generator().manual_seed(50 + i) for i in range(3)]  # noqa: E731
    ks = sampling_timesteps(1000, 4)
    ref = _algorithm_2(LinearEps(), z, y, sched, ks, method, eta, variance, gens())
    model = LinearEps()
    got = sample_ddpm(model, z, y, schedule=sched, method=method, num_steps=4, eta=eta, variance=variance,
                      generators=gens())
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    assert [c[0].tolist() for c in model.calls] == [[float(k)] * 3 for k in ks]  # the model sees t = k
    assert all(torch.equal(c[1], y) for c in model.calls)


def test_ddpm_sampler_guidance_reaches_every_channel_by_default_and_counts_calls():
    sched = DiffusionSchedule(make_betas("linear", 1000))
    z = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(6))  # 4 channels: more than upstream's 3
    y = torch.tensor([1, 3])
    ks = sampling_timesteps(1000, 3)
    for channels in (None, 2):
        ref = _algorithm_2(LinearEps(), z, y, sched, ks, "ddim", 0.0, "beta_tilde", None,
                           cfg=(2.5, 5, 4 if channels is None else channels))
        model, stats = LinearEps(), {}
        kw = {} if channels is None else {"cfg_channels": channels}
        got = sample_ddpm(model, z, y, schedule=sched, num_steps=3, cfg_scale=2.5, stats=stats, **kw)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
        assert stats == {"nfe": 3, "model_rows": 12}
        assert model.calls[0][1].tolist() == [1, 3, 5, 5]  # the null class: model.num_classes
    model = LinearEps()
    sample_ddpm(model, z, y, schedule=sched, num_steps=3, cfg_scale=2.5, null_class=0)
    assert model.calls[0][1].tolist() == [1, 3, 0, 0]


def test_ddpm_sampler_defaults_callbacks_and_the_global_rng():
    sched = DiffusionSchedule(make_betas("linear", 1000))
    z = torch.randn(2, 2, 1, 1, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1])
    model = LinearEps()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    steps, cleans = [], []
    x = sample_ddpm(model, z, y, schedule=sched, callback=lambda i, n: steps.append((i, n)),
                    on_clean=lambda i, xh: cleans.append((i, xh)))
    assert torch.equal(torch.get_rng_state(), before)  # DDIM with η = 0 (the default) draws no noise at all
    ks = sampling_timesteps(1000, 50)  # 50 steps by default
    assert [float(c[0][0]) for c in model.calls] == [float(k) for k in ks]
    assert steps == [(i, 50) for i in range(1, 51)] and [c[0] for c in cleans] == list(range(50))
    first = LinearEps()(z, torch.full((2,), 999.0), y)
    a = sched.alphas_cumprod[999].item()
    torch.testing.assert_close(cleans[0][1], (z - math.sqrt(1 - a) * first) / math.sqrt(a))
    torch.testing.assert_close(cleans[-1][1], x)  # the last step ends on x̂
    assert torch.equal(x, sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddim", num_steps=50, eta=0.0))
    # the DDPM sampler's default variance is β̃
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    d = sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddpm", num_steps=5, generators=gens())
    assert torch.equal(d, sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddpm", num_steps=5,
                                      variance="beta_tilde", generators=gens()))
    assert not torch.allclose(d, sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddpm", num_steps=5,
                                             variance="beta", generators=gens()))
    with pytest.raises(ValueError, match=r"^unknown sampling method 'euler' for the DDPM process; choose one of "
                                         r"ddim, ddpm$"):
        sample_ddpm(model, z, y, schedule=sched, method="euler")
    with pytest.raises(ValueError, match=r"^unknown DDPM variance 'fixed'; choose one of beta, beta_tilde$"):
        sample_ddpm(model, z, y, schedule=sched, variance="fixed")


def test_ddpm_stochastic_steps_without_generators_use_the_global_rng():
    sched = DiffusionSchedule(make_betas("linear", 1000))
    z = torch.randn(2, 2, 1, 1, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 1])
    torch.manual_seed(9)
    a = sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddim", eta=1.0, num_steps=5)
    torch.manual_seed(9)
    assert torch.equal(a, sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddim", eta=1.0, num_steps=5))
    assert not torch.equal(a, sample_ddpm(LinearEps(), z, y, schedule=sched, method="ddim", eta=1.0, num_steps=5))


def test_process_dispatch_passes_every_setting(monkeypatch):
    assert process.is_ddpm(SimpleNamespace(process="ddpm")) and not process.is_ddpm(SimpleNamespace(process="flow"))
    assert not process.is_ddpm(SimpleNamespace())  # configs from before the key: flow
    ddpm_cfg = SimpleNamespace(process="ddpm", schedule="cosine", num_timesteps=200, beta_start=0.001, beta_end=0.03,
                               prediction="velocity", use_cosine_loss=True)
    flow_cfg = SimpleNamespace(process="flow", use_cosine_loss=False)
    s = SimpleNamespace(sampling_method="ddpm", num_sampling_steps=17, eta=0.3, ddpm_variance="beta", cfg_scale=2.5,
                        cfg_channels=2, timestep_shift=0.4, cfg_interval_start=0.2, atol=1e-5, rtol=1e-2)
    seen = {}
    monkeypatch.setattr(process, "sample_ddpm", lambda *a, **kw: seen.update(ddpm=(a, kw)))
    monkeypatch.setattr(process, "sample_ode", lambda *a, **kw: seen.update(ode=(a, kw)))
    model, z, y, stats, gens, on_clean = object(), torch.zeros(1), torch.zeros(1), {}, [object()], print
    process.sample(model, z, y, ddpm_cfg, s, null_class=7, stats=stats, generators=gens, on_clean=on_clean)
    args, kw = seen["ddpm"]
    sched = kw.pop("schedule")
    assert torch.equal(sched.betas, make_betas("cosine", 200)) and sched.prediction == "velocity"
    assert args[0] is model and args[1] is z and args[2] is y
    assert kw == dict(method="ddpm", num_steps=17, eta=0.3, variance="beta", cfg_scale=2.5, null_class=7,
                      cfg_channels=2, generators=gens, on_clean=on_clean, stats=stats)
    process.sample(model, z, y, flow_cfg, s, null_class=7, stats=stats)
    args, kw = seen["ode"]
    assert args[0] is model and args[1] is z and args[2] is y
    assert kw == dict(method="ddpm", num_steps=17, timestep_shift=0.4, cfg_scale=2.5, cfg_interval_start=0.2,
                      null_class=7, cfg_channels=2, atol=1e-5, rtol=1e-2, stats=stats)
    # the losses: DDPM's on the config's schedule and prediction, flow's with the config's cosine switch
    g = torch.Generator().manual_seed(3)
    x1, x0, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g), torch.tensor([0.2, 0.7])
    net = lambda x, tt, labels: 0.3 * x  # noqa: E731
    yy = torch.zeros(2, dtype=torch.int64)
    got = process.loss_function(ddpm_cfg)(net, x1, yy, t=t, x0=x0)
    want = ddpm_losses(net, x1, yy, schedule=DiffusionSchedule(make_betas("cosine", 200, 0.001, 0.03), "velocity"),
                       t=t, x0=x0)
    torch.testing.assert_close(got["loss"], want["loss"])
    for cosine in (False, True):
        flow_cfg.use_cosine_loss = cosine
        got = process.loss_function(flow_cfg)(net, x1, yy, t=t, x0=x0)
        want = training_losses(net, x1, yy, t=t, x0=x0, use_cosine_loss=cosine)
        torch.testing.assert_close(got["loss"], want["loss"])
        assert (got["cos"] is None) != cosine


def test_dopri5_receives_both_tolerances():
    """sample_ode's atol and rtol reach torchdiffeq: a loose one of either takes fewer model calls than a tight one."""
    from repro.transport import sample_ode

    field = lambda x, t, y: torch.sin(3 * x) * (1 + t.view(-1, 1, 1, 1)) - x  # noqa: E731
    z, y = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(2, dtype=torch.int64)

    def nfe(atol, rtol):
        stats = {}
        sample_ode(field, z, y, method="dopri5", atol=atol, rtol=rtol, stats=stats)
        return stats["nfe"]

    assert nfe(1e-9, 1e-2) < nfe(1e-9, 1e-8)  # rtol, with atol tight
    assert nfe(1e-2, 1e-9) < nfe(1e-8, 1e-9)  # atol, with rtol tight


class _Wrapped(torch.nn.Module):
    """How torch.compile (`_orig_mod`) and DDP (`module`) hold a model: the wrapper has no num_classes."""

    def __init__(self, attr: str, inner: torch.nn.Module):
        super().__init__()
        setattr(self, attr, inner)
        self.attr = attr

    def forward(self, x, t, y):
        return getattr(self, self.attr)(x, t, y)


def test_null_class_is_found_through_compile_and_ddp_wrappers():
    inner = RowRecorder()
    x, y = _batch(2)
    with torch.no_grad():
        for wrapper in (_Wrapped("_orig_mod", inner), _Wrapped("module", inner),
                        _Wrapped("_orig_mod", _Wrapped("module", inner))):  # compiled DDP
            guided_velocity(wrapper, x, 0.5, y, cfg_scale=2.0)
            assert inner.calls[-1].tolist() == y.tolist() + [TINY_CLASSES] * 2
