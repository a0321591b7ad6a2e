"""Observation operators: adjoints (dot-product test), dry air mass vs numpy, point = mask at nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BOUNDS, gaussian_like_lats
from wind_bmi.model.operators import (
    AreaMeanOperator,
    AveragePoolOperator,
    DryAirMassOperator,
    MaskOperator,
    PointOperator,
    SparseLinearOperator,
    TemporalMeanOperator,
)
from wind_bmi.model.physics import cell_areas, latitude_weights

T, C, H, W = 3, 4, 8, 16
LAT = torch.tensor(gaussian_like_lats(H))
LON = torch.arange(W, dtype=torch.float64) * 360.0 / W


def linear_ops() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(T, C, H, W, generator=g) < 0.1
    rows = torch.randint(0, 5, (20,), generator=g)
    cols = torch.randint(0, H * W, (20,), generator=g)
    return {
        "mask": MaskOperator(mask),
        "pool": AveragePoolOperator(2, LAT, frames=[0, 2], channels=[1, 3]),
        "temporal": TemporalMeanOperator([0, 1, 2]),
        "sparse": SparseLinearOperator(rows, cols, torch.rand(20, generator=g, dtype=torch.float64), 5, 1, 2),
        "points": PointOperator(torch.tensor([89.0, -89.5, 10.0, 0.0]), torch.tensor([359.0, 180.0, -170.0, 5.0]),
                                LAT, LON, 2, 0),
        "area_mean": AreaMeanOperator([0, 1], [1, 2], LAT, W, torch.zeros(C), torch.ones(C)),
        "area_mean_per_frame": AreaMeanOperator([0, 1], [1, 2], LAT, W, torch.zeros(C), torch.ones(C), per_frame=True),
    }


@pytest.mark.parametrize("name", list(linear_ops()))
def test_linear_operator_adjoint_matches_autograd(name: str) -> None:
    A = linear_ops()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, C, H, W, generator=g, dtype=torch.float64)
    y = A(x)  # type: ignore[operator]
    v = torch.randn(y.shape, generator=g, dtype=torch.float64)
    _, vjp = torch.func.vjp(A, x)  # type: ignore[arg-type]
    (ATv,) = vjp(v)
    lhs = (A(x) * v).sum()  # type: ignore[operator]
    rhs = (x * ATv).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10)
    # linearity: A(a x + b x') = a A(x) + b A(x')
    x2 = torch.randn_like(x)
    assert torch.allclose(A(2 * x - 3 * x2), 2 * A(x) - 3 * A(x2), atol=1e-10)  # type: ignore[operator]


def test_average_pool_is_area_weighted_and_preserves_constants() -> None:
    pool = AveragePoolOperator(2, LAT)
    x = torch.ones(1, T, C, H, W)
    assert torch.allclose(pool(x), torch.ones(1, T * C * (H // 2) * (W // 2)))
    # the area-weighted global mean is preserved exactly (not the plain mean)
    f = torch.randn(H, W, dtype=torch.float64)
    a = cell_areas(LAT, W)
    coarse = pool.pool(f)
    ca = a.reshape(H // 2, 2, W // 2, 2).sum(dim=(1, 3))
    assert torch.allclose((coarse * ca).sum() / ca.sum(), (f * a).sum() / a.sum())


def test_point_observations_at_grid_nodes_equal_the_mask_operator() -> None:
    g = torch.Generator().manual_seed(2)
    ii = torch.randint(0, H, (6,), generator=g)
    jj = torch.randint(0, W, (6,), generator=g)
    pts = PointOperator(LAT[ii], LON[jj], LAT, LON, frame=1, channel=3)
    x = torch.randn(2, T, C, H, W, generator=g, dtype=torch.float64)
    assert torch.allclose(pts(x), x[:, 1, 3, ii, jj])
    mask = torch.zeros(T, C, H, W, dtype=torch.bool)
    mask[1, 3, ii, jj] = True
    order = torch.argsort(ii * W + jj)
    assert torch.allclose(pts(x)[:, order], MaskOperator(mask)(x))


def test_point_observations_wrap_the_date_line_and_cross_the_pole() -> None:
    x = torch.zeros(1, T, C, H, W, dtype=torch.float64)
    x[0, 0, 0, :, 0] = 1.0  # the 0-degree column
    half = float(LON[1]) / 2
    east = PointOperator(torch.tensor([0.0]), torch.tensor([-half]), LAT, LON, 0, 0)  # between 360-d and 0
    assert float(east(x)) == pytest.approx(0.5)
    # beyond the last latitude row the stencil crosses the pole: at the pole itself half the weight
    # goes to the last row on the far side (longitude + 180), a quarter of the way there a quarter
    x2 = torch.zeros(1, T, C, H, W, dtype=torch.float64)
    x2[0, 0, 0, -1, W // 2] = 2.0  # northern row, on the far side of the pole
    p = PointOperator(torch.tensor([90.0]), torch.tensor([0.0]), LAT, LON, 0, 0)
    assert float(p(x2)) == pytest.approx(2.0 * 0.5)
    beyond = (float(LAT[-1]) + 90.0) / 2
    p = PointOperator(torch.tensor([beyond]), torch.tensor([0.0]), LAT, LON, 0, 0)
    assert float(p(x2)) == pytest.approx(2.0 * 0.25)
    # a smooth field is interpolated accurately at random points, including across 0/360
    la, lo = torch.meshgrid(torch.deg2rad(LAT), torch.deg2rad(LON), indexing="ij")
    field = torch.cos(la) * torch.cos(lo)
    x3 = torch.zeros(1, T, C, H, W, dtype=torch.float64)
    x3[0, 0, 0] = field
    plat = torch.tensor([10.0, -30.0, 45.0])
    plon = torch.tensor([-1.0, 359.5, 100.0])
    got = PointOperator(plat, plon, LAT, LON, 0, 0)(x3)[0]
    want = (torch.cos(torch.deg2rad(plat)) * torch.cos(torch.deg2rad(plon))).double()
    assert torch.allclose(got, want, atol=0.05)


def test_dry_air_mass_matches_an_independent_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    K = 3
    ps = 1e5 + 500 * rng.standard_normal((H, W))
    q = np.abs(5e-3 * rng.standard_normal((K, H, W)))
    dsig = np.abs(BOUNDS[:, 0] - BOUNDS[:, 1])
    # independent geometry: edges from numpy, area = R^2 |dsin| dlon
    lat = gaussian_like_lats(H)
    edges = np.concatenate([[-90.0], 0.5 * (lat[1:] + lat[:-1]), [90.0]])
    dA = 6.371e6**2 * np.abs(np.diff(np.sin(np.deg2rad(edges))))[:, None] * (2 * np.pi / W) * np.ones((H, W))
    want = np.sum(dA * (ps / 9.80665 - (q * dsig[:, None, None]).sum(axis=0) * ps / 9.80665))
    mean = torch.zeros(1 + K, dtype=torch.float64)
    std = torch.ones(1 + K, dtype=torch.float64)
    x = torch.from_numpy(np.concatenate([ps[None], q]))[None, None]  # (1, 1, 1+K, H, W), "normalised" = physical
    op = DryAirMassOperator(0, [1, 2, 3], torch.from_numpy(dsig), LAT, W, mean, std, m_ref=want, frames=[0])
    assert float(op.mass(x)) == pytest.approx(want, rel=1e-12)
    assert float(op(x)) == pytest.approx(1.0, rel=1e-12)
    assert 5.0e18 < want < 5.3e18  # Earth-like (Trenberth & Smith 2005: 5.135e18 kg)


def test_latitude_weights_have_mean_one_and_follow_area() -> None:
    w = latitude_weights(LAT)
    assert float(w.mean()) == pytest.approx(1.0)
    assert w[H // 2] > w[0]


def test_constraint_projections_meet_their_targets_exactly_and_change_only_what_they_must() -> None:
    from wind_bmi.model.operators import Observation
    from wind_bmi.model.tasks import project_constraints

    g = torch.Generator().manual_seed(1)
    K = 3  # channels: ps, q at 3 levels, temperature
    mean = torch.tensor([1e5, 4e-3, 2e-3, 5e-4, 270.0], dtype=torch.float64)
    std = torch.tensor([800.0, 3e-3, 1.5e-3, 4e-4, 15.0], dtype=torch.float64)
    x = torch.randn(2, T, 1 + K + 1, H, W, generator=g)
    x[:, :, 1:4] = x[:, :, 1:4].clamp(min=-1.0)  # q >= 0 in physical units
    dsig = torch.from_numpy(np.abs(BOUNDS[:, 0] - BOUNDS[:, 1]))
    frames = [1, 2]
    region = torch.zeros(H, W, dtype=torch.bool)
    region[2:5, 3:9] = True
    warm = AreaMeanOperator([4], frames, LAT, W, mean, std, region)
    wet = AreaMeanOperator([1, 2, 3], frames, LAT, W, mean, std, positive=True)
    mass = DryAirMassOperator(0, [1, 2, 3], dsig, LAT, W, mean, std, 1.0, frames)
    m0 = mass.mass(x)[:, :1].double()
    mass = DryAirMassOperator(0, [1, 2, 3], dsig, LAT, W, mean, std, float(m0.mean()), frames)
    obs = [Observation(mass, torch.ones(2, len(frames)), 1e-10),
           Observation(warm, warm(x) + 2.0, 1e-6), Observation(wet, wet(x) * 1.14, 1e-12)]
    out = project_constraints(x, obs)
    assert torch.allclose(warm(out), warm(x) + 2.0, atol=1e-4)
    assert torch.allclose(wet(out), wet(x) * 1.14, rtol=1e-5)
    assert torch.allclose(mass(out).double(), torch.ones(2, 2, dtype=torch.float64), atol=1e-6)  # last: exact
    phys_q = out[:, :, 1:4] * std[1:4, None, None].float() + mean[1:4, None, None].float()
    assert float(phys_q.min()) >= -1e-9  # humidity scaled, not shifted below zero
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, 3:], x[:, 3:])  # other frames kept
    assert torch.equal(out[:, 1:3, 4][:, :, ~region], x[:, 1:3, 4][:, :, ~region])  # outside the region kept
    # the dry-air-mass constraint last: projected first, the humidity scaling would undo it
    wrong = x
    for o in obs:
        wrong = o.A.project(wrong, o.target(o.A(wrong)))
    assert float((mass(wrong) - 1).abs().max()) > 1e-4


def test_per_frame_area_means_are_met_in_every_frame_and_a_window_mean_is_not() -> None:
    """A warming target holds at every output time only when it is one entry per frame: a guided window
    warmed unevenly (+1.8 K in one frame, +2.2 K in the next) projected onto the window's mean keeps
    that unevenness; projected per frame, every frame is +2 K on the control."""
    g = torch.Generator().manual_seed(2)
    mean, std = torch.full((C,), 270.0), torch.full((C,), 10.0)
    control = torch.randn(2, T, C, H, W, generator=g)
    guided = control.clone()
    guided[:, 1, :2] += 0.18  # +1.8 K (std 10 K)
    guided[:, 2, :2] += 0.22  # +2.2 K
    frames = [1, 2]
    per = AreaMeanOperator([0, 1], frames, LAT, W, mean, std, per_frame=True)
    win = AreaMeanOperator([0, 1], frames, LAT, W, mean, std)
    assert per(control).shape == (2, 2) and win(control).shape == (2, 1)
    assert torch.allclose(per(control).mean(dim=1, keepdim=True), win(control), atol=1e-4)
    out = per.project(guided, per(control) + 2.0)
    assert torch.allclose(per(out), per(control) + 2.0, atol=1e-4)
    assert torch.equal(out[:, 0], guided[:, 0])
    by_window = win.project(guided, win(control) + 2.0)
    assert torch.allclose(win(by_window), win(control) + 2.0, atol=1e-4)
    assert float((per(by_window) - per(control) - 2.0).abs().max()) > 0.15  # the frames still miss by 0.2 K
