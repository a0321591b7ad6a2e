"""Denoisers ``D(z, t) ~ E[x | z]`` over windows ``(B, T, C, H, W)``.

A denoiser is any callable ``(z, t) -> x_hat``. :class:`PriorDenoiser` wraps the noise-blind
network: it ignores ``t`` (the network infers each frame's noise from ``z``) and only uses it
to pass clean frames through unchanged. :class:`GaussianDenoiser` is the analytic denoiser of a
Gaussian prior, used to test guidance exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from wind_bmi.model.schedule import CosineVPSchedule


class Denoiser(Protocol):
    """``x_hat = D(z, t)`` with ``z: (B, T, C, H, W)``, ``t: (B, T)``."""

    schedule: CosineVPSchedule

    def __call__(self, z: Tensor, t: Tensor) -> Tensor: ...


class PriorDenoiser(nn.Module):
    """The trained prior as a denoiser.

    Args:
        net: the noise-blind UViT (x-prediction).
        schedule: the noise schedule the prior was trained with.
        bf16: run the network under ``torch.autocast(bfloat16)`` (CPU AMX / GPU tensor cores).
    """

    def __init__(self, net: nn.Module, schedule: CosineVPSchedule, bf16: bool = False) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.bf16 = bf16

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x_hat = self.net(z)
        x_hat = x_hat.to(z.dtype)
        clean = (t == 0)[..., None, None, None]
        return torch.where(clean, z, x_hat)


class GaussianDenoiser:
    """Exact ``E[x | z]`` for a Gaussian prior ``x ~ N(mu, Sigma)`` over the flattened window.

    With per-frame ``z_f = alpha_f x_f + sigma_f eps_f`` (``A_t = diag(alpha)``, ``S_t = diag(sigma^2)``):
    ``E[x|z] = mu + Sigma A_t (A_t Sigma A_t + S_t)^-1 (z - A_t mu)``. Clean frames have sigma 0.
    """

    def __init__(self, mu: Tensor, cov: Tensor, shape: tuple[int, ...], schedule: CosineVPSchedule) -> None:
        self.mu = mu.double()
        self.cov = cov.double()
        self.shape = shape  # (T, C, H, W)
        self.schedule = schedule

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        B = z.shape[0]
        a, s = self.schedule.coefficients(t)
        a = a.expand(B, *self.shape).reshape(B, -1).double()
        s2 = (s**2).expand(B, *self.shape).reshape(B, -1).double()
        zf = z.reshape(B, -1).double()
        out = []
        for b in range(B):
            At = torch.diag(a[b])
            M = At @ self.cov @ At + torch.diag(s2[b])
            gain = self.cov @ At @ torch.linalg.inv(M)
            out.append(self.mu + gain @ (zf[b] - a[b] * self.mu))
        return torch.stack(out).reshape(z.shape).to(z.dtype)
