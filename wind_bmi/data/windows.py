"""Channels, normalisation statistics and ``(T, C, H, W)`` training windows.

A channel is one ``(variable, level)`` pair (surface fields have level ``None``). Statistics
(:class:`Normalisation`) are computed on the training years only and travel
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
    """Affine normalisation ``x_norm = (x - mean) / std`` with one ``std`` per channel.

    ``kind`` ``"channel"``: one mean per channel, ``mean`` ``(C,)``. ``kind`` ``"gridpoint"``: the
    training years' time-mean field per channel, ``mean`` ``(C, H, W)``, and ``std`` the channel's
    anomaly scale about it. The time-mean field carries orography and the latitude structure (surface
    pressure spans 54-109 kPa with orography while its weather is a few hundred Pa), so the network
    models anomalies and a normalised error of 0.1 is 0.1 of the weather, not of the terrain.
    The map stays affine per channel, so linear operators map physical targets through it exactly
    (``A(m + s x) = A(m) + s A(x)`` for operators that keep channels apart).
    Precipitation is heavy-tailed; it is normalised like the others (the prior learns the tail).
    """

    mean: np.ndarray
    std: np.ndarray

    KINDS = ("channel", "gridpoint")

    @property
    def kind(self) -> str:
        return "gridpoint" if self.mean.ndim == 3 else "channel"

    @classmethod
    def fit(cls, frames: np.ndarray, kind: str = "channel") -> Normalisation:
        """Statistics over ``frames`` of shape ``(N, C, H, W)`` (float64 accumulation)."""
        if kind not in cls.KINDS:
            raise ValueError(f"normalisation: expected one of {list(cls.KINDS)}, got {kind!r}")
        C = frames.shape[1]
        if kind == "gridpoint":
            mean = np.stack([frames[:, c].mean(axis=0, dtype=np.float64) for c in range(C)])
        else:
            mean = frames.mean(axis=(0, 2, 3), dtype=np.float64)
        var = np.zeros(C)
        for c in range(C):
            m = mean[c] if kind == "gridpoint" else mean[c, None, None]
            var[c] = np.mean((frames[:, c].astype(np.float64) - m) ** 2)
        std = np.sqrt(np.maximum(var, 1e-30))
        return cls(mean.astype(np.float64), std.astype(np.float64))

    def _mean(self) -> np.ndarray:
        return self.mean if self.mean.ndim == 3 else self.mean.reshape(-1, 1, 1)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self._mean()) / self.std.reshape(-1, 1, 1)).astype(np.float32)

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        return (x * self.std.reshape(-1, 1, 1) + self._mean()).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Card entry; a ``gridpoint`` mean field travels as the tensor ``normalisation.mean`` in the
        weights file (:meth:`tensors`), the card keeps its per-channel average for reference."""
        per_channel = self.mean.reshape(len(self.std), -1).mean(axis=1)
        d: dict[str, Any] = {"kind": self.kind, "mean": per_channel.tolist(), "std": self.std.tolist()}
        if self.kind == "gridpoint":
            d["mean_field"] = "normalisation.mean"
        return d

    def tensors(self) -> dict[str, np.ndarray]:
        """Arrays stored beside the weights (the ``gridpoint`` mean field), keyed by tensor name."""
        return {"normalisation.mean": self.mean.astype(np.float32)} if self.kind == "gridpoint" else {}

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensors: dict[str, Any] | None = None) -> Normalisation:
        std = np.asarray(d["std"], dtype=np.float64)
        if d.get("kind", "channel") == "gridpoint":
            name = d.get("mean_field", "normalisation.mean")
            if not tensors or name not in tensors:
                raise ValueError(f"normalisation: kind 'gridpoint' needs the tensor {name!r} beside the weights")
            return cls(np.asarray(tensors[name], dtype=np.float64), std)
        return cls(np.asarray(d["mean"], dtype=np.float64), std)


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
                 norm: Normalisation | None = None, normalisation: str = "channel") -> Splits:
    """Load the splits by calendar year from one or more data folders; statistics from training only
    (or ``norm``, e.g. a prior's own when fine-tuning it).

    A gap between folders (different seeds) is never bridged by a window because the time
    step there differs from the median step.
    """
    train_raw, train_t, channels, ds0 = _load_split(paths, train_years, None, variables)
    if norm is None:
        norm = Normalisation.fit(train_raw, normalisation)
    elif norm.std.shape != (train_raw.shape[1],) or norm.mean.shape not in ((train_raw.shape[1],), train_raw.shape[1:]):
        raise ValueError(f"normalisation of shape {norm.mean.shape} does not fit the data's (C, H, W) = "
                         f"{train_raw.shape[1:]}")
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
    for i in range(0, len(frames), 256):
        out[i:i + 256] = norm.normalise(frames[i:i + 256])
    return out
