"""WIND coupled to a host model on another grid: a slab-ocean BMI component and the two-way coupler.

The host is a mixed-layer ("slab") ocean on a 5-degree grid, latitudes north to south, longitudes
-180..180, time in days, 6-hourly steps. Its SST relaxes towards the near-surface air temperature
it receives from WIND (bulk heat flux ``lambda (T_air - SST)``), and it reports the air temperature
its SST implies over open ocean (``SST - 1 K``; NaN poleward of 70 degrees, under sea ice), which
WIND assimilates on the host grid through the regridding weights (``y = W x``).

    python examples/slab_ocean.py [WIND_CONFIG.yaml] [--days 4] [--out DIR]

Run through :class:`wind_bmi.coupling.coupler.Coupler`: BMI on both sides, units and time units
converted (WIND counts hours, the ocean days), conservative remapping WIND -> ocean.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from bmipy import Bmi
from numpy.typing import NDArray
from wind_bmi.coupling.coupler import Coupler, Exchange

from wind_bmi import WindBmi

RHO_CP_H = 1025.0 * 3990.0 * 50.0  # J m-2 K-1: a 50 m mixed layer
LAMBDA = 20.0  # W m-2 K-1 bulk exchange coefficient
AIR_SEA_OFFSET = 1.0  # K: air is this much colder than the sea surface
ICE_LATITUDE = 70.0

SST = "sea_surface_water__temperature"
AIR_OUT = "sea_surface_air__temperature"
AIR_IN = "atmosphere_bottom_air__temperature"


class SlabOceanBmi(Bmi):
    """A 5-degree slab ocean as a BMI 2.0 component (grid 0: rank 2, rectilinear, lat north to south)."""

    def initialize(self, config_file: str | None = None) -> None:
        cfg: dict[str, Any] = yaml.safe_load(Path(config_file).read_text()) if config_file else {}
        res = float(cfg.get("resolution_deg", 5.0))
        self.lat = 90.0 - res * (np.arange(round(180 / res)) + 0.5)
        self.lon = -180.0 + res * (np.arange(round(360 / res)) + 0.5)
        self.dt_days = float(cfg.get("time_step_days", 0.25))
        self.time = 0.0
        self.sst = (300.0 - 30.0 * np.sin(np.deg2rad(self.lat)) ** 2)[:, None] * np.ones((1, self.lon.size))
        self.air = self.sst - AIR_SEA_OFFSET
        self.ice = np.abs(self.lat)[:, None] * np.ones((1, self.lon.size)) > ICE_LATITUDE

    def update(self) -> None:
        flux = LAMBDA * (self.air - self.sst)  # W m-2 into the ocean
        self.sst = self.sst + flux * self.dt_days * 86400.0 / RHO_CP_H
        self.time += self.dt_days

    def update_until(self, time: float) -> None:
        while self.time < time - 1e-9:
            self.update()

    def finalize(self) -> None:
        pass

    def get_component_name(self) -> str:
        return "slab ocean (example host model)"

    def get_input_item_count(self) -> int:
        return 1

    def get_output_item_count(self) -> int:
        return 2

    def get_input_var_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (AIR_IN,)

    def get_output_var_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (SST, AIR_OUT)

    def _field(self, name: str) -> NDArray[np.float64]:
        if name == SST:
            return self.sst
        if name == AIR_OUT:
            return np.where(self.ice, np.nan, self.sst - AIR_SEA_OFFSET)
        if name == AIR_IN:
            return self.air
        raise KeyError(f"slab ocean has no variable {name!r}")

    def get_var_grid(self, name: str) -> int:
        self._field(name)
        return 0

    def get_var_type(self, name: str) -> str:
        return "float64"

    def get_var_units(self, name: str) -> str:
        self._field(name)
        return "K"

    def get_var_itemsize(self, name: str) -> int:
        return 8

    def get_var_nbytes(self, name: str) -> int:
        return 8 * self.sst.size

    def get_var_location(self, name: str) -> str:
        return "node"

    def get_current_time(self) -> float:
        return self.time

    def get_start_time(self) -> float:
        return 0.0

    def get_end_time(self) -> float:
        return float("inf")

    def get_time_units(self) -> str:
        return "d"

    def get_time_step(self) -> float:
        return self.dt_days

    def get_value(self, name: str, dest: NDArray[Any]) -> NDArray[Any]:
        dest[:] = self._field(name).reshape(-1)
        return dest

    def get_value_ptr(self, name: str) -> NDArray[Any]:
        return self._field(name).reshape(-1)

    def get_value_at_indices(self, name: str, dest: NDArray[Any], inds: NDArray[np.int_]) -> NDArray[Any]:
        dest[:] = self._field(name).reshape(-1)[inds]
        return dest

    def set_value(self, name: str, src: NDArray[Any]) -> None:
        if name != AIR_IN:
            raise KeyError(f"slab ocean input is {AIR_IN!r}, got {name!r}")
        values = np.asarray(src, dtype=np.float64).reshape(self.sst.shape)
        if not np.isfinite(values).all():
            raise ValueError(f"{AIR_IN}: a finite air temperature is needed at every cell")
        self.air = values.copy()

    def set_value_at_indices(self, name: str, inds: NDArray[np.int_], src: NDArray[Any]) -> None:
        flat = self.air.reshape(-1).copy()
        flat[inds] = src
        self.set_value(name, flat)

    def get_grid_rank(self, grid: int) -> int:
        return 2

    def get_grid_size(self, grid: int) -> int:
        return self.sst.size

    def get_grid_type(self, grid: int) -> str:
        return "rectilinear"

    def get_grid_shape(self, grid: int, shape: NDArray[np.int_]) -> NDArray[np.int_]:
        shape[:] = self.sst.shape
        return shape

    def get_grid_x(self, grid: int, x: NDArray[np.float64]) -> NDArray[np.float64]:
        x[:] = self.lon
        return x

    def get_grid_y(self, grid: int, y: NDArray[np.float64]) -> NDArray[np.float64]:
        y[:] = self.lat
        return y

    def get_grid_z(self, grid: int, z: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError("the slab ocean grid is 2-D")

    def get_grid_spacing(self, grid: int, spacing: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError("rectilinear grid: use get_grid_x/y")

    def get_grid_origin(self, grid: int, origin: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError("rectilinear grid: use get_grid_x/y")

    def get_grid_node_count(self, grid: int) -> int:
        return self.sst.size

    def get_grid_edge_count(self, grid: int) -> int:
        raise NotImplementedError

    def get_grid_face_count(self, grid: int) -> int:
        raise NotImplementedError

    def get_grid_edge_nodes(self, grid: int, edge_nodes: NDArray[np.int_]) -> NDArray[np.int_]:
        raise NotImplementedError

    def get_grid_face_edges(self, grid: int, face_edges: NDArray[np.int_]) -> NDArray[np.int_]:
        raise NotImplementedError

    def get_grid_face_nodes(self, grid: int, face_nodes: NDArray[np.int_]) -> NDArray[np.int_]:
        raise NotImplementedError

    def get_grid_nodes_per_face(self, grid: int, nodes_per_face: NDArray[np.int_]) -> NDArray[np.int_]:
        raise NotImplementedError


def wind_config_with_host_grid(ocean: SlabOceanBmi, base: str, folder: Path) -> Path:
    """A WIND config whose ``host_grid`` is the ocean's grid (read through BMI)."""
    cfg = yaml.safe_load(Path(base).read_text()) if base else {"kind": "bmi"}
    n = ocean.get_grid_shape(0, np.zeros(2, dtype=int))
    cfg["host_grid"] = {"lat": ocean.get_grid_y(0, np.empty(n[0])).tolist(),
                        "lon": ocean.get_grid_x(0, np.empty(n[1])).tolist(), "method": "conservative",
                        "sigma": 0.95}
    path = folder / "wind_coupled.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="", help="WIND config (kind: bmi); empty = shipped defaults")
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--out", default="", help="write coupling.json here")
    args = p.parse_args(argv)

    ocean = SlabOceanBmi()
    ocean.initialize()
    wind = WindBmi()
    with tempfile.TemporaryDirectory() as tmp:
        wind.initialize(str(wind_config_with_host_grid(ocean, args.config, Path(tmp))))
    grid = wind.get_var_grid("atmosphere_air__temperature")
    levels = wind.get_grid_z(grid, np.empty(wind.get_grid_shape(grid, np.zeros(3, dtype=int))[0]))
    sigma = float(levels[np.argmin(np.abs(levels - 0.95))])
    coupler = Coupler({"wind": wind, "ocean": ocean}, [
        Exchange("wind", "atmosphere_air__temperature", "ocean", AIR_IN, method="conservative", level=sigma),
        Exchange("ocean", AIR_OUT, "wind", "atmosphere_air__host_grid_observed_value_of_temperature"),
    ], interval_seconds=wind.get_time_step() * 3600.0)
    history = coupler.run(args.days * 86400.0)
    for rec in history:
        print(f"day {rec['seconds'] / 86400:4.1f}: ocean receives air T {rec['ocean.' + AIR_IN]:.2f} K, "
              f"WIND receives host air T {rec['wind.atmosphere_air__host_grid_observed_value_of_temperature']:.2f} K")
    print(f"after {args.days} days: WIND t = {wind.get_current_time()} {wind.get_time_units()}, "
          f"ocean t = {ocean.get_current_time()} {ocean.get_time_units()}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "coupling.json").write_text(json.dumps(history, indent=1))
    wind.finalize()
    return history


if __name__ == "__main__":
    main()
