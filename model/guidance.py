"""Posterior guidance: MMPS (moment-matching posterior sampling) and DPS as guided denoisers.

A guided denoiser wraps a denoiser ``D(z, t)`` and an :class:`Observation` ``y = A(x) + eta`` and
returns an estimate of ``E[x | z, y]``; the sampler uses it in place of ``D``.

MMPS (Rozet et al., NeurIPS 2024) with per-frame noise (diffusion forcing):

    x_hat = D(z),  Gamma = diag(sigma_f^2 / alpha_f)  (0 on clean frames),  V = Gamma J^T,  J = dD/dz
    u     = (Sigma_y + A' V A'^T)^-1 (y - A(x_hat))          (CG on the Sigma_y-whitened system, fixed iterations)
    E[x | z, y] ~ x_hat + Gamma J^T A'^T u

``A'`` is ``A`` linearised at ``x_hat`` (``torch.func.jvp`` / ``vjp``), ``J^T v`` one autograd VJP
through the network. Cost per step: one forward plus ``n`` backward passes for ``n`` CG iterations
(the correction is accumulated from the CG directions' VJPs, see :func:`conjugate_gradient_image`).

Frames whose ``Gamma`` exceeds ``gamma_max`` (default :data:`GAMMA_MAX`) are not guided at that step:
they keep the prior's estimate. There ``alpha`` is near 0, ``z`` says almost nothing about ``x``, and
``Gamma J^T`` is a ratio of two tiny quantities (``Gamma ~ 1000`` at ``t = 1``) that carries the
network Jacobian's error rather than the posterior covariance; with precise observations the CG step
size cancels ``Gamma``'s scale, so a smaller ``Gamma`` would not damp it. Guiding the first step at
``t = 1`` made 5 % sparse reconstructions diverge (hundreds of K at unobserved cells with 3 CG
iterations on the shipped prior); skipping it, they beat the unguided prior (README, "Evaluation").

DPS (Chung et al., ICLR 2023) uses a point estimate instead, with Chung's step normalised by the
residual norm: ``x_hat - zeta Gamma grad_z ||Sigma_y^-1/2 (y - A(x_hat))||``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from wind_bmi.model.denoiser import Denoiser
from wind_bmi.model.operators import Observation

# frames noisier than this (Gamma = sigma^2 / alpha; the cosine schedule's alpha < ~0.1) take the prior's
# estimate unguided; chosen on 5 % sparse reconstructions with the shipped prior (8 and 32 steps)
GAMMA_MAX = 10.0


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int, eps: float = 1e-30) -> Tensor:
    """Solve ``M u = b`` per batch row (``b: (B, M)``) with a fixed number of CG iterations.

    Dot products in float64. A row stops where it stands (``u`` and ``K u`` keep their last values)
    once it has converged or meets a direction of non-positive or non-finite curvature.
    """
    u, _ = conjugate_gradient_image(lambda p: (matvec(p), p), b, iterations, eps)
    return u


def conjugate_gradient_image(apply: Callable[[Tensor], tuple[Tensor, Tensor]], b: Tensor, iterations: int,
                             eps: float = 1e-30) -> tuple[Tensor, Tensor]:
    """CG for ``M u = b`` that also returns ``K u`` for a linear map ``K`` evaluated alongside ``M``.

    ``apply(p)`` returns ``(M p, K p)``. Since ``u = sum_k alpha_k p_k``, ``K u = sum_k alpha_k K p_k``
    costs nothing extra: MMPS gets its posterior correction ``Gamma J^T A'^T u`` from the VJPs CG
    already made, so ``n`` iterations cost ``n`` backward passes, not ``n + 1``.
    """
    u = torch.zeros_like(b)
    Ku: Tensor | None = None
    r = b.clone()
    p = r.clone()
    rr = (r.double() ** 2).sum(dim=1)
    active = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    for _ in range(iterations):
        Mp, Kp = apply(p)
        pMp = (p.double() * Mp.double()).sum(dim=1)
        # M is SPD in exact arithmetic, but MMPS's M = Sigma_y + A' Gamma J^T A'^T holds the network's
        # (bf16) Jacobian, which need not be symmetric or positive: a direction with p^T M p <= 0 (or
        # a non-finite one) ends that row's iterations where it stands, as truncated CG does; dividing
        # by a clamped ~0 curvature would take a step of ~1e30 and turn the window into inf/NaN.
        finite = torch.isfinite(Mp).all(dim=1) & torch.isfinite(Kp.reshape(Kp.shape[0], -1)).all(dim=1)
        active = active & finite & (pMp > eps)
        alpha = torch.where(active, rr / torch.where(active, pMp, 1.0), 0.0).to(b.dtype)
        per_row = (-1, *([1] * (Kp.dim() - 1)))
        Mp, Kp = torch.where(active[:, None], Mp, 0.0), torch.where(active.reshape(per_row), Kp, 0.0)  # no 0 * inf
        u = u + alpha[:, None] * p
        step = alpha.reshape(per_row) * Kp
        Ku = step if Ku is None else Ku + step
        r = r - alpha[:, None] * Mp
        rr_new = (r.double() ** 2).sum(dim=1)
        beta = (rr_new / rr.clamp_min(eps)).to(b.dtype)[:, None]
        p = r + beta * p
        rr = rr_new
    if Ku is None:
        Ku = apply(torch.zeros_like(b))[1]
    return u, Ku


def _gamma(denoiser: Denoiser, t: Tensor, gamma_max: float | None = None) -> Tensor:
    """``Gamma = sigma^2 / alpha`` per frame ``(B, T, 1, 1, 1)``: exactly 0 on clean frames and, with
    ``gamma_max``, on frames above it (they take the prior's estimate, see the module docstring)."""
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
        cg_iterations: fixed number of conjugate-gradient iterations (1-3 typical).
        gamma_max: frames with ``Gamma`` above it are not guided (None: every frame is).
    """

    def __init__(self, denoiser: Denoiser, observation: Observation, cg_iterations: int = 1,
                 gamma_max: float | None = GAMMA_MAX) -> None:
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.obs = observation
        self.cg_iterations = cg_iterations
        self.gamma_max = check_gamma_max(gamma_max)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        gamma = _gamma(self.denoiser, t, self.gamma_max).to(z.dtype)
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
            # precision (a 1e-5 relative mass constraint beside 1 K temperatures) get balanced CG steps.
            w = var.rsqrt()

            def apply(p: Tensor) -> tuple[Tensor, Tensor]:  # (whitened M p, V A'^T w p)
                c = cov_AT(w * p)
                return w * (var * (w * p) + torch.func.jvp(A, (x0,), (c,))[1]), c

            _, correction = conjugate_gradient_image(apply, (w * (y - y_hat)).detach(), self.cg_iterations)
            x_post = x0 + correction
        return _project(self.denoiser, x_post.detach(), t)


class DPSDenoiser:
    """DPS-guided denoiser: ``x_hat - zeta Gamma grad_z ||Sigma_y^-1/2 (y - A(D(z)))||`` (point estimate).

    The gradient of the residual *norm* (not its square) is Chung et al.'s normalised step; it stays
    bounded for precise observations, where the Gaussian log-likelihood gradient blows up.
    """

    def __init__(self, denoiser: Denoiser, observation: Observation, scale: float = 1.0,
                 gamma_max: float | None = GAMMA_MAX) -> None:
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


def guided(method: str, denoiser: Denoiser, observation: Observation, cg_iterations: int = 1,
           gamma_max: float | None = GAMMA_MAX) -> Callable[[Tensor, Tensor], Tensor]:
    """Build a guided denoiser by name: ``mmps`` or ``dps``."""
    if method == "mmps":
        return MMPSDenoiser(denoiser, observation, cg_iterations, gamma_max)
    if method == "dps":
        return DPSDenoiser(denoiser, observation, gamma_max=gamma_max)
    raise ValueError(f"guidance method must be 'mmps' or 'dps', got {method!r}")
