"""Denoisers ``D(z, t) ~ E[x | z]`` over windows ``(B, T, C, H, W)``.

A denoiser is any callable ``(z, t) -> x_hat``. :class:`PriorDenoiser` wraps the noise-blind
network: the network never sees ``t`` (it infers each frame's noise from ``z``); the wrapper uses
it to pass clean frames through unchanged and, for priors trained with a latitude offset, to centre
the input per latitude and, for priors trained on persistence anomalies, to show the network each
noisy frame as its departure from the newest clean frame before it (:func:`network_estimate`).
:class:`GaussianDenoiser` is the analytic denoiser of a Gaussian prior, used to test guidance exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from wind_bmi.model.bandlimit import ZonalBandLimit
from wind_bmi.model.schedule import CosineVPSchedule


class Denoiser(Protocol):
    """``x_hat = D(z, t)`` with ``z: (B, T, C, H, W)``, ``t: (B, T)``."""

    schedule: CosineVPSchedule

    def __call__(self, z: Tensor, t: Tensor) -> Tensor: ...


def persistence_mode(architecture: Mapping[str, Any]) -> bool | str:
    """The ``persistence`` argument of :func:`network_estimate` for an architecture (a card's
    ``architecture`` or a ``ModelConfig`` as a dict): False (no ``persistence_anomaly``, older cards
    too), True (the full shift) or ``"sigma2"`` (``persistence_weight: sigma2``)."""
    if not architecture.get("persistence_anomaly", False):
        return False
    return "sigma2" if architecture.get("persistence_weight", "one") == "sigma2" else True


def persistence_base(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """For each frame, the newest clean frame (``t == 0``) strictly before it, and where there is one.

    Returns ``(base (B, T, C, H, W), has (B, T) bool)``; ``has`` is False on clean frames and on noisy
    frames with no clean frame before them (their ``base`` is meaningless and must not be used).
    """
    B, T = t.shape
    clean = t == 0
    idx = torch.arange(T, device=t.device).expand(B, T)
    newest = torch.where(clean, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # clean at or before f
    has = (newest >= 0) & ~clean
    src = newest.clamp_min(0)[:, :, None, None, None].expand_as(z)
    return torch.gather(z, 1, src), has


def network_estimate(net: nn.Module, z: Tensor, t: Tensor, schedule: CosineVPSchedule, offset: Tensor | None,
                     bf16: bool, band_limit: ZonalBandLimit | None = None, persistence: bool | str = False) -> Tensor:
    """``x_hat`` of the network for ``z: (B, T, C, H, W)`` at levels ``t: (B, T)`` (training and sampling).

    With ``offset`` ``(C, H)`` (the latitude offset of the normalisation) the network works in the
    per-latitude-centred space ``x' = x - offset``: it gets ``z - alpha_t offset`` (= ``alpha_t x' +
    sigma_t eps``, the same noise) and its estimate of ``x'`` is shifted back. The network itself stays
    blind to ``t``; this is a fixed change of variables of the data, exact for any ``t``.
    With ``persistence`` a noisy frame that has a clean frame before it is centred on the newest such
    frame ``x_p`` instead (``z - alpha_t x_p``, the same noise; the estimate shifted back by ``x_p``): the
    network estimates the departure from persistence, whose zero is persistence itself, so a forecast
    starts from it rather than from the climatological state. Frames with no clean frame before them
    (no context, e.g. downscaling) keep the latitude offset or none. Again a fixed change of
    variables; the network is told neither the levels nor which frames are clean.
    ``persistence="sigma2"`` centres on ``sigma_t^2 x_p`` instead: persistence at high noise levels,
    where the new frame is mostly unknown, fading to no shift at low ones, where a departure from
    persistence (a few hundredths of a std) would be hard for a noise-blind network to tell from the
    noise (the full shift's sampled windows drift warm by a bias per sampler step).
    With ``band_limit`` the estimate is projected onto the zonal wavenumbers the data occupies
    (:class:`~wind_bmi.model.bandlimit.ZonalBandLimit`).
    """
    shift = None
    if offset is not None:
        shift = offset.to(z.device, z.dtype)[:, :, None].expand(z.shape)
    if persistence:
        if persistence not in (True, "one", "sigma2"):
            raise ValueError(f"persistence must be False, True, 'one' or 'sigma2', got {persistence!r}")
        base, has = persistence_base(z, t)
        if persistence == "sigma2":
            base = schedule.coefficients(t)[1].to(z.dtype) ** 2 * base
        keep = has[..., None, None, None]
        shift = torch.where(keep, base, torch.zeros_like(z) if shift is None else shift)
    if shift is not None:
        z = z - schedule.coefficients(t)[0].to(z.dtype) * shift
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
        x_hat = net(z)
    x_hat = x_hat.to(z.dtype)
    if shift is not None:
        x_hat = x_hat + shift
    return x_hat if band_limit is None else band_limit(x_hat)


def fast_bf16(device: str | torch.device) -> bool:
    """Whether bfloat16 autocast is fast on ``device``: CUDA with bf16 support, or a CPU with AMX
    tiles or AVX-512 BF16. Elsewhere (e.g. an AVX2-only CPU) torch emulates bf16 matmuls and
    convolutions, measured ~40x slower than fp32 on a 2-core AMD EPYC (session 13), so the
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
        offset: the latitude offset ``(C, H)`` the prior was trained with, or None.
        band_limit: the data's zonal band limit (the card's ``band_limit``), or None: estimates of
            noisy frames are projected onto it, and guidance projects its posterior estimate too
            (:meth:`project`).
        persistence: the prior was trained on departures from persistence (the card's architecture
            key ``persistence_anomaly``, weighted by ``persistence_weight``; :func:`network_estimate`).
    """

    def __init__(self, net: nn.Module, schedule: CosineVPSchedule, bf16: bool | None = False,
                 offset: Tensor | None = None, band_limit: ZonalBandLimit | None = None,
                 persistence: bool | str = False) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        if bf16 is None:
            param = next(net.parameters(), None)
            bf16 = fast_bf16(param.device if param is not None else "cpu")
        self.bf16 = bf16
        self.offset = None if offset is None else offset.float()
        self.band_limit = band_limit
        self.persistence = persistence

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        x_hat = network_estimate(self.net, z, t, self.schedule, self.offset, self.bf16, self.band_limit,
                                 self.persistence)
        clean = (t == 0)[..., None, None, None]
        return torch.where(clean, z, x_hat)

    def project(self, x: Tensor, t: Tensor) -> Tensor:
        """Project the noisy frames of an estimate (e.g. a guided one) onto the band limit; clean frames kept."""
        if self.band_limit is None:
            return x
        clean = (t == 0)[..., None, None, None]
        return torch.where(clean, x, self.band_limit(x))


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
