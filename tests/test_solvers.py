"""The linear solvers of MMPS: GMRES for the network's non-symmetric systems, CG for SPD ones, the
exact small-y solve, and the image ``K u`` assembled from the products the solver already made."""

from __future__ import annotations

import pytest
import torch
from wind_bmi.model.solvers import SolverError, conjugate_gradient, direct_solve, gmres, solve


def matrices(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, n, generator=g, dtype=torch.float64)
    spd = L @ L.T / n + torch.eye(n, dtype=torch.float64)
    skew = torch.randn(n, n, generator=g, dtype=torch.float64)
    skew = 1.5 * (skew - skew.T)  # a skew part larger than the symmetric one, as measured on the network
    b = torch.randn(3, n, generator=g, dtype=torch.float64)
    return spd, spd + skew, b


def linear(M: torch.Tensor, K: torch.Tensor | None = None):
    calls = []

    def apply(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return p @ M.T, (p if K is None else torch.einsum("bi,ijk->bjk", p, K))

    return apply, calls


def test_on_a_non_symmetric_system_cg_diverges_and_gmres_converges() -> None:
    _, M, b = matrices(0)
    sym, skew = 0.5 * (M + M.T), 0.5 * (M - M.T)
    assert torch.linalg.matrix_norm(skew) > torch.linalg.matrix_norm(sym)  # far from symmetric
    apply, _ = linear(M)
    g = gmres(apply, b, 8)
    assert torch.allclose(g.u @ M.T, b, atol=1e-8)  # exact in n iterations
    assert (g.residuals[:, 1:] <= g.residuals[:, :-1] + 1e-12).all()  # never grows
    assert g.residuals[:, -1].max() < 1e-8
    try:
        c = conjugate_gradient(apply, b, 8)
        cg_final = c.residuals[:, -1]
        assert (cg_final > 1e-3).any() and (c.residuals.max(dim=1).values > 1.0).any()  # grows, does not converge
    except SolverError as exc:  # or meets non-positive curvature and says so
        assert "not SPD" in str(exc)


def test_cg_is_exact_on_spd_systems_and_refuses_indefinite_ones() -> None:
    spd, _, b = matrices(1)
    apply, _ = linear(spd)
    c = conjugate_gradient(apply, b, 8)
    assert torch.allclose(c.u @ spd.T, b, atol=1e-8)
    assert torch.allclose(c.u, gmres(apply, b, 8).u, atol=1e-8)
    indefinite = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    with pytest.raises(SolverError, match="not SPD"):
        conjugate_gradient(linear(indefinite)[0], torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64), 3)


def test_direct_solve_equals_the_krylov_solve_with_enough_iterations() -> None:
    _, M, b = matrices(2)
    apply, calls = linear(M)
    d = direct_solve(apply, b)
    assert len(calls) == b.shape[1]  # one application per entry of y
    assert torch.allclose(d.u, gmres(apply, b, b.shape[1]).u, atol=1e-9)
    assert torch.allclose(d.u @ M.T, b, atol=1e-10) and d.residuals[:, -1].max() < 1e-10
    assert solve(apply, b, "auto", iterations=1, direct_max=8).residuals.shape[1] == 2  # auto: direct here
    assert solve(apply, b, "auto", iterations=2, direct_max=4).residuals.shape[1] == 3  # and GMRES there


def test_every_solver_assembles_k_u_from_the_products_it_made() -> None:
    _, M, b = matrices(3, n=6)
    K = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for name, run in (("gmres", lambda a: gmres(a, b, 4)), ("direct", lambda a: direct_solve(a, b)),
                      ("cg", lambda a: conjugate_gradient(a, b, 2))):
        apply, calls = linear(0.5 * (M + M.T) + 3 * torch.eye(6, dtype=torch.float64) if name == "cg" else M, K)
        out = run(apply)
        assert len(calls) == {"gmres": 4, "direct": 6, "cg": 2}[name], name  # no extra application for K u
        assert torch.allclose(out.Ku, torch.einsum("bi,ijk->bjk", out.u, K), atol=1e-10), name


def test_solvers_raise_instead_of_stopping_silently_on_non_finite_products() -> None:
    _, M, b = matrices(4)

    def bad(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return p @ M.T * float("nan"), p

    for run in (lambda: gmres(bad, b, 3), lambda: direct_solve(bad, b), lambda: conjugate_gradient(bad, b, 3)):
        with pytest.raises(SolverError, match="non-finite"):
            run()


def test_block_solve_meets_stiff_constraints_exactly_beside_many_observations() -> None:
    """A composite: two stiff constraints (whitened scale 1e4) beside 20 observations. GMRES with 3
    iterations spends its space on the stiff entries and leaves the observations unfitted; the block
    solve meets the constraints exactly and equals the direct solve with enough iterations."""
    from wind_bmi.model.solvers import block_solve

    g = torch.Generator().manual_seed(7)
    m = 22
    L = torch.randn(m, m, generator=g, dtype=torch.float64) / m**0.5
    M = torch.eye(m, dtype=torch.float64) + L @ L.T + 0.3 * (L - L.T)
    M[:2] *= 1e4  # the constraints' rows: precise targets make them the stiff part of the whitened system
    M[:, :2] *= 1e4
    M[:2, :2] += torch.eye(2, dtype=torch.float64)
    b = torch.randn(2, m, generator=g, dtype=torch.float64)
    exact = torch.zeros(m, dtype=torch.bool)
    exact[:2] = True
    apply, calls = linear(M)
    blk = block_solve(apply, b, exact, 3)
    assert len(calls) == 2 + 3  # one application per constraint, one per GMRES iteration
    r = b - blk.u @ M.T
    assert r[:, :2].abs().max() < 1e-8 * b[:, :2].abs().max()  # the constraints, exactly
    plain = gmres(linear(M)[0], b, 3)  # the same Krylov iterations without the exact block
    r_plain = b - plain.u @ M.T
    assert r[:, 2:].norm() < r_plain[:, 2:].norm()  # the observations fitted better too
    full = block_solve(linear(M)[0], b, exact, m - 2)
    assert torch.allclose(full.u, direct_solve(linear(M)[0], b).u, atol=1e-8)
    assert solve(linear(M)[0], b, "auto", iterations=3, direct_max=4, exact=exact).residuals.shape[1] == 4
