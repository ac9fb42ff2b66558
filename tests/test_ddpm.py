"""The DDPM process (repro.transport.ddpm): each formula against an independent derivation, so a wrong one fails.

- forward noising against the Markov chain it closes (mean and variance recursions, and Monte Carlo);
- the cosine ᾱ against Nichol & Dhariwal 2021's published formula, written out here;
- the DDPM step against the Gaussian posterior q(x_{k-1} | x_k, x) derived by conditioning;
- DDIM with η = 1 is DDPM with β̃ (same noise, all T steps); DDIM with η = 0 is deterministic and, with the
  exact ε of a single point, lands on it;
- on a 2-D Gaussian mixture whose ε is known in closed form, DDIM (50 steps) and DDPM (all 1,000 and 100
  respaced) land on the mixture: its weights, means and spread; a sampler with a wrong coefficient does not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from repro.transport import ddpm
from repro.transport.ddpm import DiffusionSchedule, make_betas, sample_ddpm, sampling_timesteps, step_coefficients

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_forward_noising_is_the_closed_form_of_the_markov_chain():
    for schedule in ("linear", "scaled_linear", "cosine"):
        betas = make_betas(schedule, 1000, 1e-4, 0.02)
        sched = DiffusionSchedule(betas)
        # chain: x_k = sqrt(1 - β_k) x_{k-1} + sqrt(β_k) e_k; its mean coefficient and variance, recursively
        mean_coef, var = 1.0, 0.0
        means, variances = [], []
        for b in betas.tolist():
            mean_coef, var = mean_coef * math.sqrt(1 - b), (1 - b) * var + b
            means.append(mean_coef)
            variances.append(var)
        k = torch.arange(1000)
        one, zero = torch.ones(1000, 1, dtype=torch.float64), torch.zeros(1000, 1, dtype=torch.float64)
        np.testing.assert_allclose(sched.q_sample(one, k, zero).squeeze(1), means, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sched.q_sample(zero, k, one).squeeze(1) ** 2, variances, rtol=1e-9, atol=1e-12)
    # Monte Carlo: run the chain itself 400 steps on 20,000 points and compare with one q_sample draw's moments
    sched = DiffusionSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000,), 1.5, dtype=torch.float64)
    x = x0.clone()
    for b in sched.betas[:400].tolist():
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    a = float(sched.alphas_cumprod[399])
    assert abs(float(x.mean()) - math.sqrt(a) * 1.5) < 0.03 and abs(float(x.var()) - (1 - a)) < 0.03


def test_schedules_match_their_published_definitions():
    T = 1000
    betas = make_betas("linear", T, 1e-4, 0.02)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == T
    sl = make_betas("scaled_linear", T, 0.00085, 0.012)
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    assert sl[500] < (0.00085 + 0.012) / 2  # sqrt-linear lies below the straight line
    # Nichol & Dhariwal 2021 eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), s = 0.008; paper t = k + 1
    s = 0.008
    f = lambda t: np.cos(((t / T) + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    published = f(np.arange(1, T + 1)) / f(0)
    cos = DiffusionSchedule(make_betas("cosine", T))
    unclamped = np.nonzero(cos.betas.numpy() < 0.999)[0]
    assert len(unclamped) == T - 1 and cos.betas[-1] == 0.999  # only the last β (ᾱ_T = 0) hits the clamp
    np.testing.assert_allclose(cos.alphas_cumprod.numpy()[unclamped], published[unclamped], rtol=1e-10)


def test_ddpm_step_is_the_gaussian_posterior():
    sched = DiffusionSchedule(make_betas("cosine", 1000))
    abar = sched.alphas_cumprod.tolist()
    for k in (1, 10, 500, 998):
        a, ap = abar[k], abar[k - 1]
        alpha = a / ap
        # condition the joint Gaussian of (x_{k-1}, x_k) given x: cov = sqrt(α)(1 - ᾱ_{k-1}), var(x_k) = 1 - ᾱ_k
        x, xk = 0.7, -1.3
        mean = math.sqrt(ap) * x + math.sqrt(alpha) * (1 - ap) / (1 - a) * (xk - math.sqrt(a) * x)
        var = (1 - ap) - alpha * (1 - ap) ** 2 / (1 - a)
        eps = (xk - math.sqrt(a) * x) / math.sqrt(1 - a)
        c_data, c_eps, sigma = step_coefficients(a, ap, "ddpm", 0.0, "beta_tilde")
        assert c_data * x + c_eps * eps == pytest.approx(mean, rel=1e-9)
        assert sigma ** 2 == pytest.approx(var, rel=1e-9)
        assert step_coefficients(a, ap, "ddpm", 0.0, "beta")[2] ** 2 == pytest.approx(sched.betas[k].item(), rel=1e-9)
        # DDIM η = 1 has the same mean and variance (Song et al.: η = 1 is DDPM)
        assert step_coefficients(a, ap, "ddim", 1.0, "beta") == pytest.approx((c_data, c_eps, sigma), rel=1e-9)


def test_sampling_timesteps_cover_the_process():
    assert sampling_timesteps(1000, 1000) == list(range(999, -1, -1))
    ks = sampling_timesteps(1000, 50)
    assert ks[0] == 999 and ks[-1] == 0 and len(set(ks)) == 50 and ks == sorted(ks, reverse=True)
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(1000, 1001)


# ---------------------------------------------------------------------------------------------
# a model whose ε is exact: a 2-D Gaussian mixture


class MixtureOracle(torch.nn.Module):
    """E[ε | x_k] of data ~ Σ π_j N(μ_j, s² I), in closed form (noise or v output)."""

    def __init__(self, sched: DiffusionSchedule, weights, means, spread: float):
        super().__init__()
        self.sched, self.num_classes = sched, 1
        self.w, self.mu, self.s = torch.tensor(weights, dtype=torch.float64), torch.tensor(means, dtype=torch.float64), spread

    def forward(self, x, t, y):
        a = float(self.sched.alphas_cumprod[int(round(float(t[0])))])
        xs = x.double().flatten(1)  # (N, 2)
        var = a * self.s ** 2 + 1 - a
        centres = math.sqrt(a) * self.mu  # (J, 2)
        logp = torch.log(self.w) - ((xs[:, None] - centres[None]) ** 2).sum(-1) / (2 * var)
        resp = torch.softmax(logp, dim=1)
        score = (resp[:, :, None] * (centres[None] - xs[:, None])).sum(1) / var
        eps = -math.sqrt(1 - a) * score
        if self.sched.prediction == "velocity":
            data = (xs - math.sqrt(1 - a) * eps) / math.sqrt(a)
            eps = math.sqrt(a) * eps - math.sqrt(1 - a) * data
        return eps.view_as(x).to(x.dtype)


WEIGHTS, MEANS, SPREAD = [0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 0.25


def mixture_check(samples: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """(share, distance of the mean from μ, std per coordinate) of each component, by nearest mode."""
    x = samples.double().flatten(1)
    mu = torch.tensor(MEANS, dtype=torch.float64)
    nearest = ((x[:, None] - mu[None]) ** 2).sum(-1).argmin(1)
    shares, errors, stds = [], [], []
    for j in range(len(MEANS)):
        part = x[nearest == j]
        shares.append(len(part) / len(x))
        errors.append(float((part.mean(0) - mu[j]).norm()))
        stds.append(float(part.std(0).mean()))
    return shares, errors, stds


def lands_on_the_mixture(samples: torch.Tensor) -> bool:
    shares, errors, stds = mixture_check(samples)
    return (all(abs(s - w) < 0.04 for s, w in zip(shares, WEIGHTS)) and max(errors) < 0.05
            and all(abs(s / SPREAD - 1) < 0.15 for s in stds))


def run_sampler(prediction="noise", schedule="linear", **kw) -> torch.Tensor:
    sched = DiffusionSchedule(make_betas(schedule, 1000), prediction=prediction)
    oracle = MixtureOracle(sched, WEIGHTS, MEANS, SPREAD)
    z = torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(z))] if kw.get("method") == "ddpm" or kw.get("eta") else None
    y = torch.zeros(len(z), dtype=torch.int64)
    return sample_ddpm(oracle, z, y, schedule=sched, generators=gens, **kw)


@pytest.mark.parametrize("kw", [dict(method="ddim", num_steps=50), dict(method="ddim", num_steps=50, prediction="velocity",
                                                                       schedule="cosine"),
                                dict(method="ddim", num_steps=100, eta=1.0), dict(method="ddpm", num_steps=100),
                                dict(method="ddpm", num_steps=100, variance="beta", schedule="cosine")])
def test_samplers_land_on_the_mixture(kw):
    samples = run_sampler(**kw)
    assert lands_on_the_mixture(samples), mixture_check(samples)


def test_a_wrong_coefficient_misses_the_mixture(monkeypatch):
    right = step_coefficients

    def wrong(a, ap, method, eta, variance):  # ε̂ weighted by sqrt(1 - ᾱ) instead of sqrt(1 - ᾱ_prev)
        c_data, _c_eps, sigma = right(a, ap, method, eta, variance)
        return c_data, math.sqrt(1 - a), sigma

    monkeypatch.setattr(ddpm, "step_coefficients", wrong)
    samples = run_sampler(method="ddim", num_steps=50)
    assert not lands_on_the_mixture(samples), mixture_check(samples)


@pytest.mark.slow
def test_ddpm_on_all_1000_steps_lands_on_the_mixture():
    samples = run_sampler(method="ddpm", num_steps=1000)
    assert lands_on_the_mixture(samples), mixture_check(samples)


def test_ddim_eta_one_is_ddpm_with_beta_tilde_and_eta_zero_is_deterministic():
    sched = DiffusionSchedule(make_betas("linear", 1000))
    oracle = MixtureOracle(sched, WEIGHTS, MEANS, SPREAD)
    z = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.int64)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(64)]  # noqa: E731
    a = sample_ddpm(oracle, z, y, schedule=sched, method="ddim", num_steps=1000, eta=1.0, generators=gens())
    b = sample_ddpm(oracle, z, y, schedule=sched, method="ddpm", num_steps=1000, variance="beta_tilde",
                    generators=gens())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    c = sample_ddpm(oracle, z, y, schedule=sched, method="ddim", num_steps=1000, eta=0.0)
    assert torch.equal(c, sample_ddpm(oracle, z, y, schedule=sched, method="ddim", num_steps=1000, eta=0.0))
    # a single point: the exact ε takes every DDIM path (any step count) onto it, ending on x̂
    point = DiffusionSchedule(make_betas("linear", 1000))
    single = MixtureOracle(point, [1.0], [[0.5, -1.0]], 1e-4)
    for steps in (1000, 50, 7):
        x = sample_ddpm(single, z, y, schedule=point, method="ddim", num_steps=steps)
        torch.testing.assert_close(x.flatten(1), torch.tensor([[0.5, -1.0]]).expand(64, 2),
                                   rtol=0, atol=1e-3)


def test_per_image_noise_does_not_depend_on_the_batch():
    sched = DiffusionSchedule(make_betas("linear", 100))
    oracle = MixtureOracle(sched, WEIGHTS, MEANS, SPREAD)
    z = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(6, dtype=torch.int64)
    gens = lambda idx: [torch.Generator().manual_seed(i) for i in idx]  # noqa: E731
    whole = sample_ddpm(oracle, z, y, schedule=sched, method="ddpm", num_steps=20, generators=gens(range(6)))
    part = sample_ddpm(oracle, z[2:4], y[2:4], schedule=sched, method="ddpm", num_steps=20, generators=gens(range(2, 4)))
    assert torch.equal(whole[2:4], part)


def test_the_training_loss_is_mse_on_the_chosen_target():
    sched = DiffusionSchedule(make_betas("linear", 1000), prediction="velocity")
    x1, x0 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9999])
    seen = {}

    def model(x, k, y):
        seen["k"] = k
        return torch.zeros_like(x)

    out = ddpm.ddpm_losses(model, x1, torch.zeros(4, dtype=torch.int64), schedule=sched, t=t, x0=x0)
    assert seen["k"].tolist() == [0.0, 250.0, 500.0, 999.0]
    a = sched.alphas_cumprod[[0, 250, 500, 999]].float().view(-1, 1, 1, 1)
    v = a.sqrt() * x0 - (1 - a).sqrt() * x1
    torch.testing.assert_close(out["loss"], (v ** 2).mean(dim=(1, 2, 3)))
    assert out["cos"] is None
