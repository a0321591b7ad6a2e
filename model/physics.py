"""Geometry and physics helpers on the lat-lon grid (tensors only).

The one owner of the grid geometry (cell edges, areas, latitude weights); the regridder's
``LatLonGrid`` uses the same edge rule. Latitudes are in degrees; the grid may be Gaussian (uneven).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

EARTH_RADIUS = 6.371e6  # m
GRAVITY = 9.80665  # m s-2


def latitude_cell_edges(lat_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """``(H + 1,)`` latitude cell edges in degrees, in the order of ``lat_deg`` (ascending or descending).

    The one rule for every grid in the project, global or regional: edges lie half-way between
    neighbouring centres; an outer edge is the pole when the outer centre lies within half a cell of it
    (every global grid, Gaussian or regular), otherwise half a cell beyond the outer centre.
    """
    lat = np.asarray(lat_deg, dtype=np.float64)
    mid = 0.5 * (lat[1:] + lat[:-1])
    ends = []
    for centre, inner in ((lat[0], mid[0]), (lat[-1], mid[-1])):
        half = centre - inner
        edge = centre + half
        pole = 90.0 * np.sign(half)
        ends.append(pole if abs(edge) >= 90.0 or abs(pole - edge) < abs(half) else edge)
    return np.concatenate([[ends[0]], mid, [ends[1]]])


def latitude_edges(lat_deg: Tensor) -> Tensor:
    """:func:`latitude_cell_edges` on a tensor (float64)."""
    return torch.from_numpy(latitude_cell_edges(lat_deg.detach().double().cpu().numpy()))


def latitude_weights(lat_deg: Tensor) -> Tensor:
    """Area weights per latitude row, proportional to ``|d sin(lat)|``, normalised to mean 1. ``(H,)``."""
    e = torch.deg2rad(latitude_edges(lat_deg))
    w = torch.abs(torch.sin(e[1:]) - torch.sin(e[:-1]))
    return w / w.mean()


def cell_areas(lat_deg: Tensor, nlon: int, radius: float = EARTH_RADIUS) -> Tensor:
    """Cell areas ``R^2 |d sin(lat)| d lon`` in m^2, float64, shape ``(H, W)``."""
    e = torch.deg2rad(latitude_edges(lat_deg))
    band = torch.abs(torch.sin(e[1:]) - torch.sin(e[:-1])) * (2.0 * math.pi / nlon) * radius**2
    return band[:, None].expand(-1, nlon).clone()


def dry_air_mass(ps: Tensor, q: Tensor, dsigma: Tensor, areas: Tensor) -> Tensor:
    """Global dry air mass ``sum_ij dA_ij (p_s/g - (1/g) sum_k q_k dsigma_k p_s)`` in kg (float64).

    Args:
        ps: surface pressure in Pa, ``(..., H, W)``.
        q: specific humidity in kg/kg, ``(..., K, H, W)`` on sigma levels.
        dsigma: sigma layer thicknesses ``(K,)`` (sum 1), in the order of ``q``'s levels.
        areas: cell areas ``(H, W)`` in m^2.

    Returns:
        ``(...)`` dry air mass per leading index.
    """
    ps64, q64 = ps.double(), q.double()
    column_water = (q64 * dsigma.double()[:, None, None]).sum(dim=-3) * ps64 / GRAVITY  # kg m-2
    dry = ps64 / GRAVITY - column_water
    return (dry * areas.double()).sum(dim=(-2, -1))
