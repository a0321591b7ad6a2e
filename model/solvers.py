"""Linear solvers for MMPS's ``y``-space system ``M u = b`` (one system per batch row).

MMPS (Rozet et al., NeurIPS 2024) solves ``(Sigma_y + A' Gamma J^T A'^T) u = y - A(x_hat)`` with ``J``
the Jacobian of a trained denoiser. In exact arithmetic ``Gamma J^T`` is the Tweedie covariance,
symmetric positive definite; a trained network's Jacobian is not: measured on the shipped prior,
the skew part of ``M`` is 0.8-1.0 times its symmetric part along CG's search directions, and CG's
residual grows at every iteration (35 -> 3733 over 10 iterations at the first guided step). So:

- :func:`gmres` (the default; azula's and APPA's choice): minimises ``|b - M u|`` over the Krylov
  space, so its residual never grows, symmetric or not.
- :func:`conjugate_gradient`: only for provably symmetric positive-definite systems (the analytic
  Gaussian prior of the tests).
- :func:`direct_solve`: for a small ``y`` (area means, dry air mass, a few targets) builds ``M``
  exactly, one application per entry, and solves it; with few Krylov iterations the stiffest
  entry would take the whole space.

Every solver takes ``apply(p) -> (M p, K p)``: ``K`` is a second linear map evaluated alongside
``M`` (MMPS's ``V A'^T``). Since ``u`` is a combination of the vectors ``M`` was applied to, ``K u``
comes from the same products at no extra cost: ``n`` iterations cost ``n`` backward passes through
the network. Reductions are in float64. Each returns a :class:`Solve` with the residual history
``|b - M u_k| / |b|`` per row, and raises :class:`SolverError` instead of stopping silently when an
application returns non-finite values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Apply = Callable[[Tensor], tuple[Tensor, Any]]


class SolverError(FloatingPointError):
    """The system produced non-finite values (e.g. a network Jacobian-vector product overflowed)."""


@dataclasses.dataclass
class Solve:
    """Result of a solve: ``u (B, M)``, ``K u`` (``K``'s output shape), and the relative residual norms
    ``residuals (B, n + 1)``: ``|b - M u_k| / |b|`` after ``k = 0 .. n`` iterations (1 where ``b = 0``)."""

    u: Tensor
    Ku: Any
    residuals: Tensor


def _check(Mp: Tensor, Kp: Any, where: str) -> None:
    parts = Kp if isinstance(Kp, tuple) else (Kp,)
    if not (torch.isfinite(Mp).all() and all(torch.isfinite(k).all() for k in parts)):
        raise SolverError(f"{where}: the system returned non-finite values")


def _lincomb(coef: Tensor, items: list[Any]) -> Any:
    """``sum_i coef[:, i] * items[i]`` per batch row; items are tensors ``(B, ...)`` or tuples of them."""
    if isinstance(items[0], tuple):
        return tuple(_lincomb(coef, [it[j] for it in items]) for j in range(len(items[0])))
    shape = (-1, *([1] * (items[0].dim() - 1)))
    return sum(coef[:, i].to(items[i].dtype).reshape(shape) * items[i] for i in range(len(items)))


def _rel(r: Tensor, b_norm: Tensor) -> Tensor:
    return torch.where(b_norm > 0, r / b_norm.clamp_min(1e-300), torch.ones_like(r))


def gmres(apply: Apply, b: Tensor, iterations: int) -> Solve:
    """GMRES from ``u_0 = 0`` with a fixed number of iterations (Saad & Schultz 1986).

    Arnoldi with modified Gram-Schmidt builds ``M V_k = V_{k+1} H_k`` per row, then ``u = V_k c`` with
    ``c = argmin |beta e_1 - H_k c|`` (``beta = |b|``). A row whose Krylov space closes early (a
    "lucky breakdown": the exact solution is in it) keeps its solution.

    Args:
        apply: ``p (B, M) -> (M p, K p)``.
        b: right-hand sides ``(B, M)``.
        iterations: Krylov dimension ``n >= 1`` (capped at ``M``).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    B, m = b.shape
    n = min(iterations, m)
    bd = b.double()
    beta = bd.norm(dim=1)  # (B,)
    V = [bd / beta.clamp_min(1e-300)[:, None]]
    KV: list[Any] = []
    H = torch.zeros(B, n + 1, n, dtype=torch.float64, device=b.device)
    for j in range(n):
        Mv, Kv = apply(V[j].to(b.dtype))
        _check(Mv, Kv, f"GMRES iteration {j + 1}")
        KV.append(Kv)
        w = Mv.double()
        for i in range(j + 1):
            H[:, i, j] = (w * V[i]).sum(dim=1)
            w = w - H[:, i, j, None] * V[i]
        h = w.norm(dim=1)
        H[:, j + 1, j] = h
        # breakdown (h ~ 0): the space holds the solution; a zero vector keeps later columns inert
        V.append(torch.where(h[:, None] > 1e-12 * beta.clamp_min(1e-300)[:, None], w / h.clamp_min(1e-300)[:, None],
                             torch.zeros_like(w)))
    e1 = torch.zeros(B, n + 1, dtype=torch.float64, device=b.device)
    e1[:, 0] = beta
    residuals = [beta]
    c = torch.zeros(B, 0, dtype=torch.float64, device=b.device)
    for k in range(1, n + 1):  # the residual after k iterations: the small least-squares problem of size k
        Hk = H[:, : k + 1, :k]
        c = torch.linalg.lstsq(Hk, e1[:, : k + 1, None], driver="gelsd" if b.device.type == "cpu" else None
                               ).solution[..., 0]
        residuals.append((e1[:, : k + 1] - (Hk @ c[..., None])[..., 0]).norm(dim=1))
    u = sum(c[:, i, None] * V[i] for i in range(n))
    Ku = _lincomb(c, KV)
    return Solve(u.to(b.dtype), Ku, _rel(torch.stack(residuals, dim=1), beta[:, None]))  # type: ignore[arg-type]


def conjugate_gradient(apply: Apply, b: Tensor, iterations: int) -> Solve:
    """Conjugate gradient from ``u_0 = 0``: exact in ``M`` iterations for symmetric positive-definite ``M``.

    Only for systems known to be SPD (e.g. an analytic Gaussian prior); MMPS with a trained network
    uses :func:`gmres` (module docstring). A row whose curvature ``p^T M p`` is not positive raises
    :class:`SolverError`.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    u = torch.zeros_like(b)
    Ku: Tensor | None = None
    r = b.clone()
    p = r.clone()
    rr = (r.double() ** 2).sum(dim=1)
    beta = rr.sqrt()
    residuals = [beta]
    for k in range(iterations):
        Mp, Kp = apply(p)
        _check(Mp, Kp, f"CG iteration {k + 1}")
        pMp = (p.double() * Mp.double()).sum(dim=1)
        done = rr <= (1e-30 * beta.clamp_min(1e-300)) ** 2
        if bool(((pMp <= 0) & ~done).any()):
            raise SolverError(f"CG iteration {k + 1}: non-positive curvature, the system is not SPD (use GMRES)")
        alpha = torch.where(done, 0.0, rr / pMp.clamp_min(1e-300)).to(b.dtype)
        per_row = (-1, *([1] * (Kp.dim() - 1)))
        u = u + alpha[:, None] * p
        Ku = alpha.reshape(per_row) * Kp if Ku is None else Ku + alpha.reshape(per_row) * Kp
        r = r - alpha[:, None] * Mp
        rr_new = (r.double() ** 2).sum(dim=1)
        p = r + (rr_new / rr.clamp_min(1e-300)).to(b.dtype)[:, None] * p
        rr = rr_new
        residuals.append(rr.sqrt())
    assert Ku is not None
    return Solve(u, Ku, _rel(torch.stack(residuals, dim=1), beta[:, None]))


def _columns(apply: Apply, b: Tensor, entries: Any, where: str) -> tuple[Tensor, list[Any]]:
    """``M e_i`` (float64, stacked as columns ``(B, m, len(entries))``) and ``K e_i`` for each entry ``i``."""
    cols, kcols = [], []
    for i in entries:
        e = torch.zeros_like(b)
        e[:, i] = 1.0
        Me, Ke = apply(e)
        _check(Me, Ke, f"{where}, column {i + 1}")
        cols.append(Me.double())
        kcols.append(Ke)
    return torch.stack(cols, dim=2), kcols


def direct_solve(apply: Apply, b: Tensor) -> Solve:
    """Build ``M (B, m, m)`` column by column (``apply(e_i)``, one application per entry of ``y``) and
    solve it exactly in float64; ``K u = sum_i u_i K e_i``. For small ``m`` only: it costs ``m``
    applications whatever the conditioning."""
    M, kcols = _columns(apply, b, range(b.shape[1]), "direct solve")  # (B, m, m): column i is M e_i
    u = torch.linalg.solve(M, b.double()[..., None])[..., 0]
    Ku = _lincomb(u, kcols)
    r = (b.double() - (M @ u[..., None])[..., 0]).norm(dim=1)
    beta = b.double().norm(dim=1)
    return Solve(u.to(b.dtype), Ku, _rel(torch.stack([beta, r], dim=1), beta[:, None]))  # type: ignore[arg-type]


def block_solve(apply: Apply, b: Tensor, exact: Tensor, iterations: int) -> Solve:
    """Exact on the entries marked ``exact`` (a few constraints), GMRES on the rest (many observations).

    With ``M = [[M_ee, M_eg], [M_ge, M_gg]]`` (``e``: exact entries, ``g``: the others), the columns
    ``M e_i`` of the exact entries are built directly (one application each), GMRES solves the Schur
    complement ``S = M_gg - M_ge M_ee^-1 M_eg`` for ``u_g`` (one application per iteration), and
    ``u_e = M_ee^-1 (b_e - M_eg u_g)``. Every constraint is met as the linearisation allows however
    stiff it is, while the observations share the Krylov space among themselves.

    Args:
        exact: bool ``(M,)``.
    """
    ie, ig = exact.nonzero().flatten(), (~exact).nonzero().flatten()
    if ig.numel() == 0:
        return direct_solve(apply, b)
    if ie.numel() == 0:
        return gmres(apply, b, iterations)
    Mcol, kcols = _columns(apply, b, ie.tolist(), "block solve")  # (B, m, n_e): the exact entries' columns
    Mee, Mge = Mcol[:, ie], Mcol[:, ig]
    Mee_inv = torch.linalg.inv(Mee)
    bd = b.double()

    def embed(p_g: Tensor) -> Tensor:
        p = torch.zeros_like(b)
        p[:, ig] = p_g.to(b.dtype)
        return p

    def apply_schur(p_g: Tensor) -> tuple[Tensor, Any]:
        Mp, Kp = apply(embed(p_g))
        Mp = Mp.double()
        s_p = Mp[:, ig] - (Mge @ (Mee_inv @ Mp[:, ie, None]))[..., 0]
        return s_p.to(b.dtype), (Kp, Mp[:, ie])

    rhs = bd[:, ig] - (Mge @ (Mee_inv @ bd[:, ie, None]))[..., 0]
    inner = gmres(apply_schur, rhs.to(b.dtype), iterations)
    K_g, Meg_u_g = inner.Ku
    u_e = (Mee_inv @ (bd[:, ie] - Meg_u_g.double())[..., None])[..., 0]
    u = torch.zeros_like(bd)
    u[:, ie], u[:, ig] = u_e, inner.u.double()
    Ku = _lincomb(u_e, kcols)
    Ku = Ku + K_g
    return Solve(u.to(b.dtype), Ku, inner.residuals)


SOLVERS = ("gmres", "cg", "direct", "auto")


def solve(apply: Apply, b: Tensor, method: str = "auto", iterations: int = 3, direct_max: int = 16,
          exact: Tensor | None = None) -> Solve:
    """Solve with ``method``: ``gmres``, ``cg``, ``direct``, or ``auto``: direct when ``y`` has at most
    ``direct_max`` entries, else :func:`block_solve` when ``exact`` marks at most ``direct_max`` entries
    (constraints beside many observations), else GMRES."""
    if method == "auto":
        if b.shape[1] <= direct_max:
            method = "direct"
        elif exact is not None and 0 < int(exact.sum()) <= direct_max:
            return block_solve(apply, b, exact.to(b.device), iterations)
        else:
            method = "gmres"
    if method == "gmres":
        return gmres(apply, b, iterations)
    if method == "cg":
        return conjugate_gradient(apply, b, iterations)
    if method == "direct":
        return direct_solve(apply, b)
    raise ValueError(f"solver must be one of {SOLVERS}, got {method!r}")
