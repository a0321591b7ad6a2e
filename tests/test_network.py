"""The noise-blind UViT: shapes, noise blindness, sphere padding across the poles, frame mixing."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_net
from wind_bmi.model.checkpoint import load_prior
from wind_bmi.model.network import UViT, sphere_pad

from wind_bmi.config import load_config
from wind_bmi.training import run_training


def test_network_shapes_and_gradient_flow() -> None:
    net = tiny_net()
    # zero-initialised output layers: perturb so that every parameter receives gradient
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    z = torch.randn(2, 5, 4, 8, 16)
    out = net(z)
    assert out.shape == z.shape
    out.square().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    with pytest.raises(ValueError, match="expected windows"):
        net(torch.randn(1, 5, 3, 8, 16))


def test_network_is_noise_blind() -> None:
    net = tiny_net()
    params = list(inspect.signature(net.forward).parameters)
    assert params == ["z"], "the network must not take a noise level"
    names = " ".join(n for n, _ in net.named_modules()).lower()
    assert "time" not in names and "emb" not in names and "ada" not in names


def test_sphere_padding_crosses_poles_and_wraps_longitude() -> None:
    x = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 1, 4, 8)
    p = sphere_pad(x, 1)
    assert p.shape == (1, 1, 6, 10)
    assert torch.equal(p[0, 0, 1:-1, 0], x[0, 0, :, -1])  # west halo = east edge
    assert torch.equal(p[0, 0, 1:-1, -1], x[0, 0, :, 0])
    # beyond the south pole: row 0 seen from the other side (rolled by half the longitudes)
    assert torch.equal(p[0, 0, 0, 1:-1], x[0, 0, 0].roll(4))
    assert torch.equal(p[0, 0, -1, 1:-1], x[0, 0, -1].roll(4))
    assert torch.equal(sphere_pad(x, 2)[0, 0, 0, 2:-2], x[0, 0, 1].roll(4))  # two rows beyond: mirrored order
    # corners: the halo rows wrap in longitude too; gradients reach every source cell (in-place fills)
    assert torch.equal(p[0, 0, 0, 0], p[0, 0, 0, -2]) and torch.equal(p[0, 0, -1, -1], p[0, 0, -1, 1])
    xd = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sphere_pad(v, 2), (xd,))


def test_sphere_padding_adjoint_matches_autograd_of_the_slices() -> None:
    """The hand-written backward equals autograd through plain slicing, with and without signs."""
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    sign = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)[:, None, None]
    for p in (1, 2):
        for sg in (None, sign):
            s = torch.ones(3, 1, 1, dtype=torch.float64) if sg is None else sg
            rows = torch.cat([x[..., :p, :].flip(-2).roll(4, -1) * s, x, x[..., -p:, :].flip(-2).roll(4, -1) * s], -2)
            ref = torch.cat([rows[..., -p:], rows, rows[..., :p]], -1)
            out = sphere_pad(x, p, sg)
            assert torch.equal(out, ref)
            w = torch.randn_like(ref)
            (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
            (g_new,) = torch.autograd.grad((out * w).sum(), x)
            assert torch.allclose(g_new, g_ref, rtol=0, atol=1e-12), (p, sg is None)
    assert torch.autograd.gradcheck(lambda v: sphere_pad(v, 1, sign), (x,))
    with pytest.raises(ValueError, match="sign must have shape"):
        sphere_pad(x, 1, sign[:2])


def test_wind_components_change_sign_across_the_pole() -> None:
    """A uniform flow over the pole is smooth across it only with the wind halo negated."""
    H, W = 8, 32
    lat = torch.deg2rad(torch.linspace(-78.75, 78.75, H, dtype=torch.float64))[:, None]
    lon = torch.deg2rad(torch.arange(W, dtype=torch.float64) * 360 / W)[None, :]
    # the constant Cartesian vector (1, 0, 0) in the local east/north axes
    u = (-torch.sin(lon)).expand(H, W)
    v = -torch.sin(lat) * torch.cos(lon)
    x = torch.stack([u, v])[None]
    sign = torch.tensor([-1.0, -1.0], dtype=torch.float64)[:, None, None]

    # the same formulas continued past the pole (latitude 180 - lat, same longitude) give the halo
    beyond = torch.deg2rad(torch.tensor(180.0 - 78.75, dtype=torch.float64))
    expect = torch.stack([-torch.sin(lon[0]), -torch.sin(beyond) * torch.cos(lon[0])])
    with_sign, blind = sphere_pad(x, 1, sign)[0, :, -1, 1:-1], sphere_pad(x, 1)[0, :, -1, 1:-1]
    assert torch.allclose(with_sign, expect, atol=1e-12)
    assert float((blind - expect).abs().max()) > 1.5  # without the sign: a jump of twice the wind
    net = UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, vector_channels=(0, 2))
    assert net.stem.pole_sign is not None and net.stem.pole_sign.flatten().tolist() == [-1.0, 1.0, -1.0, 1.0]
    assert "stem.pole_sign" not in net.state_dict()  # rebuilt from the card, not stored in the weights
    with pytest.raises(ValueError, match="vector_channels"):
        UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, vector_channels=(4,))
    with pytest.raises(ValueError, match="in_patch"):
        UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, vector_channels=(0,), in_patch=2)


def test_temporal_mix_carries_a_clean_frame_to_the_others_at_full_resolution(tiny_config: Path, tiny_data: Path,
                                                                             tmp_path: Path) -> None:
    import dataclasses

    plain, mixed = tiny_net(), tiny_net(temporal_mix=True)
    for net in (plain, mixed):
        torch.manual_seed(1)
        for name, p in net.named_parameters():  # perturb the zero-initialised branches, but keep the
            if not name.startswith("from_tokens"):  # transformer's output at zero: no other path in time
                p.data.add_(0.05 * torch.randn_like(p))
    z = torch.randn(1, 5, 4, 8, 16)
    z2 = z.clone()
    z2[0, 0, :, 3, 5] += 1.0  # one pixel of frame 0
    with torch.no_grad():
        d_plain = (plain(z2) - plain(z))[0, 1:].abs()
        d_mixed = (mixed(z2) - mixed(z))[0, 1:].abs()
    assert float(d_plain.max()) == 0.0  # per-frame convs alone never reach another frame
    assert float(d_mixed.max()) > 1e-4
    assert float(d_mixed[..., 3, 5].mean()) > float(d_mixed[..., 7, 13].mean())  # local, at full resolution
    with pytest.raises(ValueError, match="5 frames"):
        mixed(z[:, :4])
    # trained with it, the card records it and loads the same network
    cfg = load_config(tiny_config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, temporal_mix=True))
    card_path = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "tm"), max_steps=2, progress=False)
    assert json.loads(card_path.read_text())["architecture"]["temporal_mix"] is True
    assert load_prior(card_path).net.temporal_mix
