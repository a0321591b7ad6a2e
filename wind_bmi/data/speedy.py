"""The SPEEDY world: run jcm (SPEEDY physics, T31, 8 sigma levels) offline and write CF netCDF.

One file per calendar month (``speedy_YYYY-MM.nc``), written to a temporary name and
renamed, with the GCM state checkpointed beside it after each month so that a re-run
skips finished months and continues the same trajectory. Memory stays bounded by one
month of frames (the 7 kept fields only).

jcm is imported inside the functions (optional ``[speedy]`` extra).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from wind_bmi.config import GenerateConfig, to_dict
from wind_bmi.variables import VARIABLES

STATE_FILE = ".jcm_state.msgpack"
PROGRESS_FILE = ".progress.json"
CALENDAR = "proleptic_gregorian"
TIME_UNITS = "hours since 1900-01-01 00:00:00"


def _require_jcm() -> Any:
    try:
        import jcm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "SPEEDY data generation needs jcm: pip install 'wind-bmi[speedy]' (jcm==3.0.0)"
        ) from exc
    return jcm


def month_spans(start: dt.date, days: int) -> list[tuple[dt.date, dt.date]]:
    """Split ``[start, start + days)`` into calendar-month pieces ``(first_day, end_exclusive)``."""
    end = start + dt.timedelta(days=days)
    spans = []
    cur = start
    while cur < end:
        nxt = dt.date(cur.year + (cur.month == 12), cur.month % 12 + 1, 1)
        spans.append((cur, min(nxt, end)))
        cur = nxt
    return spans


def sst_forcing_dataset(year: int, sst_offset: float, sst_anomaly: bool) -> xr.Dataset:
    """The packaged monthly climatology with optional +offset and the year's SST anomalies.

    The anomaly file (``bc/t30/anom``, monthly 1979-2013, latitude north-first) is aligned
    to the climatology's latitude order and added month by month for ``year``.
    """
    bc = resources.files("jcm.data.bc.t30")
    ds = xr.open_dataset(str(bc / "clim" / "forcing.nc")).load()
    sst = ds["sst"].copy()
    if sst_anomaly:
        anom = xr.open_dataset(str(bc / "anom" / "sea_surface_temperature_anomaly.nc"))["ssta"].load()
        years = anom["time"].dt.year.values
        if year not in set(years.tolist()):
            raise ValueError(
                f"--sst-anomaly: the packaged anomalies cover {years.min()}-{years.max()}, "
                f"not the simulated year {year}"
            )
        year_anom = anom.sel(time=anom["time"].dt.year == year).sortby("lat")  # (12, lat, lon)
        values = np.nan_to_num(year_anom.transpose("lon", "lat", "time").values, nan=0.0)
        sst = sst + xr.DataArray(values, dims=("lon", "lat", "time"))
    if sst_offset:
        sst = sst + sst_offset
    ds["sst"] = sst.astype(np.float32)
    return ds


class SpeedyGenerator:
    """Runs SPEEDY at T31 with the packaged terrain and forcing, writing monthly CF files.

    Args:
        cfg: generator options (start, days, spin-up, seed, SST options).
        out: output folder (created).
        progress: optional callback ``progress(days_done, days_total)``.
    """

    def __init__(self, cfg: GenerateConfig, out: str | Path,
                 progress: Callable[[int, int], None] | None = None) -> None:
        if cfg.days <= 0:
            raise ValueError(f"days must be positive, got {cfg.days}")
        if cfg.spinup_days < 0:
            raise ValueError(f"spinup_days must be >= 0, got {cfg.spinup_days}")
        if 24 % cfg.save_hours:
            raise ValueError(f"save_hours must divide 24, got {cfg.save_hours}")
        try:
            self.start = dt.date.fromisoformat(cfg.start)
        except ValueError as exc:
            raise ValueError(f"start must be an ISO date YYYY-MM-DD, got {cfg.start!r}") from exc
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self._forcing_year: int | None = None
        self._forcing: Any = None

    # -- jcm plumbing -------------------------------------------------------------
    def _build(self) -> None:
        jcm = _require_jcm()
        from jcm.forcing import ForcingData
        from jcm.model import Model
        from jcm.physics.speedy.speedy_coords import compute_sigma_boundaries, get_speedy_coords
        from jcm.terrain import TerrainData

        self.jcm_version = jcm.__version__
        self.coords = get_speedy_coords()
        self.sigma_bounds = np.asarray(compute_sigma_boundaries(8), dtype=np.float64)
        bc = resources.files("jcm.data.bc.t30.clim")
        self.terrain_ds = xr.open_dataset(str(bc / "terrain.nc")).load()
        terrain = TerrainData.from_file(bc / "terrain.nc", coords=self.coords)
        spin_start = self.start - dt.timedelta(days=self.cfg.spinup_days)
        self.model = Model(coords=self.coords, terrain=terrain, start_time=spin_start.isoformat())
        self._ForcingData = ForcingData

    def _forcing_for(self, year: int) -> Any:
        if self._forcing_year != year:
            ds = sst_forcing_dataset(year, self.cfg.sst_offset, self.cfg.sst_anomaly)
            self._forcing = self._ForcingData.from_dataset(ds, coords=self.coords, align_mode="wrap_year")
            self._forcing_year = year
        return self._forcing

    # -- bookkeeping --------------------------------------------------------------
    def _progress_path(self) -> Path:
        return self.out / PROGRESS_FILE

    def _read_progress(self) -> dict[str, Any]:
        p = self._progress_path()
        if not p.exists():
            return {}
        done = json.loads(p.read_text())
        if done.get("config") != to_dict(self.cfg):
            raise ValueError(
                f"{self.out} holds a run with other options ({p}: {done.get('config')}); "
                "use another --out folder or delete it"
            )
        return dict(done)

    def _write_progress(self, months_done: list[str]) -> None:
        tmp = self._progress_path().with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": to_dict(self.cfg), "months": months_done}, indent=1))
        os.replace(tmp, self._progress_path())

    @staticmethod
    def file_name(first: dt.date) -> str:
        return f"speedy_{first.year:04d}-{first.month:02d}.nc"

    # -- main loop ----------------------------------------------------------------
    def run(self, max_months: int | None = None) -> list[Path]:
        """Generate (or finish generating) all months; returns the written files in order.

        ``max_months`` stops after that many newly written months (a chunked job); the next
        call with the same options continues from the checkpointed GCM state.
        """
        from jcm.checkpoint import load_checkpoint, save_checkpoint

        self.out.mkdir(parents=True, exist_ok=True)
        done = self._read_progress().get("months", [])
        spans = month_spans(self.start, self.cfg.days)
        self._build()
        save_days = self.cfg.save_hours / 24.0
        state_path = self.out / STATE_FILE
        if done:
            # Resume: bootstrap the model, then restore the saved GCM state and clock.
            self.model.run(initial_state=self.model.initial_state(random_seed=self.cfg.seed),
                           forcing=self._forcing_for(self.start.year), save_interval=save_days,
                           total_time=save_days)
            load_checkpoint(self.model, state_path)
        else:
            init = self.model.initial_state(random_seed=self.cfg.seed)
            if self.cfg.spinup_days:
                spin_year = (self.start - dt.timedelta(days=self.cfg.spinup_days)).year
                self.model.run(initial_state=init, forcing=self._forcing_for(spin_year),
                               save_interval=float(self.cfg.spinup_days),
                               total_time=float(self.cfg.spinup_days))
            else:
                self.model.bootstrap_state(init)
        files = []
        days_done = sum((b - a).days for a, b in spans if self.file_name(a) in done)
        total = self.cfg.days
        for first, end in spans:
            name = self.file_name(first)
            path = self.out / name
            if name in done and path.exists():
                files.append(path)
                continue
            ndays = (end - first).days
            t0 = time.perf_counter()
            pred = self.model.resume(forcing=self._forcing_for(first.year),
                                     save_interval=save_days, total_time=float(ndays))
            ds = self._to_dataset(pred.to_xarray())
            ds.attrs["wall_seconds"] = round(time.perf_counter() - t0, 2)
            tmp = path.with_suffix(".nc.tmp")
            ds.to_netcdf(tmp, encoding=self._encoding(ds))
            os.replace(tmp, path)
            save_checkpoint(self.model, state_path)
            done.append(name)
            self._write_progress(done)
            files.append(path)
            days_done += ndays
            if self.progress:
                self.progress(days_done, total)
            if max_months is not None:
                max_months -= 1
                if max_months <= 0:
                    break
        return files

    def _to_dataset(self, raw: xr.Dataset) -> xr.Dataset:
        """Keep the project's variables, in project units and (time, level, lat, lon) order."""
        out = xr.Dataset()
        times = raw["time"].values.astype("datetime64[s]").astype(dt.datetime)
        for var in VARIABLES.values():
            da = raw[var.jcm]
            dims = ("time", "level", "lat", "lon") if var.levels else ("time", "lat", "lon")
            da = da.transpose(*dims)
            values = da.values.astype(np.float32) * np.float32(var.scale)
            out[var.name] = xr.DataArray(values, dims=dims, attrs={
                "units": var.units, "long_name": var.long_name,
                "standard_name": var.standard_name, "csdms_name": var.csdms,
            })
        lat = raw["lat"].values.astype(np.float64)
        order = np.argsort(lat)
        out = out.isel(lat=order)
        out = out.assign_coords(
            time=("time", np.asarray(times)),
            level=("level", raw["level"].values.astype(np.float64), {
                "units": "1", "long_name": "sigma at full level", "positive": "down",
                "standard_name": "atmosphere_sigma_coordinate", "bounds": "level_bounds"}),
            lat=("lat", lat[order], {"units": "degrees_north", "standard_name": "latitude",
                                     "long_name": "Gaussian latitude"}),
            lon=("lon", raw["lon"].values.astype(np.float64), {"units": "degrees_east",
                                                               "standard_name": "longitude"}),
        )
        # sigma half levels, surface first to match the level order (0.95 ... 0.025)
        half = self.sigma_bounds[::-1]
        out["level_bounds"] = xr.DataArray(np.stack([half[:-1], half[1:]], axis=1), dims=("level", "nv"))
        terr = self.terrain_ds.transpose("lat", "lon").sortby("lat")
        out["land_sea_mask"] = xr.DataArray(terr["lsm"].values.astype(np.float32), dims=("lat", "lon"),
                                            attrs={"units": "1", "long_name": "land-sea mask"})
        out["orography"] = xr.DataArray(terr["orog"].values.astype(np.float32), dims=("lat", "lon"),
                                        attrs={"units": "m", "long_name": "surface height"})
        out["time"].attrs.update({"standard_name": "time", "long_name": "time (end of interval)"})
        out.attrs.update({
            "Conventions": "CF-1.11",
            "title": "SPEEDY world (jcm T31) for wind-bmi",
            "source": f"jcm {self.jcm_version} SPEEDY physics, T31, 96x48 Gaussian grid, 8 sigma levels",
            "jcm_version": self.jcm_version,
            "seed": self.cfg.seed,
            "spinup_days": self.cfg.spinup_days,
            "sst_offset_K": self.cfg.sst_offset,
            "sst_anomaly": int(self.cfg.sst_anomaly),
            "generator_config": json.dumps(to_dict(self.cfg)),
            "grid": "gaussian_t31",
        })
        return out

    @staticmethod
    def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
        enc: dict[str, dict[str, Any]] = {"time": {"units": TIME_UNITS, "calendar": CALENDAR, "dtype": "float64"}}
        for name in VARIABLES:
            enc[name] = {"zlib": True, "complevel": 1}
        return enc


