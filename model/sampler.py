"""Per-frame DDIM/DDPM sampling with clean context frames (diffusion forcing at inference).

A *schedule matrix* ``t[k]`` of shape ``(K+1, T)`` gives every frame's noise level at every step
(``t[0]`` all noisy frames at 1, ``t[K]`` all 0). Context frames have ``t = 0`` throughout: they
are never noised and are re-inserted after every step. Update for frames with ``sigma_t > 0``
(``s`` the next level):

    eps_hat = (z_t - alpha_t x_hat) / sigma_t
    tau     = clip(eta (1 - (alpha_t sigma_s / (alpha_s sigma_t))^2), 0, 1)
    z_s     = alpha_s x_hat + sigma_s sqrt(1 - tau) eps_hat + sigma_s sqrt(tau) xi

``eta = 0`` is DDIM, ``eta = 1`` DDPM-like. Ensemble members are the batch dimension.
Randomness comes only from the explicit ``torch.Generator``.

"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from wind_bmi.model.schedule import CosineVPSchedule

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def full_sequence_schedule(steps: int, context: Tensor) -> Tensor:
    """All generated frames share ``t = 1 - k/steps``; context frames (bool ``(T,)``) stay at 0.

    Returns ``(steps + 1, T)``.
    """
    levels = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = levels[:, None].expand(steps + 1, context.numel()).clone()
    t[:, context] = 0.0
    return t


def ddim_step(schedule: CosineVPSchedule, z: Tensor, x_hat: Tensor, t: Tensor, s: Tensor, eta: float,
              generator: torch.Generator | None) -> Tensor:
    """One per-frame step from levels ``t`` to ``s`` (both ``(B, T)``) given ``x_hat``."""
    a_t, s_t = schedule.coefficients(t)
    a_s, s_s = schedule.coefficients(s)
    noisy = s_t > 0
    safe_st = torch.where(noisy, s_t, torch.ones_like(s_t))
    eps_hat = (z - a_t * x_hat) / safe_st
    ratio = (a_t * s_s) / (a_s * safe_st)
    tau = (eta * (1.0 - ratio**2)).clamp(0.0, 1.0)
    xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    z_s = a_s * x_hat + s_s * torch.sqrt(1.0 - tau) * eps_hat + s_s * torch.sqrt(tau) * xi
    return torch.where(noisy, z_s, z)


@torch.no_grad()
def _unguided(denoise: DenoiseFn, z: Tensor, t: Tensor) -> Tensor:
    return denoise(z, t)


def sample_window(denoise: DenoiseFn, schedule: CosineVPSchedule, context: Tensor, context_mask: Tensor,
                  steps: int = 32, eta: float = 1.0, generator: torch.Generator | None = None,
                  guided: DenoiseFn | None = None) -> Tensor:
    """Draw windows whose context frames equal ``context`` exactly.

    Args:
        denoise: ``D(z, t)`` (the prior), used when ``guided`` is None.
        schedule: noise schedule.
        context: ``(B, T, C, H, W)``; values of non-context frames are ignored.
        context_mask: bool ``(T,)``, True for clean context frames.
        steps: reverse steps.
        eta: 0 = DDIM, 1 = DDPM.
        generator: the only source of randomness.
        guided: a guided denoiser (e.g. MMPS) replacing ``denoise``; it may need gradients.

    Returns:
        ``(B, T, C, H, W)`` with context frames bit-identical to ``context``.
    """
    if context.ndim != 5:
        raise ValueError(f"context must be (B, T, C, H, W), got shape {tuple(context.shape)}")
    B, T = context.shape[:2]
    cm = context_mask.to(torch.bool).cpu()
    if cm.numel() != T:
        raise ValueError(f"context_mask has {cm.numel()} frames, window has {T}")
    tmat = full_sequence_schedule(steps, cm).to(device=context.device, dtype=context.dtype)
    keep = cm.to(context.device)[None, :, None, None, None]
    noise = torch.randn(context.shape, generator=generator, dtype=context.dtype, device=context.device)
    _, s0 = schedule.coefficients(tmat[0].expand(B, T))
    z = torch.where(keep, context, s0 * noise)  # generated frames start as pure noise at t = 1
    fn = guided if guided is not None else (lambda zz, tt: _unguided(denoise, zz, tt))
    for k in range(tmat.shape[0] - 1):
        t = tmat[k].expand(B, T)
        s = tmat[k + 1].expand(B, T)
        x_hat = fn(z, t).detach()
        z = ddim_step(schedule, z, x_hat, t, s, eta, generator)
        z = torch.where(keep, context, z)  # re-insert clean context
    return z
