"""The zonal band limit: an orthogonal projection fitted from the data, carried by the card, applied
by the denoiser and by guidance."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from wind_bmi.model.bandlimit import ZonalBandLimit
from wind_bmi.model.checkpoint import CheckpointError, load_prior
from wind_bmi.model.denoiser import PriorDenoiser
from wind_bmi.model.guidance import MMPSDenoiser
from wind_bmi.model.operators import MaskOperator, Observation
from wind_bmi.model.tasks import WindModel

from wind_bmi.config import load_config
from wind_bmi.training import fit_band_limit_into_card, run_training

C, H, W = 3, 6, 16


def band_limited(n: int, cutoff: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random frames ``(n, C, H, W)`` whose row ``(c, h)`` holds exactly the wavenumbers ``k < cutoff[c, h]``."""
    rng = np.random.default_rng(seed)
    spec = rng.normal(size=(n, C, H, W // 2 + 1)) + 1j * rng.normal(size=(n, C, H, W // 2 + 1))
    spec *= np.arange(W // 2 + 1)[None, None, None, :] < cutoff[None, :, :, None]
    spec[..., 0] = spec[..., 0].real
    return np.fft.irfft(spec, n=W, axis=-1) * W / 4


CUTOFF = np.array([[1, 2, 4, 9, 5, 3], [2, 2, 3, 3, 2, 2], [9, 8, 7, 6, 5, 4]])


def test_projection_is_orthogonal_idempotent_and_keeps_the_band() -> None:
    P = ZonalBandLimit(CUTOFF, W)
    x = torch.randn(2, 5, C, H, W, dtype=torch.float64)
    px = P(x)
    torch.testing.assert_close(P(px), px)  # idempotent
    # orthogonal: the removed part is perpendicular to everything in the range, row by row
    y = P(torch.randn_like(x))
    assert float(((x - px) * y).sum(-1).abs().max()) < 1e-10
    # fields inside the band pass exactly; one wavenumber above the cutoff of a row is removed there only
    inside = torch.from_numpy(band_limited(4, CUTOFF))
    torch.testing.assert_close(P(inside), inside)
    lon = torch.arange(W, dtype=torch.float64) * 2 * np.pi / W
    wave = torch.zeros(C, H, W, dtype=torch.float64)
    wave[0, 1] = torch.cos(2 * lon)  # row (0, 1) keeps k < 2: removed
    wave[0, 2] = torch.cos(2 * lon)  # row (0, 2) keeps k < 4: kept
    out = P(wave)
    assert float(out[0, 1].abs().max()) < 1e-12 and torch.allclose(out[0, 2], wave[0, 2])
    assert P.kept_fraction() < 1.0 and ZonalBandLimit(np.full((C, H), W // 2 + 1), W).kept_fraction() == 1.0
    # gradients flow (guidance differentiates through it)
    xr = x.clone().requires_grad_(True)
    P(xr).square().sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_fit_finds_the_band_the_data_occupies() -> None:
    frames = band_limited(64, CUTOFF, seed=1).astype(np.float32)
    fitted = ZonalBandLimit.fit(frames, eps=1e-6)
    np.testing.assert_array_equal(fitted.cutoff, CUTOFF)
    # chunks give the same answer as one array; a little broadband noise widens the band to everything
    np.testing.assert_array_equal(ZonalBandLimit.fit(iter([frames[:20], frames[20:]]), eps=1e-6).cutoff, CUTOFF)
    noisy = frames + 0.1 * np.random.default_rng(2).normal(size=frames.shape).astype(np.float32)
    assert (ZonalBandLimit.fit(noisy, eps=1e-6).cutoff == W // 2 + 1).all()
    with pytest.raises(ValueError, match="eps"):
        ZonalBandLimit.fit(frames, eps=0.0)


def test_card_entry_is_checked() -> None:
    P = ZonalBandLimit(CUTOFF, W, eps=1e-5)
    again = ZonalBandLimit.from_dict(json.loads(json.dumps(P.to_dict())), (C, H, W))
    np.testing.assert_array_equal(again.cutoff, CUTOFF)
    with pytest.raises(ValueError, match=r"the model is \(3, 6, 32\)"):
        ZonalBandLimit.from_dict(P.to_dict(), (C, H, 32))
    with pytest.raises(ValueError, match="1..9"):
        ZonalBandLimit(CUTOFF + 5, W)
    with pytest.raises(ValueError, match="integers"):
        ZonalBandLimit(CUTOFF + 0.5, W)
    with pytest.raises(ValueError, match="cutoff"):
        ZonalBandLimit.from_dict({"width": W}, (C, H, W))


class _Noisy(torch.nn.Module):
    """A stand-in network: the truth plus broadband error (what an undertrained prior does at the poles)."""

    def __init__(self, truth: torch.Tensor) -> None:
        super().__init__()
        self.truth = truth

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return self.truth + 0.3 * torch.randn(z.shape, generator=g)


def test_denoiser_and_guidance_stay_in_the_band_and_only_gain_from_it() -> None:
    from wind_bmi.model.schedule import CosineVPSchedule

    sched = CosineVPSchedule()
    P = ZonalBandLimit(CUTOFF, W)
    x = torch.from_numpy(band_limited(2 * 5, CUTOFF, seed=3)).float().reshape(2, 5, C, H, W)
    t = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5]] * 2)
    z = sched.noise(x, t, generator=torch.Generator().manual_seed(1))
    raw = PriorDenoiser(_Noisy(x), sched)
    lim = PriorDenoiser(_Noisy(x), sched, band_limit=P)
    xr, xl = raw(z, t), lim(z, t)
    torch.testing.assert_close(xl[:, 0], z[:, 0], rtol=0, atol=0)  # the clean frame passes untouched
    torch.testing.assert_close(P(xl[:, 1:]), xl[:, 1:])
    err_raw, err_lim = float((xr - x)[:, 1:].square().sum()), float((xl - x)[:, 1:].square().sum())
    # Pythagoras: the truth lies in the band, so the projection removes error and nothing else
    assert err_lim < 0.6 * err_raw
    # MMPS's correction goes through the network's transposed Jacobian; the prior projects it back
    mask = torch.zeros(5, C, H, W, dtype=torch.bool)
    mask[2, 0, :, ::3] = True
    A = MaskOperator(mask)
    obs = Observation(A, A(x[:1]) + 0.5, 0.01)  # observations off the estimate: a real correction

    class Linear(torch.nn.Module):  # a network with a broadband Jacobian
        def forward(self, zz: torch.Tensor) -> torch.Tensor:
            return 0.5 * zz + 0.1 * torch.roll(zz, 1, dims=-1)

    post = MMPSDenoiser(PriorDenoiser(Linear(), sched, band_limit=P), obs, iterations=3)(z[:1], t[:1])
    torch.testing.assert_close(P(post[:, 1:]), post[:, 1:])
    post_raw = MMPSDenoiser(PriorDenoiser(Linear(), sched), obs, iterations=3)(z[:1], t[:1])
    assert not torch.allclose(P(post_raw[:, 1:]), post_raw[:, 1:], atol=1e-4)


def test_band_limit_is_fitted_into_a_card_and_used_by_the_model(tiny_model: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    card = tmp_path / "model.json"
    shutil.copy(tiny_model, card)
    shutil.copy(tiny_model.with_suffix(".safetensors"), tmp_path / "model.safetensors")
    assert load_prior(card).band_limit is None and WindModel(load_prior(card)).denoiser.band_limit is None
    before = card.read_text()
    with pytest.raises(ValueError, match="no data for years"):
        fit_band_limit_into_card(card, tiny_data, years=[1900])
    assert card.read_text() == before  # nothing written on failure
    band = fit_band_limit_into_card(card, tiny_data, eps=1e-4)
    prior = load_prior(card)  # the weights' checksum still matches
    assert prior.band_limit is not None
    np.testing.assert_array_equal(prior.band_limit.cutoff, band.cutoff)
    assert json.loads(card.read_text())["band_limit"]["fitted_on"]["years"] == [2000]
    wm = WindModel(prior)
    assert wm.denoiser.band_limit is not None and WindModel(prior, band_limit=False).denoiser.band_limit is None
    # samples of the generated frames lie in the band
    ctx = torch.zeros(1, wm.T, wm.C, wm.H, wm.W)
    out = wm.sample(ctx, torch.zeros(wm.T, dtype=torch.bool), generator=torch.Generator().manual_seed(0), steps=2)
    torch.testing.assert_close(band(out), out, atol=1e-5, rtol=0)
    # a card whose band limit does not fit the model is refused on load
    c = json.loads(card.read_text())
    c["band_limit"]["cutoff"] = c["band_limit"]["cutoff"][:-1]
    card.write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="band_limit"):
        load_prior(card)


def test_training_with_a_band_limit_ships_it_in_the_card(tiny_data: Path, tiny_config: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(load_config(tiny_config), band_limit_eps=1e-4)
    card = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "bl"), max_steps=2, progress=False)
    prior = load_prior(card)
    assert prior.band_limit is not None
    assert json.loads(card.read_text())["band_limit"]["eps"] == 1e-4
    # a fine-tune keeps its prior's band limit
    ft = run_training(dataclasses.replace(cfg, init_from=str(card), band_limit_eps=None), data=str(tiny_data),
                      out=str(tmp_path / "ft"), max_steps=1, progress=False)
    assert json.loads(ft.read_text())["band_limit"]["cutoff"] == json.loads(card.read_text())["band_limit"]["cutoff"]
