"""The two-component coupler: WIND (tiny prior) with the slab-ocean host model of examples/."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_bmi_config, write_dataset
from wind_bmi.coupling.coupler import Coupler, CouplerError, Exchange

from wind_bmi import WindBmi
from wind_bmi.regrid import LatLonGrid

ROOT = Path(__file__).resolve().parents[1]
EX = runpy.run_path(str(ROOT / "examples" / "slab_ocean.py"), run_name="not_main")
T3 = "atmosphere_air__temperature"
HOST_T = "atmosphere_air__host_grid_observed_value_of_temperature"


@pytest.fixture()
def wind_cfg(tiny_model: Path, tmp_path: Path) -> Path:
    ic = write_dataset(tmp_path / "ic", "2002-03-01", 2, seed=5)
    return write_bmi_config(tmp_path / "wind.yaml", tiny_model, ic, members=2, seed=3, run_hours=96.0)


def pair(wind_cfg: Path, tmp_path: Path, res: float = 45.0) -> tuple[WindBmi, object]:
    ocean = EX["SlabOceanBmi"]()
    tmp_path.mkdir(parents=True, exist_ok=True)
    ocfg = tmp_path / "ocean.yaml"
    ocfg.write_text(yaml.safe_dump({"resolution_deg": res}))
    ocean.initialize(str(ocfg))
    wind = WindBmi()
    wind.initialize(str(EX["wind_config_with_host_grid"](ocean, str(wind_cfg), tmp_path)))
    return wind, ocean


def sigma_level(wind: WindBmi) -> float:
    levels = np.asarray(wind.component.levels)
    return float(levels[np.argmin(np.abs(levels - 0.95))])


def area_mean(field: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> float:
    a = LatLonGrid(lat, lon).areas()
    return float((field * a).sum() / a.sum())


@pytest.mark.parametrize("method", ["conservative", "bilinear"])
def test_coupler_steps_both_clocks_and_remaps_conservatively(wind_cfg: Path, tmp_path: Path, method: str) -> None:
    wind, ocean = pair(wind_cfg, tmp_path)
    lev = sigma_level(wind)
    coupler = Coupler({"wind": wind, "ocean": ocean}, [
        Exchange("wind", T3, "ocean", EX["AIR_IN"], method=method, level=lev),
        Exchange("ocean", EX["AIR_OUT"], "wind", HOST_T),
    ], interval_seconds=86400.0)
    comp = wind.component
    k = int(np.argmin(np.abs(np.asarray(comp.levels) - lev)))
    wind_field = comp.mean_phys[comp.channel_slice("temperature")][k].astype(np.float64)
    sent = np.nanmean(np.where(ocean.ice, np.nan, ocean.sst - 1.0))
    coupler.step()
    # clocks: WIND counts hours, the ocean days; both advanced one coupling interval
    assert wind.get_current_time() == 24.0 and ocean.get_current_time() == pytest.approx(1.0)
    # WIND -> ocean: the conservative map keeps the area-weighted global mean, bilinear does not
    received = ocean.air
    m_wind = area_mean(wind_field, comp.model.lat.numpy(), comp.model.lon.numpy())
    m_ocean = area_mean(received, ocean.lat, ocean.lon)
    if method == "conservative":
        assert m_ocean == pytest.approx(m_wind, rel=1e-12)
    else:
        assert abs(m_ocean - m_wind) > 1e-6 * abs(m_wind)
    # ocean -> WIND went through the host-grid input: same grid, so values pass unchanged (NaN under ice)
    rec = coupler.history[-1]
    assert rec[f"wind.{HOST_T}"] == pytest.approx(sent, rel=1e-12)
    coupler.run(86400.0)
    assert wind.get_current_time() == 48.0 and ocean.get_current_time() == pytest.approx(2.0)


def test_ocean_observations_pull_wind_towards_the_ocean(wind_cfg: Path, tmp_path: Path) -> None:
    wind, ocean = pair(wind_cfg, tmp_path)
    free, _ = pair(wind_cfg, tmp_path / "free")
    ocean.sst = ocean.sst + 8.0  # an ocean far warmer than the atmosphere above it
    Coupler({"wind": wind, "ocean": ocean}, [Exchange("ocean", EX["AIR_OUT"], "wind", HOST_T)], 86400.0).step()
    free.update()
    W = wind.component.assembler.host
    k = wind.component.assembler.host_level
    chans = wind.component.channel_slice("temperature")
    target = np.where(ocean.ice, np.nan, ocean.sst - 1.0).reshape(-1)
    seen = np.isfinite(target)

    def err(b: WindBmi) -> float:
        return float(np.abs(W(b.component.mean_phys[chans][k]).reshape(-1) - target)[seen].mean())

    assert err(wind) < 0.5 * err(free)


def test_coupler_refuses_what_it_cannot_do_exactly(wind_cfg: Path, tmp_path: Path) -> None:
    wind, ocean = pair(wind_cfg, tmp_path)
    comps = {"wind": wind, "ocean": ocean}
    lev = sigma_level(wind)
    with pytest.raises(CouplerError, match="not a multiple of its time step"):
        Coupler(comps, [], interval_seconds=3600.0 * 30)  # 30 h: not a multiple of WIND's 24-h window
    with pytest.raises(CouplerError, match="say which with level="):
        Coupler(comps, [Exchange("wind", T3, "ocean", EX["AIR_IN"])], 86400.0)
    with pytest.raises(CouplerError, match="level 0.5 is not one of"):
        Coupler(comps, [Exchange("wind", T3, "ocean", EX["AIR_IN"], level=0.5)], 86400.0)
    with pytest.raises(CouplerError, match="no conversion from 'Pa' to 'K'"):
        Coupler(comps, [Exchange("wind", "atmosphere_bottom_air__pressure", "ocean", EX["AIR_IN"])], 86400.0)
    with pytest.raises(CouplerError, match="has no input variable"):
        Coupler(comps, [Exchange("wind", T3, "ocean", "sea_ice__thickness", level=lev)], 86400.0)
    ocean.get_time_units = lambda: "fortnights"  # type: ignore[method-assign]
    with pytest.raises(CouplerError, match="time units 'fortnights'"):
        Coupler(comps, [], 86400.0)
    assert wind.get_current_time() == 0.0  # nothing was stepped


def test_slab_ocean_example_runs(wind_cfg: Path, tmp_path: Path) -> None:
    history = EX["main"]([str(wind_cfg), "--days", "2", "--out", str(tmp_path / "out")])
    assert len(history) == 2 and (tmp_path / "out" / "coupling.json").exists()
    assert all(np.isfinite(v) for rec in history for v in rec.values())


def test_coupler_reads_cf_since_units_and_converts_between_clocks(wind_cfg: Path, tmp_path: Path) -> None:
    """A host on an ERA5-style clock (``hours since 1900-01-01 00:00:0.0``, its own reference date and
    numbers) couples with WIND (``hours since <its start>``) when both stand at the same date; the
    coupler steps each by its own clock and refuses clocks that disagree on the date."""
    import cftime

    wind, ocean = pair(wind_cfg, tmp_path)
    start = cftime.num2date(wind.get_current_time(), wind.get_time_units(), wind.get_calendar())
    era5_units = "hours since 1900-01-01 00:00:0.0"
    hours_since_1900 = cftime.date2num(start, era5_units, calendar="proleptic_gregorian")
    ocean.time = hours_since_1900 / 24.0  # the slab ocean's own clock counts days
    ocean.get_time_units = lambda: "days since 1900-01-01 00:00:0.0"  # type: ignore[method-assign]
    coupler = Coupler({"wind": wind, "ocean": ocean}, [], interval_seconds=86400.0)
    coupler.run(2 * 86400.0)
    assert wind.get_current_time() == 48.0
    assert ocean.time == pytest.approx(hours_since_1900 / 24.0 + 2.0)
    when = {n: coupler.clock[n].date_at(c.get_current_time()) for n, c in coupler.components.items()}
    assert when["wind"].strftime("%Y-%m-%d %H:%M:%S") == when["ocean"].strftime("%Y-%m-%d %H:%M:%S")  # same date
    ocean.time += 0.25  # six hours apart: refused, naming both dates
    with pytest.raises(CouplerError, match="must show the same date"):
        Coupler({"wind": wind, "ocean": ocean}, [], interval_seconds=86400.0)
    ocean.get_time_units = lambda: "days since the big bang"  # type: ignore[method-assign]
    with pytest.raises(CouplerError, match="not CF time units"):
        Coupler({"wind": wind, "ocean": ocean}, [], interval_seconds=86400.0)


class GridHost:
    """A minimal host that only receives a field (``air_in``, K) on the grid it reports."""

    def __init__(self, lat: np.ndarray, lon: np.ndarray, gtype: str, lie: bool = False) -> None:
        self.lat, self.lon, self.gtype, self.lie = lat, lon, gtype, lie
        self.received = np.full((lat.size, lon.size), np.nan)

    def get_input_var_names(self) -> tuple[str, ...]:
        return ("air_in",)

    def get_output_var_names(self) -> tuple[str, ...]:
        return ()

    def get_var_grid(self, name: str) -> int:
        return 0

    def get_var_units(self, name: str) -> str:
        return "K"

    def get_grid_type(self, grid: int) -> str:
        return self.gtype

    def get_grid_rank(self, grid: int) -> int:
        return 2

    def get_grid_shape(self, grid: int, shape: np.ndarray) -> np.ndarray:
        shape[:] = (self.lat.size, self.lon.size)
        return shape

    def get_grid_origin(self, grid: int, origin: np.ndarray) -> np.ndarray:
        origin[:] = (min(self.lat[0], self.lat[-1]) if self.lie else self.lat[0], self.lon[0])
        return origin

    def get_grid_spacing(self, grid: int, spacing: np.ndarray) -> np.ndarray:
        spacing[:] = (abs(self.lat[1] - self.lat[0]) if self.lie else self.lat[1] - self.lat[0], self.lon[1] - self.lon[0])
        return spacing

    def get_grid_y(self, grid: int, y: np.ndarray) -> np.ndarray:
        if self.gtype == "structured_quadrilateral":
            y[:] = np.repeat(self.lat, self.lon.size)
        else:
            y[:] = self.lat
        return y

    def get_grid_x(self, grid: int, x: np.ndarray) -> np.ndarray:
        if self.gtype == "structured_quadrilateral":
            x[:] = np.tile(self.lon, self.lat.size)
        else:
            x[:] = self.lon
        return x

    def set_value(self, name: str, values: np.ndarray) -> None:
        self.received[...] = values.reshape(self.received.shape)

    def get_time_units(self) -> str:
        return "h"

    def get_time_step(self) -> float:
        return 24.0

    def get_current_time(self) -> float:
        return getattr(self, "time", 0.0)

    def update_until(self, time: float) -> None:
        self.time = time


@pytest.mark.parametrize(("rows", "lons", "gtype"), [
    ("north_first", "-180..180", "uniform_rectilinear"), ("south_first", "0..360", "uniform_rectilinear"),
    ("north_first", "0..360", "rectilinear"), ("south_first", "-180..180", "structured_quadrilateral"),
    ("regional", "-180..180", "uniform_rectilinear")])
def test_host_grids_are_read_as_reported_in_either_row_order(wind_cfg: Path, tmp_path: Path, rows: str, lons: str,
                                                            gtype: str) -> None:
    """WIND's temperature reaches the host at the host's own latitudes: each host row matches WIND's zonal
    mean at that latitude (a flipped mapping would put polar air at the equator), and a regional host
    gets values only inside its region."""
    wind = WindBmi()
    wind.initialize(str(wind_cfg))
    lat = {"north_first": np.arange(87.5, -90.0, -5.0), "south_first": np.arange(-87.5, 90.0, 5.0),
           "regional": np.arange(57.5, 20.0, -5.0)}[rows]
    lon = np.arange(-177.5, 180.0, 5.0) if lons == "-180..180" else np.arange(2.5, 360.0, 5.0)
    if rows == "regional":
        lon = np.arange(-17.5, 40.0, 5.0)
    host = GridHost(lat, lon, gtype)
    lev = sigma_level(wind)
    comp = wind.component
    # a field that says where it is: 250 K + 0.5 K per degree of latitude (plus a little longitude)
    wlat, wlon = comp.model.lat.numpy(), comp.model.lon.numpy()
    field = 250.0 + 0.5 * wlat[:, None] + 0.01 * np.cos(np.deg2rad(wlon))[None, :]
    wind.set_value(T3, np.broadcast_to(field, (len(comp.levels), *field.shape)).reshape(-1).copy())
    Coupler({"wind": wind, "host": host}, [Exchange("wind", T3, "host", "air_in", level=lev)], 86400.0).step()
    rows_got = host.received.mean(axis=1)
    assert np.isfinite(host.received).all()
    assert np.corrcoef(rows_got, lat)[0, 1] > 0.9  # a flipped mapping gives about -1
    assert rows_got[np.argmin(lat)] < rows_got[np.argmax(lat)]
    # each host row lies between WIND's values at the WIND rows around it (no shift by a row or more)
    lo = np.interp(lat, wlat, field.mean(axis=1)) - 0.5 * 0.5 * np.abs(np.diff(wlat)).max()
    hi = lo + 0.5 * np.abs(np.diff(wlat)).max()
    assert ((rows_got >= lo - 1e-6) & (rows_got <= hi + 1e-6)).all(), (rows_got - lo, hi - lo)


def test_a_grid_whose_coordinates_contradict_its_origin_is_refused(wind_cfg: Path) -> None:
    wind = WindBmi()
    wind.initialize(str(wind_cfg))
    lying = GridHost(np.arange(87.5, -90.0, -5.0), np.arange(-177.5, 180.0, 5.0), "uniform_rectilinear", lie=True)
    with pytest.raises(CouplerError, match="orientation is ambiguous"):
        Coupler({"wind": wind, "host": lying}, [Exchange("wind", T3, "host", "air_in", level=sigma_level(wind))],
                86400.0)
    curvy = GridHost(np.arange(-87.5, 90.0, 5.0), np.arange(-177.5, 180.0, 5.0), "unstructured")
    with pytest.raises(CouplerError, match="can be coupled"):
        Coupler({"wind": wind, "host": curvy}, [Exchange("wind", T3, "host", "air_in", level=sigma_level(wind))],
                86400.0)
