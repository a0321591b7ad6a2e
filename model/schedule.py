"""Variance-preserving noise schedule with an independent level per frame (diffusion forcing).

Per frame ``f``: ``z_f = alpha(t_f) x_f + sigma(t_f) eps_f`` with ``t_f in [0, 1]``.
Cosine VP schedule: ``alpha(t) = cos(t arccos(a_min))``, ``sigma(t) = sqrt(1 - alpha^2 + s_min^2)``.
A frame with ``t == 0`` is *clean*: it is used exactly (``z_f = x_f``), never noised.
Shapes: ``t`` is ``(B, T)``; ``alpha``/``sigma`` broadcast to ``(B, T, 1, 1, 1)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class CosineVPSchedule:
    """Cosine VP schedule; ``a_min``/``s_min`` bound alpha away from 0 and sigma away from 0."""

    def __init__(self, a_min: float = 1e-3, s_min: float = 1e-3) -> None:
        self.a_min = a_min
        self.s_min = s_min
        self._acos = math.acos(a_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(t * self._acos)

    def sigma(self, t: Tensor) -> Tensor:
        a = self.alpha(t)
        return torch.sqrt(1.0 - a**2 + self.s_min**2)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` shaped ``(B, T, 1, 1, 1)``; exactly ``(1, 0)`` on clean frames (t == 0)."""
        t5 = t[..., None, None, None]
        clean = t5 == 0
        a = torch.where(clean, torch.ones_like(t5), self.alpha(t5))
        s = torch.where(clean, torch.zeros_like(t5), self.sigma(t5))
        return a, s

    def noise(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z = alpha x + sigma eps`` for ``x: (B, T, C, H, W)``, ``t: (B, T)``."""
        a, s = self.coefficients(t)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return a * x + s * eps

    def loss_weight(self, t: Tensor, w_max: float) -> Tensor:
        """``min(1 + alpha^2 / sigma^2, w_max)`` per frame ``(B, T)``; 0 on clean frames (not learned)."""
        a, s = self.alpha(t), self.sigma(t)
        w = torch.clamp(1.0 + a**2 / s**2, max=w_max)
        return torch.where(t == 0, torch.zeros_like(w), w)
