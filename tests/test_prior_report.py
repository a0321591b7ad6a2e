"""The prior's report: denoising error by row, context use, rollouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from wind_bmi.model.schedule import CosineVPSchedule


def test_denoising_error_by_row_is_zero_for_an_oracle_and_sigma_for_the_identity() -> None:
    from wind_bmi.evaluation.prior_report import denoising_error_by_row

    sched = CosineVPSchedule()
    x = torch.zeros(4, 5, 3, 6, 64)
    truth = x.clone()
    g = torch.Generator().manual_seed(0)
    oracle = denoising_error_by_row(lambda z, t: truth, sched, x, 0.3, g)
    identity = denoising_error_by_row(lambda z, t: z, sched, x, 0.3, g)
    sigma = float(sched.coefficients(torch.full((1, 1), 0.3))[1])
    assert oracle.shape == (6,) and np.all(oracle == 0)
    assert np.allclose(identity, sigma, rtol=0.05)  # pure noise passed through: its std in every row


def test_prior_report_rolls_out_several_members(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    from wind_bmi.evaluation.prior_report import run_prior_report

    card = tmp_path / "card" / tiny_model.name  # a copy: the report writes itself into the card
    card.parent.mkdir()
    for f in (tiny_model, tiny_model.with_suffix(".safetensors")):
        (card.parent / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="rollout_members"):
        run_prior_report(tiny_data / "val", tmp_path / "bad", card=card, rollout_members=0)
    assert not (tmp_path / "bad").exists()
    before = card.read_bytes()
    rep = run_prior_report(tiny_data / "val", tmp_path / "rep", card=card, samples=2, rollout_days=3.0,
                           rollout_members=3)
    assert card.read_bytes() == before  # an evaluation never rewrites the card unless asked to
    run_prior_report(tiny_data / "val", tmp_path / "rep", card=card, samples=2, rollout_days=3.0,
                     rollout_members=3, update_card=True)
    r = rep["rollout"]
    assert r["members"] == 3 and r["finite"]
    assert len(r["member_max_abs_diff_to_truth_K"]) == 3
    assert len(set(r["member_max_abs_diff_to_truth_K"])) == 3  # independent members, not one repeated
    assert r["max_abs_diff_to_truth_K"] == max(r["member_max_abs_diff_to_truth_K"])
    assert r["ensemble_mean_max_abs_diff_to_truth_K"] <= r["max_abs_diff_to_truth_K"] + 1e-9
    assert (tmp_path / "rep" / "prior_rollout.png").stat().st_size > 0
    for key, sp in [*rep["spectra"].items(), *r["spectra_last_10_days"].items()]:
        worst = sp["max_abs_log10_ratio_k1_30"]  # the largest per-wavenumber misfit bounds every band mean
        assert worst is not None and np.isfinite(worst), key
        assert all(abs(sp[b]) <= worst + 1e-12 for b in ("log10_ratio_k1_10", "log10_ratio_k11_30")
                   if sp.get(b) is not None), (key, sp)
    assert json.loads(card.read_text())["test_report"]["rollout"]["members"] == 3
    rows = rep["denoise_rmse_by_row_t0.3"]["rows"]
    assert len(rows) == 8 and all(np.isfinite(rows))
    cu = rep["context_use_t1"]
    assert cu["estimate"][0] == 0.0 and cu["persistence"][0] == 0.0 and len(cu["estimate"]) == 5


def test_context_use_tells_a_copying_denoiser_from_a_blind_one() -> None:
    from wind_bmi.evaluation.prior_report import context_use

    sched = CosineVPSchedule()
    base = torch.randn(3, 1, 2, 4, 8)
    windows = base + 0.1 * torch.randn(3, 5, 2, 4, 8)  # frames close to each other
    copy = lambda z, t: torch.where((t == 0)[..., None, None, None], z, z[:, :1].expand_as(z))  # noqa: E731
    blind = lambda z, t: torch.where((t == 0)[..., None, None, None], z, torch.zeros_like(z))  # noqa: E731
    c = context_use(copy, sched, windows, 1.0, torch.Generator().manual_seed(0))
    b = context_use(blind, sched, windows, 1.0, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(c["estimate"], c["persistence"], rtol=1e-6)
    np.testing.assert_allclose(b["estimate"][1:], b["climatology"][1:], rtol=1e-6)
    assert max(c["estimate"][1:]) < 0.5 * min(b["estimate"][1:])