def generate(cfg: GenerateConfig, out: str | Path, progress: Callable[[int, int], None] | None = None,
             max_months: int | None = None) -> list[Path]:
    """Generate the SPEEDY-world dataset described by ``cfg`` into ``out`` (resumable)."""
    return SpeedyGenerator(cfg, out, progress).run(max_months)


def write_subset(src: str | Path, out: str | Path, start: str, days: int, drop: tuple[str, ...] = ()) -> Path:
    """Copy ``days`` days from ``start`` of a dataset into one compressed file (temp file, then rename)."""
    import cftime

    from wind_bmi.data.layouts import open_any

    ds = open_any(src)
    t0 = dt.datetime.fromisoformat(start)
    times = ds["time"].values
    cal = getattr(times[0], "calendar", "proleptic_gregorian")
    lo = cftime.datetime(t0.year, t0.month, t0.day, calendar=cal)
    hi = lo + dt.timedelta(days=days)
    keep = [i for i, t in enumerate(times) if lo < t <= hi]
    if not keep:
        raise ValueError(f"{src}: no frames between {lo} and {hi}")
    sub = ds.isel(time=keep).drop_vars([v for v in drop if v in ds]).load()
    for name in ("land_sea_mask", "orography", "level_bounds"):
        if name in sub and "time" in sub[name].dims:
            sub[name] = sub[name].isel(time=0, drop=True)
    sub.attrs.pop("wind_layout", None)
    sub.attrs["subset_of"] = f"{Path(src).name} {start} +{days} d"
    enc: dict[str, dict[str, Any]] = {"time": {"units": TIME_UNITS, "calendar": cal, "dtype": "float64"}}
    for var_name in sub.data_vars:
        enc[str(var_name)] = {"zlib": True, "complevel": 9, "shuffle": True}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sub.to_netcdf(tmp, encoding=enc)
    os.replace(tmp, out)
    return out
