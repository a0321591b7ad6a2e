"""Channels, normalisation statistics and ``(T, C, H, W)`` training windows.

A channel is one ``(variable, level)`` pair (surface fields have level ``None``). Statistics
(per-channel mean and standard deviation) are computed on the training years only and travel
with the model card. Windows are ``T`` consecutive frames with a constant time step; a window
never straddles a gap (e.g. the seam between two generator runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from wind_bmi.data.layouts import open_any


@dataclasses.dataclass(frozen=True)
class Channel:
    """One input channel: a variable at one level (``level`` is None for surface fields)."""

    variable: str
    level: float | None

    @property
    def label(self) -> str:
        return self.variable if self.level is None else f"{self.variable}@{self.level:g}"


def channels_of(ds: xr.Dataset, variables: Sequence[str]) -> list[Channel]:
    """The channel list of ``variables`` in ``ds`` (3-D fields expand over all levels, in file order)."""
    out: list[Channel] = []
    for name in variables:
        if name not in ds.data_vars:
            raise KeyError(f"variable {name!r} not in dataset (has {sorted(map(str, ds.data_vars))})")
        if "level" in ds[name].dims:
            out.extend(Channel(name, float(lv)) for lv in ds["level"].values)
        else:
            out.append(Channel(name, None))
    return out


def stack_channels(ds: xr.Dataset, channels: Sequence[Channel]) -> np.ndarray:
    """Array ``(time, C, lat, lon)`` float32 of the given channels, in physical units."""
    parts = []
    for ch in channels:
        da = ds[ch.variable]
        if ch.level is not None:  # files may store sigma in float32: match to 1e-5
            da = da.sel(level=ch.level, method="nearest", tolerance=1e-5)
        parts.append(np.asarray(da.transpose("time", "lat", "lon").values, dtype=np.float32))
    return np.stack(parts, axis=1)


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Per-channel affine normalisation ``x_norm = (x - mean) / std``.

    Precipitation is heavy-tailed; it is normalised like the others (the prior learns the
    tail), which keeps the map affine and the operators' units simple.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, frames: np.ndarray) -> Normalisation:
        """Statistics over ``frames`` of shape ``(N, C, H, W)`` (float64 accumulation)."""
        mean = frames.mean(axis=(0, 2, 3), dtype=np.float64)
        var = np.zeros_like(mean)
        for c in range(frames.shape[1]):
            var[c] = np.mean((frames[:, c].astype(np.float64) - mean[c]) ** 2)
        std = np.sqrt(np.maximum(var, 1e-30))
        return cls(mean.astype(np.float64), std.astype(np.float64))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        shape = (-1, 1, 1)
        return ((x - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        shape = (-1, 1, 1)
        return (x * self.std.reshape(shape) + self.mean.reshape(shape)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


def select_years(ds: xr.Dataset, years: Sequence[int]) -> xr.Dataset:
    """Frames whose calendar year is in ``years`` (cftime or numpy times)."""
    yrs = np.array([t.year for t in ds["time"].values]) if ds["time"].dtype == object else \
        ds["time"].dt.year.values
    keep = np.isin(yrs, np.asarray(years))
    if not keep.any():
        raise ValueError(f"no frames of years {list(years)} in the data (years present: {sorted(set(yrs.tolist()))})")
    return ds.isel(time=np.nonzero(keep)[0])


def window_starts(times: Sequence[Any], frames: int) -> np.ndarray:
    """Start indices of windows of ``frames`` frames with a constant step (no gaps inside)."""
    if len(times) < frames:
        return np.zeros(0, dtype=np.int64)
    dts = np.array([(b - a).total_seconds() for a, b in zip(times[:-1], times[1:], strict=False)])
    step = np.median(dts)
    ok = np.isclose(dts, step)
    starts = [i for i in range(len(times) - frames + 1) if ok[i:i + frames - 1].all()]
    return np.asarray(starts, dtype=np.int64)


class WindowDataset:
    """Normalised windows ``(T, C, H, W)`` of a split held in memory as float32.

    Args:
        frames: ``(N, C, H, W)`` normalised frames.
        times: the N times (datetime-like).
        T: window length.
    """

    def __init__(self, frames: np.ndarray, times: Sequence[Any], T: int = 5) -> None:
        self.frames = frames
        self.times = list(times)
        self.T = T
        self.starts = window_starts(self.times, T)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(self.starts[i])
        return self.frames[s:s + self.T]

    def batch(self, idx: Sequence[int]) -> np.ndarray:
        """Windows ``(B, T, C, H, W)`` for the given window indices."""
        return np.stack([self[int(i)] for i in idx], axis=0)


@dataclasses.dataclass
class Splits:
    """Train/validation/test windows plus the channels, statistics and grid they share."""

    train: WindowDataset
    val: WindowDataset
    test: WindowDataset | None
    channels: list[Channel]
    norm: Normalisation
    lat: np.ndarray
    lon: np.ndarray
    levels: np.ndarray
    provenance: dict[str, Any]
    level_bounds: np.ndarray | None = None


def _load_split(paths: Sequence[str | Path], years: Sequence[int], channels: list[Channel] | None,
                variables: Sequence[str]) -> tuple[np.ndarray, list[Any], list[Channel], xr.Dataset]:
    arrays, times = [], []
    ds0 = None
    for path in paths:
        ds = open_any(path)
        try:
            ds = select_years(ds, years)
        except ValueError:
            continue
        channels = channels or channels_of(ds, variables)
        arrays.append(stack_channels(ds, channels))
        times.extend(ds["time"].values.tolist())
        ds0 = ds0 if ds0 is not None else ds
    if ds0 is None or channels is None:
        raise ValueError(f"no data for years {list(years)} in {[str(p) for p in paths]}")
    return np.concatenate(arrays, axis=0), times, channels, ds0


def load_years(paths: Sequence[str | Path], years: Sequence[int], channels: list[Channel]) -> np.ndarray:
    """Raw frames ``(N, C, H, W)`` of ``channels`` for calendar ``years`` from one or more data folders."""
    return _load_split(paths, years, channels, sorted({c.variable for c in channels}))[0]


def build_splits(paths: Sequence[str | Path], variables: Sequence[str], train_years: Sequence[int],
                 val_years: Sequence[int], test_years: Sequence[int] = (), T: int = 5,
                 norm: Normalisation | None = None) -> Splits:
    """Load the splits by calendar year from one or more data folders; statistics from training only
    (or ``norm``, e.g. a prior's own when fine-tuning it).

    A gap between folders (different seeds) is never bridged by a window because the time
    step there differs from the median step.
    """
    train_raw, train_t, channels, ds0 = _load_split(paths, train_years, None, variables)
    if norm is None:
        norm = Normalisation.fit(train_raw)
    elif norm.mean.shape != (train_raw.shape[1],):
        raise ValueError(f"normalisation has {norm.mean.shape[0]} channels, the data {train_raw.shape[1]}")
    train = WindowDataset(_norm_frames(norm, train_raw), train_t, T)
    del train_raw
    val_raw, val_t, _, _ = _load_split(paths, val_years, channels, variables)
    val = WindowDataset(_norm_frames(norm, val_raw), val_t, T)
    test = None
    if test_years:
        test_raw, test_t, _, _ = _load_split(paths, test_years, channels, variables)
        test = WindowDataset(_norm_frames(norm, test_raw), test_t, T)
    prov = {k: ds0.attrs[k] for k in ("jcm_version", "source", "wind_layout") if k in ds0.attrs}
    prov.update({"train_years": list(train_years), "val_years": list(val_years), "test_years": list(test_years)})
    levels = ds0["level"].values if "level" in ds0.coords else np.zeros(0)
    bounds = None
    if "level_bounds" in ds0:
        lb = ds0["level_bounds"]
        bounds = np.asarray(lb.isel(time=0).values if "time" in lb.dims else lb.values, dtype=np.float64)
    return Splits(train, val, test, channels, norm, ds0["lat"].values, ds0["lon"].values, levels, prov, bounds)


def _norm_frames(norm: Normalisation, frames: np.ndarray) -> np.ndarray:
    """Normalise ``(N, C, H, W)`` in place-ish, chunked to bound peak memory."""
    out = np.empty(frames.shape, dtype=np.float32)
    m = norm.mean.reshape(1, -1, 1, 1)
    s = norm.std.reshape(1, -1, 1, 1)
    for i in range(0, len(frames), 256):
        out[i:i + 256] = (frames[i:i + 256] - m) / s
    return out
