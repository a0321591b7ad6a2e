"""Posterior guidance: MMPS (moment-matching posterior sampling) and DPS as guided denoisers.

A guided denoiser wraps a denoiser ``D(z, t)`` and an :class:`Observation` ``y = A(x) + eta`` and
returns an estimate of ``E[x | z, y]``; the sampler uses it in place of ``D``.

MMPS (Rozet et al., NeurIPS 2024) with per-frame noise (diffusion forcing):

    x_hat = D(z),  Gamma = diag(sigma_f^2 / alpha_f)  (0 on clean frames),  V = Gamma J^T,  J = dD/dz
    u     = (Sigma_y + A' V A'^T)^-1 (y - A(x_hat))          (on the Sigma_y-whitened system)
    E[x | z, y] ~ x_hat + Gamma J^T A'^T u

``A'`` is ``A`` linearised at ``x_hat`` (``torch.func.jvp`` / ``vjp``), ``J^T v`` one autograd VJP
through the network. The system is solved by :mod:`wind_bmi.model.solvers`: GMRES with a fixed
number of iterations (``J`` of a trained network is not symmetric, so CG diverges), or exactly when
``y`` is small (``auto``: at most ``direct_max`` entries). Cost per step: one forward plus ``n``
backward passes for ``n`` iterations (or entries of ``y``): the correction is assembled from the
VJPs the solver already made.

Every noisy frame is guided at every step, including ``t = 1`` (``Gamma ~ 1000``): with GMRES that is
stable (a CG solve diverged there, and skipping those frames, ``Gamma > 10``, was measured worse with
GMRES: whitened residual of temporal downscaling 2.00 vs 1.08, docs/findings.md).

DPS (Chung et al., ICLR 2023) uses a point estimate instead, with Chung's step normalised by the
residual norm: ``x_hat - zeta Gamma grad_z ||Sigma_y^-1/2 (y - A(x_hat))||``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from wind_bmi.model.denoiser import Denoiser
from wind_bmi.model.operators import Observation
from wind_bmi.model.solvers import SOLVERS, solve

# DPS's step is Gamma times a gradient: near t = 1 (Gamma ~ 1000) it overshoots by orders of magnitude, so
# the DPS baseline leaves frames with Gamma above this unguided (Chung et al. tune their step size instead)
DPS_GAMMA_MAX = 10.0


def _gamma(denoiser: Denoiser, t: Tensor, gamma_max: float | None = None) -> Tensor:
    """``Gamma = sigma^2 / alpha`` per frame ``(B, T, 1, 1, 1)``: exactly 0 on clean frames and, with
    ``gamma_max``, on frames above it (they take the prior's estimate)."""
    a, s = denoiser.schedule.coefficients(t)
    gamma = s**2 / a
    if gamma_max is not None:
        gamma = torch.where(gamma > gamma_max, torch.zeros_like(gamma), gamma)
    return gamma


def _project(denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
    """The prior's own projection of an estimate (its zonal band limit), if it has one.

    ``E[x | z, y]`` lies where the data lies, but the correction ``Gamma J^T A'^T u`` uses the
    transposed Jacobian of the network, which need not keep to the band limit.
    """
    project = getattr(denoiser, "project", None)
    return x if project is None else project(x, t)


class MMPSDenoiser:
    """MMPS-guided denoiser ``(z, t) -> E[x | z, y]``.

    Args:
        denoiser: the prior ``D(z, t)``.
        observation: ``y = A(x) + eta`` (operators act on normalised windows).
        iterations: GMRES (or CG) iterations.
        solver: ``auto`` (direct for at most ``direct_max`` entries of ``y``, else GMRES), ``gmres``,
            ``direct`` or ``cg`` (symmetric positive-definite systems only).

    After each call, ``residuals`` holds the solver's relative residual history ``(B, n + 1)`` of that
    step (``|b - M u_k| / |b|`` on the whitened system), ``None`` where the step was not guided.
    """

    def __init__(self, denoiser: Denoiser, observation: Observation, iterations: int = 3,
                 solver: str = "auto", direct_max: int = 16) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.obs = observation
        self.iterations = iterations
        self.solver = solver
        self.direct_max = direct_max
        self.residuals: Tensor | None = None

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        gamma = _gamma(self.denoiser, t).to(z.dtype)
        self.residuals = None
        if not bool((gamma > 0).any()):  # nothing to guide at this level: the prior's estimate
            return self.denoiser(z, t)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            x_hat = self.denoiser(z, t)
            x0 = x_hat.detach()
            A = self.obs.A
            y_hat, A_vjp = torch.func.vjp(A, x0)  # type: ignore[misc]
            y = self.obs.target(y_hat)
            var = self.obs.variances(y_hat)

            def JT(v: Tensor) -> Tensor:
                (g,) = torch.autograd.grad(x_hat, z, v, retain_graph=True)
                return g

            def cov_AT(u: Tensor) -> Tensor:  # V A'^T u = Gamma J^T A'^T u
                return gamma * JT(A_vjp(u)[0])

            # Whitened system (Jacobi preconditioning by Sigma_y): observations of very different
            # precision (a 1e-5 relative mass constraint beside 1 K temperatures) get balanced steps.
            w = var.rsqrt()

            def apply(p: Tensor) -> tuple[Tensor, Tensor]:  # (whitened M p, V A'^T w p)
                c = cov_AT(w * p)
                return w * (var * (w * p) + torch.func.jvp(A, (x0,), (c,))[1]), c

            result = solve(apply, (w * (y - y_hat)).detach(), self.solver, self.iterations, self.direct_max,
                           self.obs.exact)
            self.residuals = result.residuals
            x_post = x0 + result.Ku
        return _project(self.denoiser, x_post.detach(), t)


class DPSDenoiser:
    """DPS-guided denoiser: ``x_hat - zeta Gamma grad_z ||Sigma_y^-1/2 (y - A(D(z)))||`` (point estimate).

    The gradient of the residual *norm* (not its square) is Chung et al.'s normalised step; it stays
    bounded for precise observations, where the Gaussian log-likelihood gradient blows up.
    """

    def __init__(self, denoiser: Denoiser, observation: Observation, scale: float = 1.0,
                 gamma_max: float | None = DPS_GAMMA_MAX) -> None:
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.obs = observation
        self.scale = scale
        self.gamma_max = check_gamma_max(gamma_max)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        gamma = _gamma(self.denoiser, t, self.gamma_max).to(z.dtype)
        if not bool((gamma > 0).any()):
            return self.denoiser(z, t)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            x_hat = self.denoiser(z, t)
            y_hat = self.obs.A(x_hat)
            y = self.obs.target(y_hat)
            resid = torch.sqrt((((y - y_hat) ** 2) / self.obs.variances(y_hat)).sum() + 1e-12)
            (grad,) = torch.autograd.grad(resid, z)
        return _project(self.denoiser, (x_hat.detach() - self.scale * gamma * grad).detach(), t)


def check_gamma_max(gamma_max: float | None) -> float | None:
    """``gamma_max`` as given, if positive or None; otherwise ValueError naming it."""
    if gamma_max is not None and not gamma_max > 0:
        raise ValueError(f"gamma_max must be positive or None, got {gamma_max}")
    return gamma_max


def guided(method: str, denoiser: Denoiser, observation: Observation, iterations: int = 3,
           solver: str = "auto") -> Callable[[Tensor, Tensor], Tensor]:
    """Build a guided denoiser by name: ``mmps`` or ``dps``."""
    if method == "mmps":
        return MMPSDenoiser(denoiser, observation, iterations, solver)
    if method == "dps":
        return DPSDenoiser(denoiser, observation)
    raise ValueError(f"guidance method must be 'mmps' or 'dps', got {method!r}")
