"""The "run the physics model at lower resolution" baseline: SPEEDY (jcm) at T21.

The T31 truth state is remapped conservatively to the T21 Gaussian grid (64 x 32) and projected
onto T21 spherical harmonics by jcm (so the initial state is the truncated truth), integrated with
the same SST forcing as the truth run (the data's own generator options), and the 6-hourly output
is mapped back to the T31 grid bilinearly for scoring. jcm is imported lazily (``[speedy]`` extra).
"""

from __future__ import annotations

import datetime as dt
import json
from importlib import resources
from typing import Any

import numpy as np

from wind_bmi.regrid import LatLonGrid, Regridder
from wind_bmi.variables import VARIABLES

PROGNOSTIC = ("u_wind", "v_wind", "temperature", "specific_humidity", "surface_pressure")


def forcing_options(attrs: dict[str, Any]) -> tuple[float, bool] | None:
    """``(sst_offset, sst_anomaly)`` of the run that made a dataset, or ``None`` if it is not SPEEDY data."""
    cfg = attrs.get("generator_config")
    if not cfg:
        return None
    d = json.loads(cfg)
    return float(d.get("sst_offset", 0.0)), bool(d.get("sst_anomaly", False))


class T21Forecaster:
    """SPEEDY at T21 started from a T31 state.

    Args:
        lat, lon: the T31 grid (latitude ascending) of the states given and returned.
        sst_offset, sst_anomaly: SST forcing options of the truth run.
    """

    def __init__(self, lat: np.ndarray, lon: np.ndarray, sst_offset: float = 0.0, sst_anomaly: bool = False,
                 truncation: int = 21) -> None:
        from jcm.physics.speedy.speedy_coords import get_speedy_coords
        from jcm.terrain import TerrainData

        self.coords = get_speedy_coords(spectral_truncation=truncation)
        bc = resources.files("jcm.data.bc.t30.clim")
        self.terrain = TerrainData.from_file(bc / "terrain.nc", coords=self.coords)
        lat21 = np.degrees(np.asarray(self.coords.horizontal.latitudes, dtype=np.float64))
        lon21 = np.degrees(np.asarray(self.coords.horizontal.longitudes, dtype=np.float64))
        fine, coarse = LatLonGrid(lat, lon), LatLonGrid(lat21, lon21)
        self.down = Regridder.build(fine, coarse, "conservative")
        self.up = Regridder.build(coarse, fine, "bilinear")
        self.sst_offset, self.sst_anomaly = sst_offset, sst_anomaly
        self._forcing: dict[int, Any] = {}

    def _forcing_for(self, year: int) -> Any:
        from jcm.forcing import ForcingData

        from wind_bmi.data.speedy import sst_forcing_dataset

        if year not in self._forcing:
            ds = sst_forcing_dataset(year, self.sst_offset, self.sst_anomaly)
            self._forcing[year] = ForcingData.from_dataset(ds, coords=self.coords, align_mode="wrap_year")
        return self._forcing[year]

    def forecast(self, state: dict[str, np.ndarray], start: dt.datetime, hours: int) -> dict[str, np.ndarray]:
        """6-hourly forecast of ``hours`` from ``state`` (``(level, lat, lon)`` surface-first, or ``(lat, lon)``).

        Returns ``variable -> (hours / 6, [level,] lat, lon)`` on the T31 grid, physical units.
        """
        import jax.numpy as jnp
        from jcm.model import Model
        from jcm.physics_interface import PhysicsState

        if hours % 6:
            raise ValueError(f"hours must be a multiple of 6, got {hours}")
        missing = [v for v in PROGNOSTIC if v not in state]
        if missing:
            raise ValueError(f"the T21 baseline needs {missing} in the initial state")

        def to_jcm(v: str) -> Any:
            a = self.down(np.asarray(state[v], dtype=np.float64))  # conservative T31 -> T21 grid
            return jnp.asarray(np.swapaxes(a[::-1], -1, -2) if a.ndim == 3 else a.T)  # top-first, (lon, lat)

        ps = PhysicsState(to_jcm("u_wind"), to_jcm("v_wind"), to_jcm("temperature"), to_jcm("specific_humidity"),
                          jnp.zeros_like(to_jcm("temperature")), to_jcm("surface_pressure") / 1e5, {})
        model = Model(coords=self.coords, terrain=self.terrain, start_time=start.isoformat())
        pred = model.run(initial_state=ps, forcing=self._forcing_for(start.year), save_interval=0.25,
                         total_time=hours / 24.0)
        raw = pred.to_xarray()
        out = {}
        for v in (*PROGNOSTIC, "precipitation"):
            var = VARIABLES[v]
            da = raw[var.jcm]
            dims = ("time", "level", "lat", "lon") if var.levels else ("time", "lat", "lon")
            da = da.transpose(*dims).sortby("lat")
            out[v] = self.up(da.values.astype(np.float64) * var.scale)
        return out
