"""Synthetic data and tiny models for fast tests (no jcm, no shipped model)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from wind_bmi.model.network import UViT

from wind_bmi.variables import VARIABLES


def tiny_net(**kw: object) -> UViT:
    """A UViT over 4 channels on an 8 x 16 grid, seeded."""
    torch.manual_seed(0)
    return UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, **kw)  # type: ignore[arg-type]

LEVELS = np.array([0.95, 0.51, 0.2])
BOUNDS = np.array([[1.0, 0.77], [0.77, 0.26], [0.26, 0.0]])


def gaussian_like_lats(n: int) -> np.ndarray:
    # Gauss-Legendre latitudes (ascending): a real uneven grid
    x, _ = np.polynomial.legendre.leggauss(n)
    return np.rad2deg(np.arcsin(x))


def synthetic_dataset(start: str, days: int, nlat: int = 8, nlon: int = 16, seed: int = 0) -> xr.Dataset:
    """A smooth, travelling-wave world in the project layout (time, level, lat, lon)."""
    rng = np.random.default_rng(seed)
    t0 = dt.datetime.fromisoformat(start)
    n = days * 4
    times = [t0 + dt.timedelta(hours=6 * (i + 1)) for i in range(n)]
    lat = gaussian_like_lats(nlat)
    lon = np.arange(nlon) * 360.0 / nlon
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi)
    tt = np.arange(n)[:, None, None, None] * 0.3 + phase
    lev = np.arange(len(LEVELS))[None, :, None, None]
    wave = np.sin(2 * lo[None, None] - tt + lev) * np.cos(la[None, None])
    noise = 0.1 * rng.standard_normal((n, len(LEVELS), nlat, nlon))
    fields = {
        "temperature": 250 + 30 * np.cos(la)[None, None] + 5 * wave + noise - 10 * lev,
        "u_wind": 10 * np.cos(la)[None, None] + 3 * wave + noise,
        "v_wind": 2 * wave + noise,
        "specific_humidity": np.abs(1e-3 * np.cos(la)[None, None] * (1 + 0.3 * wave) + 1e-5 * noise),
        "geopotential": 1e4 * (lev + 1) + 100 * wave,
    }
    ds = xr.Dataset(coords={"time": times, "level": ("level", LEVELS), "lat": ("lat", lat), "lon": ("lon", lon)})
    for name, v in fields.items():
        ds[name] = (("time", "level", "lat", "lon"), v.astype(np.float32), {"units": VARIABLES[name].units})
    ds["surface_pressure"] = (("time", "lat", "lon"), (1e5 + 500 * wave[:, 0]).astype(np.float32), {"units": "Pa"})
    ds["precipitation"] = (("time", "lat", "lon"), (1e-5 * np.maximum(wave[:, 0], 0)).astype(np.float32),
                           {"units": "kg m-2 s-1"})
    ds["level_bounds"] = (("level", "nv"), BOUNDS)
    return ds


def write_dataset(folder: Path, start: str, days: int, **kw: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = synthetic_dataset(start, days, **kw)  # type: ignore[arg-type]
    path = folder / f"synthetic_{start[:10]}.nc"
    ds.to_netcdf(path, encoding={"time": {"units": "hours since 1900-01-01", "calendar": "proleptic_gregorian"}})
    return path


TINY_TRAIN_YAML = """
kind: train
train_years: [2000]
val_years: [2001]
test_years: []
batch_size: 4
lr: 0.002
warmup_steps: 2
steps: 30
checkpoint_minutes: 100.0
bf16: false
val_windows: 8
ema_decay: 0.9
model:
  channels: [8, 16]
  dim: 32
  depth: 1
  heads: 2
  in_patch: 1
  pole_flip_winds: true
"""


def write_bmi_config(path: Path, tiny_model: Path, ic: Path, **over: object) -> Path:
    """A WindBmi YAML on the tiny prior (4 sampler steps, 2002-03-02 start); ``over`` replaces keys."""
    import yaml

    cfg = {"kind": "bmi", "model": str(tiny_model), "initial_condition": str(ic), "sampler": {"steps": 4, "eta": 1.0},
           "start_time": "2002-03-02 00:00:00", **over}
    path.write_text(yaml.safe_dump(cfg))
    return path
