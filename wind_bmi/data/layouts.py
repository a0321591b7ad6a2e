"""Recognise and canonicalise the dataset layouts the project reads.

Three layouts are recognised:

* ``wind`` -- the project's own SPEEDY-world files (``u_wind``, ``temperature``... on sigma ``level``);
* ``era5-cds`` -- CDS/cfgrib short names (``t, z, u, v, q, sp, msl, t2m, u10, v10, tp``) on
  ``isobaricInhPa`` or ``pressure_level``, ``latitude`` often north-first, optional ensemble ``number``;
* ``era5-wb2`` -- WeatherBench2 long names (``temperature``, ``geopotential``, ...) on ``level``,
  any dimension order.

:func:`canonicalise` returns a dataset with dims ``(time, level, lat, lon)`` / ``(time, lat, lon)``,
latitude ascending, longitudes in [0, 360), project variable names where a project name exists
(ERA5 names with no SPEEDY counterpart keep a descriptive name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from wind_bmi.variables import VARIABLES


class LayoutError(ValueError):
    """A file or folder is not in any layout the project recognises."""


# ERA5 name -> canonical name, for CDS short names and WeatherBench2 long names.
CDS_NAMES = {
    "t": "temperature", "z": "geopotential", "u": "u_wind", "v": "v_wind", "q": "specific_humidity",
    "sp": "surface_pressure", "msl": "mean_sea_level_pressure", "t2m": "2m_temperature",
    "u10": "10m_u_wind", "v10": "10m_v_wind", "tp": "total_precipitation",
}
WB2_NAMES = {
    "temperature": "temperature", "geopotential": "geopotential", "u_component_of_wind": "u_wind",
    "v_component_of_wind": "v_wind", "specific_humidity": "specific_humidity",
    "surface_pressure": "surface_pressure", "mean_sea_level_pressure": "mean_sea_level_pressure",
    "2m_temperature": "2m_temperature", "10m_u_component_of_wind": "10m_u_wind",
    "10m_v_component_of_wind": "10m_v_wind", "total_precipitation_6hr": "total_precipitation",
    "total_precipitation": "total_precipitation",
}
LEVEL_DIMS = ("level", "isobaricInhPa", "pressure_level", "plev")
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "longitude")
TIME_NAMES = ("time", "valid_time")


def _first(ds: xr.Dataset, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in ds.dims or n in ds.coords), None)


def detect_layout(ds: xr.Dataset) -> str:
    """Return ``wind``, ``era5-cds`` or ``era5-wb2``; raise :class:`LayoutError` saying what is missing."""
    missing = [kind for kind, names in (("time", TIME_NAMES), ("latitude", LAT_NAMES), ("longitude", LON_NAMES))
               if _first(ds, names) is None]
    if missing:
        raise LayoutError(f"no {', '.join(missing)} coordinate (looked for {TIME_NAMES}, {LAT_NAMES}, {LON_NAMES})")
    names = set(ds.data_vars)
    if names & set(VARIABLES) and "level" in ds.dims and "lat" in ds.dims:
        return "wind"
    if names & set(CDS_NAMES):
        return "era5-cds"
    if names & set(WB2_NAMES):
        return "era5-wb2"
    raise LayoutError(
        f"no recognised variables among {sorted(map(str, names))}; expected project names {sorted(VARIABLES)}, "
        f"CDS short names {sorted(CDS_NAMES)} or WeatherBench2 names {sorted(WB2_NAMES)}"
    )


def canonicalise(ds: xr.Dataset) -> xr.Dataset:
    """Rename and reorder any recognised layout to the project's ``(time, level, lat, lon)`` form."""
    layout = detect_layout(ds)
    if layout == "wind":
        out = ds
    else:
        table = CDS_NAMES if layout == "era5-cds" else WB2_NAMES
        rename: dict[str, Any] = {k: v for k, v in table.items() if k in ds.data_vars}
        for group, target in ((LAT_NAMES, "lat"), (LON_NAMES, "lon"), (TIME_NAMES, "time"), (LEVEL_DIMS, "level")):
            name = _first(ds, group)
            if name is not None and name != target:
                rename[name] = target
        out = ds.rename(rename)[sorted(set(rename.values()) & set(table.values()) | set())]
        if "number" in out.dims:  # ensemble dimension: keep member 0 (control) for a deterministic dataset
            out = out.isel(number=0)
        if "level" in out.coords:
            out["level"].attrs.setdefault("units", "hPa")
    if "time" in out.coords and "time" not in out.dims:  # one time as a scalar coordinate (a WB2 snapshot)
        out = out.expand_dims("time")
    out = out.sortby("lat")
    lon = out["lon"].values
    if np.any(lon < 0):
        out = out.assign_coords(lon=np.mod(lon, 360.0)).sortby("lon")
    order_3d = ("time", "level", "lat", "lon")
    for var in list(out.data_vars):
        dims = out[var].dims
        if set(dims) == set(order_3d):
            out[var] = out[var].transpose(*order_3d)
        elif set(dims) == {"time", "lat", "lon"}:
            out[var] = out[var].transpose("time", "lat", "lon")
    out.attrs["wind_layout"] = layout
    return out


def data_files(path: str | Path) -> list[Path]:
    """The netCDF files of a file or folder, sorted; error when there are none."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.nc") if not f.name.startswith("."))
        if files:
            return files
        raise LayoutError(f"{p}: folder holds no .nc files")
    raise LayoutError(f"{p}: no such file or folder")


def _coder() -> Any:
    return xr.coders.CFDatetimeCoder(use_cftime=True)


def open_any(path: str | Path) -> xr.Dataset:
    """Open a file or folder of netCDF files in any recognised layout, canonicalised."""
    files = data_files(path)
    try:
        if len(files) == 1:
            raw = xr.open_dataset(files[0], decode_times=_coder())
        else:
            raw = xr.open_mfdataset(files, combine="by_coords", data_vars="minimal", coords="minimal",
                                    compat="override", decode_times=_coder())
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path}: cannot be read as netCDF: {exc}") from exc
    try:
        return canonicalise(raw)
    except LayoutError as exc:
        raise LayoutError(f"{path}: {exc}") from exc


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Summarise what the project recognises in ``path``: layout, variables, levels, grid, time span."""
    ds = open_any(path)
    times = ds["time"].values
    steps = sorted({float((b - a).total_seconds() / 3600.0) for a, b in zip(times[:-1], times[1:], strict=False)})
    variables = {}
    for name in ds.data_vars:
        da = ds[name]
        if "time" not in da.dims:
            continue
        variables[name] = {"dims": list(da.dims), "units": str(da.attrs.get("units", "?"))}
    return {
        "path": str(path),
        "layout": ds.attrs["wind_layout"],
        "variables": variables,
        "levels": [float(v) for v in ds["level"].values] if "level" in ds.coords else [],
        "grid": {"nlat": int(ds.sizes["lat"]), "nlon": int(ds.sizes["lon"]),
                 "lat_range": [float(ds["lat"].min()), float(ds["lat"].max())],
                 "lon_range": [float(ds["lon"].min()), float(ds["lon"].max())]},
        "time": {"first": str(times[0]), "last": str(times[-1]), "count": len(times), "steps_hours": steps},
    }
