"""MMPS/DPS guidance against the closed-form posterior of a Gaussian prior."""

from __future__ import annotations

import pytest
import torch
from wind_bmi.model.denoiser import GaussianDenoiser
from wind_bmi.model.guidance import DPS_GAMMA_MAX, DPSDenoiser, MMPSDenoiser, _gamma
from wind_bmi.model.operators import MaskOperator, Observation
from wind_bmi.model.schedule import CosineVPSchedule

SHAPE = (3, 1, 2, 3)  # (T, C, H, W)
N = 18


def gaussian_prior(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(N, N, generator=g, dtype=torch.float64) / N**0.5
    cov = L @ L.T + 0.3 * torch.eye(N, dtype=torch.float64)
    mu = torch.randn(N, generator=g, dtype=torch.float64)
    return mu, cov


def closed_form_posterior(mu, cov, sched, z, t, A_mat, y, var_y):
    a, s = sched.coefficients(t)
    a = a.expand(1, *SHAPE).reshape(-1).double()
    s2 = (s**2).expand(1, *SHAPE).reshape(-1).double()
    At = torch.diag(a)
    M = At @ cov @ At + torch.diag(s2)
    gain = cov @ At @ torch.linalg.inv(M)
    m = mu + gain @ (z.reshape(-1).double() - a * mu)
    V = cov - gain @ At @ cov
    S = torch.diag(var_y) + A_mat @ V @ A_mat.T
    return m + V @ A_mat.T @ torch.linalg.solve(S, y - A_mat @ m), m


def setup(t_frames=(0.0, 0.6, 0.9), n_obs=5, seed=1):
    sched = CosineVPSchedule()
    mu, cov = gaussian_prior()
    D = GaussianDenoiser(mu, cov, SHAPE, sched)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([t_frames], dtype=torch.float64)
    z = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    flat = torch.randperm(N, generator=g)[:n_obs]
    mask.view(-1)[flat] = True
    A = MaskOperator(mask)
    A_mat = torch.eye(N, dtype=torch.float64)[A.index]
    y = torch.randn(n_obs, generator=g, dtype=torch.float64)
    var_y = torch.full((n_obs,), 0.05, dtype=torch.float64)
    return sched, mu, cov, D, t, z, A, A_mat, y, var_y


@pytest.mark.parametrize("solver", ["cg", "gmres", "direct"])
def test_mmps_with_a_full_solve_matches_closed_form_posterior_mean(solver: str):
    """For a Gaussian prior the Tweedie covariance is exact and symmetric: every solver, run to
    completion, reproduces the closed-form posterior mean."""
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup()
    exact, prior_mean = closed_form_posterior(mu, cov, sched, z, t, A_mat, y, var_y)
    out = MMPSDenoiser(D, Observation(A, y[None], var_y), iterations=len(y), solver=solver)(z, t)
    assert torch.allclose(out.reshape(-1), exact, atol=1e-8)
    # and the guidance actually moved the estimate (the test would catch a no-op)
    assert (exact - prior_mean).abs().max() > 1e-2


def test_mmps_one_iteration_reduces_residual_and_keeps_clean_frames():
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup()
    x_prior = D(z, t)
    out = MMPSDenoiser(D, Observation(A, y[None], var_y), iterations=1, solver="gmres")(z, t)
    r0 = (y - A(x_prior)[0]).norm()
    r1 = (y - A(out)[0]).norm()
    assert r1 < r0
    # frame 0 is clean (t == 0): the guidance adds nothing there (Gamma = 0)
    assert torch.equal(out[:, 0], x_prior[:, 0])
    assert torch.allclose(out[:, 0], z[:, 0], atol=1e-10)
    assert not torch.allclose(out[:, 1:], x_prior[:, 1:])


def test_mmps_guides_every_noisy_frame_and_dps_skips_its_noisiest():
    # frame 2 at t = 1 (Gamma = sigma^2 / alpha ~ 1000): MMPS guides it, the DPS baseline leaves it alone
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup(t_frames=(0.0, 0.6, 1.0), n_obs=8)
    gam = _gamma(D, t)[0, :, 0, 0, 0]
    assert gam[1] < DPS_GAMMA_MAX < gam[2]
    obs = Observation(A, y[None], var_y)
    x_prior = D(z, t)
    mmps, dps = MMPSDenoiser(D, obs, 3)(z, t), DPSDenoiser(D, obs, scale=0.1)(z, t)
    assert not torch.allclose(mmps[:, 2], x_prior[:, 2]) and not torch.allclose(mmps[:, 1], x_prior[:, 1])
    assert torch.equal(dps[:, 2], x_prior[:, 2]) and not torch.allclose(dps[:, 1], x_prior[:, 1])
    # nothing to guide (every frame clean): the prior's estimate, without a solve
    t_clean = torch.zeros(1, 3, dtype=torch.float64)
    assert torch.equal(MMPSDenoiser(D, obs, 3)(z, t_clean), D(z, t_clean))
    with pytest.raises(ValueError, match="gamma_max"):
        DPSDenoiser(D, obs, gamma_max=0.0)
    with pytest.raises(ValueError, match="solver"):
        MMPSDenoiser(D, obs, 3, solver="lu")


def test_dps_moves_towards_observations():
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup()
    x_prior = D(z, t)
    out = DPSDenoiser(D, Observation(A, y[None], var_y), scale=0.1)(z, t)
    assert (y - A(out)[0]).norm() < (y - A(x_prior)[0]).norm()
