"""Verification scores in WeatherBench2 conventions (numpy).

Fields are ``(..., lat, lon)``; latitude weights are proportional to the cell area
(``|d sin lat|``), normalised to mean 1, so a uniform error gives that error back.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def latitude_weights(lat_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Area weights per latitude row, mean 1: :func:`wind_bmi.model.physics.latitude_weights` in numpy."""
    import torch

    from wind_bmi.model.physics import latitude_weights as weights

    return weights(torch.from_numpy(np.asarray(lat_deg, dtype=np.float64))).numpy()


def _wmean(x: NDArray[np.float64], lat: NDArray[np.float64]) -> NDArray[np.float64]:
    w = latitude_weights(lat)[:, None]
    return (x * w).mean(axis=(-2, -1))


def rmse(forecast: NDArray[np.float64], truth: NDArray[np.float64], lat: NDArray[np.float64]) -> NDArray[np.float64]:
    """Latitude-weighted RMSE over (lat, lon): ``sqrt(mean_w (f - y)^2)``."""
    return np.sqrt(_wmean((np.asarray(forecast) - truth) ** 2, lat))


def bias(forecast: NDArray[np.float64], truth: NDArray[np.float64], lat: NDArray[np.float64]) -> NDArray[np.float64]:
    """Latitude-weighted mean error ``mean_w (f - y)``."""
    return _wmean(np.asarray(forecast) - truth, lat)


def relative_bias_percent(forecast: NDArray[np.float64], truth: NDArray[np.float64],
                          lat: NDArray[np.float64]) -> NDArray[np.float64]:
    """Area-mean overshoot ``100 (mean_w f / mean_w y - 1)`` in percent (humidity, precipitation)."""
    return 100.0 * (_wmean(np.asarray(forecast), lat) / _wmean(np.asarray(truth), lat) - 1.0)


def crps_fair(ensemble: NDArray[np.float64], truth: NDArray[np.float64], lat: NDArray[np.float64],
              member_axis: int = 0) -> NDArray[np.float64]:
    """Fair (unbiased) CRPS, latitude-weighted: ``mean|x_i - y| - sum_ij |x_i - x_j| / (2 M (M - 1))``."""
    x = np.moveaxis(np.asarray(ensemble, dtype=np.float64), member_axis, 0)
    M = x.shape[0]
    if M < 2:
        raise ValueError("fair CRPS needs at least 2 members")
    skill = np.abs(x - truth[None]).mean(axis=0)
    spread = np.abs(x[:, None] - x[None, :]).sum(axis=(0, 1)) / (2 * M * (M - 1))
    return _wmean(skill - spread, lat)


def spread_skill_ratio(ensemble: NDArray[np.float64], truth: NDArray[np.float64], lat: NDArray[np.float64],
                       member_axis: int = 0) -> NDArray[np.float64]:
    """``sqrt(mean_w var_ddof1) / RMSE(ensemble mean)``, *without* the ``sqrt((M+1)/M)`` correction.

    A perfectly reliable M-member ensemble then has an expected SSR of ``sqrt(M/(M+1))`` (< 1).
    """
    x = np.moveaxis(np.asarray(ensemble, dtype=np.float64), member_axis, 0)
    spread = np.sqrt(_wmean(x.var(axis=0, ddof=1), lat))
    return spread / rmse(x.mean(axis=0), truth, lat)


def zonal_power_spectrum(field: NDArray[np.float64], lat: NDArray[np.float64]) -> NDArray[np.float64]:
    """Zonal power spectrum per wavenumber, ``|rfft_lon|^2 / nlon^2`` averaged over latitude rows
    (area-weighted). Returns ``(..., nlon // 2 + 1)``; wavenumber 0 is the zonal mean."""
    f = np.fft.rfft(np.asarray(field, dtype=np.float64), axis=-1)
    power = np.abs(f) ** 2 / field.shape[-1] ** 2
    power[..., 1:] *= 2.0  # one-sided: count +k and -k (Nyquist too, a small overcount)
    w = latitude_weights(lat)
    return (power * w[:, None]).mean(axis=-2)
