"""The noise schedule and the per-frame sampler with clean context frames."""

from __future__ import annotations

import torch
from helpers import tiny_net
from wind_bmi.model.sampler import sample_window
from wind_bmi.model.schedule import CosineVPSchedule


def test_schedule_clean_frames_are_exact() -> None:
    s = CosineVPSchedule()
    x = torch.randn(2, 5, 1, 2, 2)
    t = torch.tensor([[0.0, 0.0, 0.5, 0.9, 1.0]] * 2)
    z = s.noise(x, t, torch.Generator().manual_seed(0))
    assert torch.equal(z[:, :2], x[:, :2])
    assert not torch.allclose(z[:, 2:], x[:, 2:])
    a, sig = s.coefficients(t)
    assert torch.allclose(a**2 + sig**2, torch.ones_like(a), atol=2e-6)
    w = s.loss_weight(t, 5.0)
    assert torch.all(w[:, :2] == 0) and torch.all(w[:, 2:] >= 1) and torch.all(w <= 5)


def test_sampler_keeps_context_frames_exactly_and_uses_the_generator() -> None:
    net = tiny_net()
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    sched = CosineVPSchedule()

    def D(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(z)

    ctx = torch.randn(3, 5, 4, 8, 16)
    mask = torch.tensor([True, True, False, False, False])
    a = sample_window(D, sched, ctx, mask, steps=4, generator=torch.Generator().manual_seed(1))
    b = sample_window(D, sched, ctx, mask, steps=4, generator=torch.Generator().manual_seed(1))
    c = sample_window(D, sched, ctx, mask, steps=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[:, :2], ctx[:, :2])
    assert torch.equal(a, b) and not torch.equal(a[:, 2:], c[:, 2:])
    assert torch.isfinite(a).all()
    # members differ (independent noise per batch row)
    assert not torch.allclose(a[0, 2:], a[1, 2:])
