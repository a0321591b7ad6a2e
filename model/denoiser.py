"""Denoisers ``D(z, t) ~ E[x | z]`` over windows ``(B, T, C, H, W)``.

A denoiser is any callable ``(z, t) -> x_hat``. :class:`PriorDenoiser` wraps the noise-blind
network: the network never sees ``t`` (it infers each frame's noise from ``z``); the wrapper uses
it only to pass clean frames through unchanged.
:class:`GaussianDenoiser` is the analytic denoiser of a Gaussian prior, used to test guidance exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from wind_bmi.model.bandlimit import ZonalBandLimit
from wind_bmi.model.schedule import CosineVPSchedule


class Denoiser(Protocol):
    """``x_hat = D(z, t)`` with ``z: (B, T, C, H, W)``, ``t: (B, T)``."""

    schedule: CosineVPSchedule

    def __call__(self, z: Tensor, t: Tensor) -> Tensor: ...


def network_estimate(net: nn.Module, z: Tensor, bf16: bool, band_limit: ZonalBandLimit | None = None) -> Tensor:
    """``x_hat`` of the noise-blind network for ``z: (B, T, C, H, W)`` (training and sampling).

    The network is not told the noise levels: it infers each frame's level from ``z`` (Sun et al.
    2025 show blind denoisers work; x-prediction keeps them stable). With ``band_limit`` the estimate
    is projected onto the zonal wavenumbers the data occupies
    (:class:`~wind_bmi.model.bandlimit.ZonalBandLimit`).
    """
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
        x_hat = net(z)
    x_hat = x_hat.to(z.dtype)
    return x_hat if band_limit is None else band_limit(x_hat)


def fast_bf16(device: str | torch.device) -> bool:
    """Whether bfloat16 autocast is fast on ``device``: CUDA with bf16 support, or a CPU with AMX
    tiles or AVX-512 BF16. Elsewhere (e.g. an AVX2-only CPU) torch emulates bf16 matmuls and
    convolutions, measured ~40x slower than fp32 on a 2-core AVX2-only AMD EPYC, so the
    callers that default to bf16 (``bf16=None``) run in fp32 there."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if callable(p))


class PriorDenoiser(nn.Module):
    """The trained prior as a denoiser.

    Args:
        net: the noise-blind UViT (x-prediction).
        schedule: the noise schedule the prior was trained with.
        bf16: run the network under ``torch.autocast(bfloat16)`` (CPU AMX / GPU tensor cores); None:
            where it is fast on the network's device (:func:`fast_bf16`).
        band_limit: the data's zonal band limit (the card's ``band_limit``), or None: estimates of
            noisy frames are projected onto it, and guidance projects its posterior estimate too
            (:meth:`project`).
    """

    def __init__(self, net: nn.Module, schedule: CosineVPSchedule, bf16: bool | None = False,
                 band_limit: ZonalBandLimit | None = None, lower_bounds: Tensor | None = None) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        if bf16 is None:
            param = next(net.parameters(), None)
            bf16 = fast_bf16(param.device if param is not None else "cpu")
        self.bf16 = bf16
        self.band_limit = band_limit
        self.lower_bounds = lower_bounds

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        x_hat = self.bound(network_estimate(self.net, z, self.bf16, self.band_limit))
        clean = (t == 0)[..., None, None, None]
        return torch.where(clean, z, x_hat)

    def bound(self, x: Tensor) -> Tensor:
        """Raise channels with a physical lower bound (humidity, precipitation: 0) to it, ``(..., C, H, W)``.

        ``E[x | z]`` of a non-negative variable is non-negative, so clipping an estimate at the bound is
        the projection onto a convex set that holds the truth: it can only bring the estimate closer
        to it, cell by cell. Applied after the band limit (the final word on the sign)."""
        if self.lower_bounds is None:
            return x
        lo = self.lower_bounds.to(x.device, x.dtype)
        lo = lo if lo.ndim == 3 else lo[:, None, None]  # (C, H, W) or per channel
        return torch.maximum(x, lo)

    def project(self, x: Tensor, t: Tensor) -> Tensor:
        """Project the noisy frames of an estimate (e.g. a guided one) onto the band limit and the
        physical bounds; clean frames kept."""
        if self.band_limit is None and self.lower_bounds is None:
            return x
        y = x if self.band_limit is None else self.band_limit(x)
        clean = (t == 0)[..., None, None, None]
        return torch.where(clean, x, self.bound(y))


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
