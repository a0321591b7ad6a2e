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

Warm start (``start_level < 1``, SDEdit-style): the generated frames start at level ``t*`` from
``alpha(t*) x_p + sigma(t*) eps``, where ``x_p`` persists the newest clean context frame before each
of them, instead of from pure noise at ``t = 1``; the reverse steps then cover ``t* .. 0``. The prior
only has to correct persistence where it denoises well (mid noise levels) rather than invent the new
frame from nothing (at ``t = 1`` the shipped prior's estimate of the next 6-h frame is worse than
persistence). It biases the sample towards persistence, the more the lower ``t*``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from wind_bmi.model.denoiser import persistence_base
from wind_bmi.model.schedule import CosineVPSchedule

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def full_sequence_schedule(steps: int, context: Tensor, start: float = 1.0) -> Tensor:
    """All generated frames share ``t = start (1 - k/steps)``; context frames (bool ``(T,)``) stay at 0.

    Returns ``(steps + 1, T)``.
    """
    levels = torch.linspace(start, 0.0, steps + 1, dtype=torch.float64)
    t = levels[:, None].expand(steps + 1, context.numel()).clone()
    t[:, context] = 0.0
    return t


def pyramid_schedule(steps: int, context: Tensor, lag: float = 0.25) -> Tensor:
    """Later frames noisier: frame ``j`` (j-th generated) lags by ``j * lag`` of the range.

    Returns ``(K + 1, T)`` with ``K = steps``; every generated frame ends at 0.
    """
    gen = (~context).nonzero().flatten()
    n = gen.numel()
    total = 1.0 + lag * max(n - 1, 0)
    u = torch.linspace(total, 0.0, steps + 1, dtype=torch.float64)
    t = torch.zeros(steps + 1, context.numel(), dtype=torch.float64)
    for j, f in enumerate(gen.tolist()):
        t[:, f] = (u - (total - 1.0) + j * lag).clamp(0.0, 1.0)
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
def persistence(context: Tensor, context_mask: Tensor) -> Tensor:
    """Each generated frame replaced by the newest context frame before it (``(B, T, C, H, W)``;
    context frames as they are), by :func:`~wind_bmi.model.denoiser.persistence_base`.

    Raises ValueError when a generated frame has no context frame before it.
    """
    B, T = context.shape[:2]
    cm = context_mask.to(torch.bool).cpu()
    base, has = persistence_base(context, (~cm).to(context.dtype)[None].expand(B, T).to(context.device))
    missing = [f for f in range(T) if not cm[f] and not bool(has[0, f])]
    if missing:
        raise ValueError(f"start_level < 1 persists the newest context frame, but frame {missing[0]} has none "
                         f"before it (context_mask {cm.tolist()})")
    return torch.where(cm.to(context.device)[None, :, None, None, None], context, base)


@torch.no_grad()
def _unguided(denoise: DenoiseFn, z: Tensor, t: Tensor) -> Tensor:
    return denoise(z, t)


def sample_window(denoise: DenoiseFn, schedule: CosineVPSchedule, context: Tensor, context_mask: Tensor,
                  steps: int = 32, eta: float = 1.0, generator: torch.Generator | None = None,
                  guided: DenoiseFn | None = None, schedule_kind: str = "full", start_level: float = 1.0) -> Tensor:
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
        schedule_kind: ``full`` (generated frames share t) or ``pyramid``.
        start_level: ``t*`` in (0, 1]: below 1, a warm start from persistence (module docstring);
            ``full`` schedule only.

    Returns:
        ``(B, T, C, H, W)`` with context frames bit-identical to ``context``.
    """
    if context.ndim != 5:
        raise ValueError(f"context must be (B, T, C, H, W), got shape {tuple(context.shape)}")
    B, T = context.shape[:2]
    cm = context_mask.to(torch.bool).cpu()
    if cm.numel() != T:
        raise ValueError(f"context_mask has {cm.numel()} frames, window has {T}")
    if not 0.0 < start_level <= 1.0:
        raise ValueError(f"start_level must be in (0, 1], got {start_level}")
    if schedule_kind not in ("full", "pyramid"):
        raise ValueError(f"schedule_kind must be 'full' or 'pyramid', got {schedule_kind!r}")
    if schedule_kind == "pyramid":
        if start_level < 1.0:
            raise ValueError("start_level < 1 needs schedule_kind 'full'")
        tmat = pyramid_schedule(steps, cm)
    else:
        tmat = full_sequence_schedule(steps, cm, start_level)
    tmat = tmat.to(device=context.device, dtype=context.dtype)
    keep = cm.to(context.device)[None, :, None, None, None]
    start = persistence(context, cm) if start_level < 1.0 else torch.zeros_like(context)
    noise = torch.randn(context.shape, generator=generator, dtype=context.dtype, device=context.device)
    a0, s0 = schedule.coefficients(tmat[0].expand(B, T))
    z = torch.where(keep, context, a0 * start + s0 * noise)
    fn = guided if guided is not None else (lambda zz, tt: _unguided(denoise, zz, tt))
    for k in range(tmat.shape[0] - 1):
        t = tmat[k].expand(B, T)
        s = tmat[k + 1].expand(B, T)
        x_hat = fn(z, t).detach()
        z = ddim_step(schedule, z, x_hat, t, s, eta, generator)
        z = torch.where(keep, context, z)  # re-insert clean context
    return z
