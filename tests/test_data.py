"""Dataset layouts (project, ERA5 CDS, WeatherBench2), inspect, windows and statistics."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from helpers import synthetic_dataset, write_dataset

from wind_bmi.cli import main
from wind_bmi.data.layouts import LayoutError, inspect_path, open_any
from wind_bmi.data.windows import build_splits, window_starts


def _era5(layout: str, tmp: Path) -> Path:
    times = [dt.datetime(2020, 1, 1) + dt.timedelta(hours=6 * i) for i in range(8)]
    lat = np.linspace(90, -90, 7)  # north-first, as CDS delivers it
    lon = np.arange(0, 360, 45.0) - 180.0  # -180..180
    levels = [500.0, 850.0]
    rng = np.random.default_rng(0)
    shape3 = (len(times), len(levels), len(lat), len(lon))
    if layout == "cds":
        ds = xr.Dataset(coords={"valid_time": times, "pressure_level": levels, "latitude": lat, "longitude": lon,
                                "number": [0, 1]})
        for v in ("t", "z", "u", "v", "q"):
            ds[v] = (("number", "valid_time", "pressure_level", "latitude", "longitude"),
                     rng.standard_normal((2, *shape3)).astype(np.float32))
        for v in ("sp", "msl", "t2m", "u10", "v10", "tp"):
            ds[v] = (("number", "valid_time", "latitude", "longitude"),
                     rng.standard_normal((2, len(times), len(lat), len(lon))).astype(np.float32))
    else:
        ds = xr.Dataset(coords={"time": times, "level": levels, "latitude": lat, "longitude": lon})
        for v in ("temperature", "geopotential", "u_component_of_wind", "v_component_of_wind", "specific_humidity"):
            # any dim order: WB2 zarr-to-netCDF exports often put lon before lat
            ds[v] = (("time", "level", "longitude", "latitude"),
                     rng.standard_normal((len(times), len(levels), len(lon), len(lat))).astype(np.float32))
        for v in ("2m_temperature", "mean_sea_level_pressure", "10m_u_component_of_wind", "total_precipitation_6hr"):
            ds[v] = (("time", "latitude", "longitude"), rng.standard_normal((len(times), len(lat), len(lon))))
    path = tmp / f"era5_{layout}.nc"
    ds.to_netcdf(path)
    return path


@pytest.mark.parametrize("layout", ["cds", "wb2"])
def test_era5_layouts_are_recognised_and_canonicalised(tmp_path: Path, layout: str) -> None:
    path = _era5(layout, tmp_path)
    report = inspect_path(path)
    assert report["layout"] == f"era5-{layout}"
    assert {"temperature", "geopotential", "u_wind", "v_wind", "specific_humidity"} <= set(report["variables"])
    assert report["levels"] == [500.0, 850.0]
    assert report["time"]["steps_hours"] == [6.0]
    ds = open_any(path)
    assert ds["temperature"].dims == ("time", "level", "lat", "lon")
    assert np.all(np.diff(ds["lat"].values) > 0) and ds["lon"].min() >= 0
    raw = xr.open_dataset(path)
    # the value at (lat=90, lon=-180) must land at (lat=90, lon=180) after reordering
    name = "t" if layout == "cds" else "temperature"
    src = raw[name].isel(**({"number": 0} if layout == "cds" else {}))
    src = src.transpose(*[d for d in src.dims if d not in ("latitude", "longitude")], "latitude", "longitude")
    assert float(ds["temperature"].isel(time=0, level=0).sel(lat=90.0, lon=180.0)) == \
        pytest.approx(float(src.isel(**{src.dims[0]: 0, src.dims[1]: 0}).sel(latitude=90.0, longitude=-180.0)))


def test_inspect_cli_on_good_and_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_dataset(tmp_path / "w", "2000-01-01", 2)
    assert main(["data", "inspect", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "wind" and report["time"]["count"] == 8
    bad = tmp_path / "bad.nc"
    xr.Dataset({"foo": (("time", "lat", "lon"), np.zeros((1, 2, 2)))},
               coords={"time": [0], "lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(bad)
    assert main(["data", "inspect", str(bad)]) == 2
    assert "no recognised variables" in capsys.readouterr().err
    nolat = tmp_path / "nolat.nc"
    xr.Dataset({"t": (("time",), np.zeros(2))}, coords={"time": [0, 1]}).to_netcdf(nolat)
    with pytest.raises(LayoutError, match="latitude"):
        inspect_path(nolat)
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"not a netcdf file")
    with pytest.raises(LayoutError, match="cannot be read"):
        open_any(garbage)
    with pytest.raises(LayoutError, match="no such file"):
        open_any(tmp_path / "missing")


def test_windows_never_bridge_gaps_and_stats_come_from_training_years(tiny_data: Path) -> None:
    splits = build_splits([tiny_data / "train", tiny_data / "val"], ["temperature", "surface_pressure"],
                          [2000], [2001], T=5)
    assert splits.train.frames.shape[1:] == (4, 8, 16)  # 3 levels of T + ps
    assert len(splits.train) == 40 * 4 - 4 and len(splits.val) == 10 * 4 - 4
    train_only = synthetic_dataset("2000-01-01", 40, seed=0)
    np.testing.assert_allclose(splits.norm.mean[0], float(train_only["temperature"].isel(level=0).mean()), rtol=1e-6)
    # the normalised training frames have zero mean, unit variance per channel
    np.testing.assert_allclose(splits.train.frames.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(splits.train.frames.std(axis=(0, 2, 3)), 1, atol=1e-3)
    # validation is normalised with the *training* statistics
    val_raw = synthetic_dataset("2001-01-01", 10, seed=1)["temperature"].isel(level=0).values
    np.testing.assert_allclose(splits.val.frames[:, 0], (val_raw - splits.norm.mean[0]) / splits.norm.std[0],
                               rtol=1e-4, atol=1e-4)
    times = [dt.datetime(2000, 1, 1) + dt.timedelta(hours=6 * i) for i in (0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24)]
    assert window_starts(times, 5).tolist() == [0, 1, 6]


def test_paper_preset_builds_70_channels_from_weatherbench2_files(tmp_path: Path) -> None:
    """The 70-channel ERA5 preset reads WB2-layout files (small synthetic grid, 13 levels, 2 years)."""
    from wind_bmi.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "config" / "train_era5_1p5deg.yaml")
    levels = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
    rng = np.random.default_rng(0)
    lat, lon = np.linspace(90, -90, 6), np.arange(0, 360, 45.0)
    for year in (1979, 2019):
        times = [dt.datetime(year, 1, 1) + dt.timedelta(hours=6 * i) for i in range(8)]
        ds = xr.Dataset(coords={"time": times, "level": levels, "latitude": lat, "longitude": lon})
        for v in ("temperature", "geopotential", "u_component_of_wind", "v_component_of_wind", "specific_humidity"):
            ds[v] = (("time", "level", "latitude", "longitude"), rng.standard_normal((8, 13, 6, 8)).astype(np.float32))
        for v in ("2m_temperature", "mean_sea_level_pressure", "10m_u_component_of_wind", "10m_v_component_of_wind",
                  "total_precipitation_6hr"):
            ds[v] = (("time", "latitude", "longitude"), rng.standard_normal((8, 6, 8)).astype(np.float32))
        (tmp_path / str(year)).mkdir()
        ds.to_netcdf(tmp_path / str(year) / "wb2.nc")
    splits = build_splits([tmp_path / "1979", tmp_path / "2019"], cfg.variables, [1979], [2019], T=5)
    assert len(splits.channels) == 70
    assert splits.train.frames.shape == (8, 70, 6, 8) and len(splits.train) == 4
    assert np.all(np.diff(splits.lat) > 0)


def test_a_weatherbench2_snapshot_with_one_scalar_time_is_inspected_and_serves_as_initial_condition(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    wb2 = xr.open_dataset(_era5("wb2", tmp_path)).isel(time=0)  # time becomes a scalar coordinate
    assert "time" not in wb2.dims and "time" in wb2.coords
    snap = tmp_path / "snapshot.nc"
    wb2.to_netcdf(snap)
    assert main(["data", "inspect", str(snap)]) == 0
    out = capsys.readouterr().out
    assert "one time, no step" in out and "era5-wb2" in out
    assert inspect_path(snap)["time"]["count"] == 1
    # a single-time file in the project layout starts a WindBmi run (one context frame)
    from helpers import write_bmi_config

    from wind_bmi import WindBmi

    one = synthetic_dataset("2002-03-02", 1).isel(time=0)
    one.to_netcdf(tmp_path / "one.nc", encoding={"time": {"units": "hours since 1900-01-01"}})
    cfg = write_bmi_config(tmp_path / "bmi.yaml", tiny_model, tmp_path / "one.nc", start_time="")
    bmi = WindBmi()
    bmi.initialize(str(cfg))
    assert bmi.get_time_units() == f"hours since {one['time'].dt.strftime('%Y-%m-%d %H:%M:%S').item()}"
    bmi.update()
    assert np.isfinite(bmi.get_value("atmosphere_air__temperature", np.empty(bmi.get_grid_size(0)))).all()
