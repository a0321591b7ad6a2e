"""Writers and readers of the component's files: the CF netCDF ensemble output and restart arrays.

Both write a temporary file and rename it, so a reader never meets a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from wind_bmi.variables import VARIABLES


def write_ensemble(path: str | Path, hours: Sequence[float], means: Sequence[np.ndarray], spreads: Sequence[np.ndarray],
                   members: Sequence[np.ndarray], channels: dict[str, list[int]], lat: np.ndarray, lon: np.ndarray,
                   levels: Sequence[float], level_bounds: Any, start: Any, calendar: str,
                   attrs: dict[str, Any]) -> None:
    """Write ensemble frames as CF-1.8 netCDF (checked with cfchecker in the tests).

    Per variable (``channels``: variable -> channel indices of the ``(C, H, W)`` frames): the ensemble
    mean (``cell_methods: realization: mean``), its spread (standard deviation, ddof 1) linked as an
    ancillary variable, and with ``members`` (frames ``(M, C, H, W)``) every member on a ``member``
    dimension (``standard_name: realization``). Sigma levels carry their parametric definition
    (``p = ptop + sigma (ps - ptop)``, ``ptop`` = 0), latitude, longitude and sigma their cell bounds;
    coordinates have no fill value; time is ``hours since start`` in ``calendar``.
    """
    from wind_bmi.regrid import LatLonGrid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time = np.asarray(hours, dtype=np.float64)
    mean, spread = np.stack(means), np.stack(spreads)
    grid = LatLonGrid(lat, lon)
    lat_e, lon_e = grid.lat_edges(), grid.lon_edges()
    coords: dict[str, Any] = {
        "time": ("time", time, {"standard_name": "time", "axis": "T",
                                 "units": f"hours since {start.strftime('%Y-%m-%d %H:%M:%S')}",
                                 "calendar": calendar}),
        "level": ("level", np.array(levels, dtype=np.float64),
                  {"standard_name": "atmosphere_sigma_coordinate", "long_name": "sigma at layer midpoints",
                   "units": "1", "axis": "Z", "positive": "down", "bounds": "level_bnds",
                   "formula_terms": "sigma: level ps: surface_pressure ptop: ptop"}),
        "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north", "axis": "Y",
                             "bounds": "lat_bnds"}),
        "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east", "axis": "X",
                             "bounds": "lon_bnds"}),
    }
    data: dict[str, Any] = {
        "lat_bnds": (("lat", "nv"), np.stack([lat_e[:-1], lat_e[1:]], axis=1)),
        "lon_bnds": (("lon", "nv"), np.stack([lon_e[:-1], lon_e[1:]], axis=1)),
        "ptop": ((), 0.0, {"long_name": "pressure at the model top", "units": "Pa"}),
    }
    bounds = level_bounds
    if bounds:
        data["level_bnds"] = (("level", "nv"), np.array(bounds, dtype=np.float64))
    else:
        coords["level"][2].pop("bounds")
    if members:
        member_frames = np.stack(members)  # (time, member, C, H, W)
        coords["member"] = ("member", np.arange(member_frames.shape[1], dtype=np.int32),
                            {"standard_name": "realization", "long_name": "ensemble member", "units": "1"})
    for var, chans in channels.items():
        info = VARIABLES[var]
        three_d = len(chans) > 1
        dims: tuple[str, ...] = ("time", "level", "lat", "lon") if three_d else ("time", "lat", "lon")
        sel: Any = chans if three_d else chans[0]
        base = {"units": info.units, "standard_name": info.standard_name}
        data[var] = (dims, mean[:, sel], {**base, "long_name": f"ensemble mean {info.long_name}",
                                        "cell_methods": "realization: mean",
                                        "ancillary_variables": f"{var}_spread"})
        data[f"{var}_spread"] = (dims, spread[:, sel], {**base, "long_name": f"ensemble spread of {info.long_name}",
                                                      "cell_methods": "realization: standard_deviation"})
        if members:
            mdims = ("time", "member", *dims[1:])
            mem = member_frames[:, :, sel]
            data[f"{var}_members"] = (mdims, mem, {**base, "long_name": f"ensemble members: {info.long_name}"})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"Conventions": "CF-1.8", "title": "WIND ensemble (wind-bmi WindBmi)", **attrs})
    enc: dict[str, dict[str, Any]] = {name: {"_FillValue": None} for name in
                                      [*coords, "lat_bnds", "lon_bnds", "ptop", *(["level_bnds"] if bounds else [])]}
    enc["time"].update({"dtype": "float64"})
    tmp = path.with_name(path.name + ".tmp")
    ds.to_netcdf(tmp, encoding=enc)
    os.replace(tmp, path)


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """Arrays and string metadata as one safetensors file (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    np_save_file(arrays, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates its files owner-only
    os.replace(tmp, path)


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of a file written by :func:`save_arrays`; ``ValueError`` naming the file
    when it is missing or not such a file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        arrays = np_load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a restart file ({exc})") from exc
    return arrays, meta
