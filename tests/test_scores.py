"""Scores on cases with known answers, cross-checked against `scores` where it overlaps."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from helpers import gaussian_like_lats

from wind_bmi.evaluation.scores import bias, crps_fair, latitude_weights, rmse, spread_skill_ratio, zonal_power_spectrum

LAT = gaussian_like_lats(8)


def test_rmse_and_bias_of_uniform_error() -> None:
    truth = np.random.default_rng(0).standard_normal((8, 16))
    assert rmse(truth + 2.0, truth, LAT) == pytest.approx(2.0)
    assert bias(truth - 1.5, truth, LAT) == pytest.approx(-1.5)
    assert latitude_weights(LAT).mean() == pytest.approx(1.0)
    # an error confined to polar rows counts less than the same error at the equator
    e_pole, e_eq = np.zeros((8, 16)), np.zeros((8, 16))
    e_pole[0], e_eq[4] = 1.0, 1.0
    assert rmse(e_pole, 0 * e_pole, LAT) < rmse(e_eq, 0 * e_eq, LAT)


def test_fair_crps_known_values_and_scores_package() -> None:
    # two members at +-1 around the truth:
    ens = np.stack([np.full((8, 16), 1.0), np.full((8, 16), -1.0)])
    truth = np.zeros((8, 16))
    # mean|x - y| = 1, sum_ij|xi - xj| = 2 * 2 = 4, / (2*2*1) = 1  ->  0
    assert crps_fair(ens, truth, LAT) == pytest.approx(0.0)
    assert crps_fair(ens + 3.0, truth, LAT) == pytest.approx(3.0 - 1.0)  # skill 3, spread term 1
    import scores.probability as sp

    rng = np.random.default_rng(1)
    ens = rng.standard_normal((6, 8, 16))
    obs = rng.standard_normal((8, 16))
    ref = sp.crps_for_ensemble(xr.DataArray(ens, dims=("member", "lat", "lon")), xr.DataArray(obs, dims=("lat", "lon")),
                               ensemble_member_dim="member", method="fair", preserve_dims=["lat", "lon"])
    w = latitude_weights(LAT)[:, None]
    assert crps_fair(ens, obs, LAT) == pytest.approx(float((ref.values * w).mean()), rel=1e-10)


def test_spread_skill_ratio_of_a_reliable_ensemble() -> None:
    rng = np.random.default_rng(2)
    M, n = 10, 4000
    truth = rng.standard_normal((n, 8, 16))
    ens = rng.standard_normal((M, n, 8, 16))  # truth and members exchangeable
    ssr = spread_skill_ratio(ens, truth, LAT).mean()
    assert ssr == pytest.approx(np.sqrt(M / (M + 1)), rel=0.02)
    assert spread_skill_ratio(0.3 * ens, truth, LAT).mean() < 0.5  # under-dispersive


def test_zonal_spectrum_peaks_at_the_planted_wavenumber() -> None:
    lon = np.arange(16) * 2 * np.pi / 16
    field = np.tile(3.0 * np.cos(5 * lon), (8, 1))
    spec = zonal_power_spectrum(field, LAT)
    assert int(np.argmax(spec)) == 5
    assert spec[5] == pytest.approx(9.0 / 2)  # amplitude^2 / 2 (Parseval)


def test_relative_bias_percent_is_the_area_mean_overshoot() -> None:
    from wind_bmi.evaluation.scores import relative_bias_percent

    lat = np.linspace(-80, 80, 9)
    truth = np.ones((9, 12))
    assert float(relative_bias_percent(truth * 1.1, truth, lat)) == pytest.approx(10.0)
    f = truth.copy()
    f[4] = 3.0  # the equator row weighs more than a polar row
    g = truth.copy()
    g[0] = 3.0
    assert float(relative_bias_percent(f, truth, lat)) > float(relative_bias_percent(g, truth, lat)) > 0
