"""MMPS/DPS guidance against the closed-form posterior of a Gaussian prior."""

from __future__ import annotations

import pytest
import torch
from wind_bmi.model.denoiser import GaussianDenoiser
from wind_bmi.model.guidance import GAMMA_MAX, DPSDenoiser, MMPSDenoiser, _gamma, conjugate_gradient, conjugate_gradient_image
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


def test_mmps_with_full_cg_matches_closed_form_posterior_mean():
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup()
    exact, prior_mean = closed_form_posterior(mu, cov, sched, z, t, A_mat, y, var_y)
    out = MMPSDenoiser(D, Observation(A, y[None], var_y), cg_iterations=len(y))(z, t)
    assert torch.allclose(out.reshape(-1), exact, atol=1e-8)
    # and the guidance actually moved the estimate (the test would catch a no-op)
    assert (exact - prior_mean).abs().max() > 1e-2


def test_mmps_one_iteration_reduces_residual_and_keeps_clean_frames():
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup()
    x_prior = D(z, t)
    out = MMPSDenoiser(D, Observation(A, y[None], var_y), cg_iterations=1)(z, t)
    r0 = (y - A(x_prior)[0]).norm()
    r1 = (y - A(out)[0]).norm()
    assert r1 < r0
    # frame 0 is clean (t == 0): the guidance adds nothing there (Gamma = 0)
    assert torch.equal(out[:, 0], x_prior[:, 0])
    assert torch.allclose(out[:, 0], z[:, 0], atol=1e-10)
    assert not torch.allclose(out[:, 1:], x_prior[:, 1:])


def test_frames_noisier_than_gamma_max_keep_the_prior_estimate():
    # frame 2 at t = 1 (Gamma = sigma^2 / alpha ~ 1000): its estimate is the prior's, frame 1's is guided
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup(t_frames=(0.0, 0.6, 1.0), n_obs=8)
    gam = _gamma(D, t)[0, :, 0, 0, 0]
    assert gam[1] < GAMMA_MAX < gam[2]
    obs = Observation(A, y[None], var_y)
    x_prior = D(z, t)
    for method in (MMPSDenoiser(D, obs, cg_iterations=3), DPSDenoiser(D, obs, scale=0.1)):
        out = method(z, t)
        assert torch.equal(out[:, 2], x_prior[:, 2])
        assert not torch.allclose(out[:, 1], x_prior[:, 1])
    # gamma_max=None guides every frame (the setting whose t = 1 steps diverged on the shipped prior)
    assert not torch.allclose(MMPSDenoiser(D, obs, 3, gamma_max=None)(z, t)[:, 2], x_prior[:, 2])
    # nothing to guide at this level: the prior's estimate, without a CG solve
    t_all = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(MMPSDenoiser(D, obs, 3)(z, t_all), D(z, t_all))
    with pytest.raises(ValueError, match="gamma_max"):
        MMPSDenoiser(D, obs, 3, gamma_max=0.0)


def test_guidance_config_default_is_the_library_default():
    from wind_bmi.config import AssimilationConfig, GuidanceConfig

    assert GuidanceConfig().gamma_max == AssimilationConfig().gamma_max == GAMMA_MAX


def test_dps_moves_towards_observations():
    sched, mu, cov, D, t, z, A, A_mat, y, var_y = setup()
    x_prior = D(z, t)
    out = DPSDenoiser(D, Observation(A, y[None], var_y), scale=0.1)(z, t)
    assert (y - A(out)[0]).norm() < (y - A(x_prior)[0]).norm()


def test_conjugate_gradient_solves_spd_system_exactly_in_n_iterations():
    g = torch.Generator().manual_seed(3)
    L = torch.randn(6, 6, generator=g, dtype=torch.float64)
    M = L @ L.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(2, 6, generator=g, dtype=torch.float64)
    u = conjugate_gradient(lambda v: v @ M.T, b, 6)
    assert torch.allclose(u @ M.T, b, atol=1e-9)
    u1 = conjugate_gradient(lambda v: v @ M.T, b, 1)
    assert not torch.allclose(u1 @ M.T, b, atol=1e-3)


def test_cg_image_accumulates_the_linear_image_of_the_solution_with_one_apply_per_iteration():
    g = torch.Generator().manual_seed(4)
    L = torch.randn(6, 6, generator=g, dtype=torch.float64)
    M = L @ L.T + torch.eye(6, dtype=torch.float64)
    K = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)  # a linear map into another shape
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    calls = []

    def apply(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return p @ M.T, torch.einsum("bi,ijk->bjk", p, K)

    for n in (1, 2, 6):
        calls.clear()
        u, Ku = conjugate_gradient_image(apply, b, n)
        assert len(calls) == n  # the MMPS correction costs no extra VJP
        assert torch.allclose(Ku, torch.einsum("bi,ijk->bjk", u, K), atol=1e-10)
        assert torch.allclose(u, conjugate_gradient(lambda v: v @ M.T, b, n), atol=1e-12)


def test_cg_stops_a_row_at_non_positive_curvature_and_keeps_the_others():
    """MMPS's system holds the network's (bf16) Jacobian, so a direction can have p^T M p <= 0: that
    row stops where it stands instead of dividing by a clamped zero (a ~1e30 step, then NaN)."""
    g = torch.Generator().manual_seed(5)
    L = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd = L @ L.T + torch.eye(6, dtype=torch.float64)
    indefinite = torch.diag(torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0, 6.0], dtype=torch.float64))
    b = torch.randn(2, 6, generator=g, dtype=torch.float64)
    b[1] = torch.tensor([3.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # b.Mb = 6 > 0, the second direction's p.Mp = -200

    def apply(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([p[0] @ spd.T, p[1] @ indefinite.T]), 2.0 * p

    u, Ku = conjugate_gradient_image(apply, b, 6)
    assert torch.isfinite(u).all() and torch.isfinite(Ku).all()
    assert torch.allclose(u[0] @ spd.T, b[0], atol=1e-9)  # the SPD row still converges exactly
    assert torch.allclose(Ku, 2.0 * u, atol=1e-12)
    # row 1 kept its first (positive-curvature) step only: u = alpha_0 b with alpha_0 = b.b / b.Mb
    assert (b[1] @ indefinite @ b[1]) > 0
    alpha0 = (b[1] @ b[1]) / (b[1] @ indefinite @ b[1])
    assert torch.allclose(u[1], alpha0 * b[1], atol=1e-12)
    # a non-finite image ends the row too, without spreading NaN to the result
    u_nan, Ku_nan = conjugate_gradient_image(lambda p: (p @ spd.T, p * float("nan")), b, 3)
    assert torch.equal(u_nan, torch.zeros_like(b)) and torch.equal(Ku_nan, torch.zeros_like(b))
