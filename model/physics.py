"""Geometry and physics helpers on the lat-lon grid (tensors only).

Latitudes are in degrees, ascending (south to north); the grid may be Gaussian (uneven).
Cell edges in latitude lie half-way between neighbouring latitudes and at the poles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EARTH_RADIUS = 6.371e6  # m
GRAVITY = 9.80665  # m s-2


def latitude_edges(lat_deg: Tensor) -> Tensor:
    """``(H + 1,)`` cell edges in degrees for ascending ``lat_deg``: midpoints, and -90/90 at the ends."""
    lat = lat_deg.double()
    mid = 0.5 * (lat[1:] + lat[:-1])
    lo = torch.tensor([-90.0], dtype=lat.dtype) if lat[0] < lat[-1] else torch.tensor([90.0], dtype=lat.dtype)
    return torch.cat([lo, mid, -lo])


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
