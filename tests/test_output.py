"""The component's netCDF output: CF metadata a modeller can trust, checked by hand and by cfchecker."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from helpers import LEVELS, write_bmi_config, write_dataset

from wind_bmi import WindBmi

ROOT = Path(__file__).resolve().parents[1]
TABLE = Path(sys.executable).parent.parent / "cf-tables" / "cf-standard-name-table.xml"


@pytest.fixture(scope="module")
def output(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("out")
    ic = write_dataset(tmp / "ic", "2002-03-01", 2, seed=5)
    cfg = write_bmi_config(tmp / "run.yaml", tiny_model, ic, members=3, output=str(tmp / "forecast.nc"))
    bmi = WindBmi()
    bmi.initialize(str(cfg))
    bmi.update()
    bmi.finalize()
    return tmp / "forecast.nc"


def test_output_has_cf_coordinates_bounds_and_exact_levels(output: Path) -> None:
    ds = xr.open_dataset(output)
    lev = ds["level"]
    assert lev.attrs["standard_name"] == "atmosphere_sigma_coordinate" and lev.attrs["axis"] == "Z"
    assert lev.attrs["positive"] == "down" and "sigma: level ps: surface_pressure ptop: ptop" == lev.attrs["formula_terms"]
    assert float(ds["ptop"]) == 0.0
    np.testing.assert_array_equal(lev.values, np.sort(LEVELS)[::-1] if lev.values[0] > lev.values[-1] else np.sort(LEVELS))
    assert float(ds.sel(level=0.51)["level"]) == 0.51  # nominal values, not float32-rounded
    for c in ("lat", "lon"):
        b = ds[ds[c].attrs["bounds"]].values
        assert ((b[:, 0] <= ds[c].values) & (ds[c].values <= b[:, 1])).all() or \
            ((b[:, 0] >= ds[c].values) & (ds[c].values >= b[:, 1])).all()
        np.testing.assert_allclose(b[1:, 0], b[:-1, 1])  # contiguous cells
    lat_b = ds["lat_bnds"].values
    assert {float(np.round(lat_b.min())), float(np.round(lat_b.max()))} == {-90.0, 90.0}
    assert float(ds["lon_bnds"].values[-1, 1] - ds["lon_bnds"].values[0, 0]) == pytest.approx(360.0)
    with netCDF4.Dataset(output) as nc:  # coordinates never carry a fill value
        for c in ("time", "level", "lat", "lon", "member", "lat_bnds", "lon_bnds"):
            assert "_FillValue" not in nc[c].ncattrs(), c
        assert nc["time"].units.startswith("hours since 2002-03-02")


def test_spread_and_members_are_described_and_linked(output: Path) -> None:
    ds = xr.open_dataset(output)
    t, s, m = ds["temperature"], ds["temperature_spread"], ds["temperature_members"]
    assert t.attrs["cell_methods"] == "realization: mean" and t.attrs["ancillary_variables"] == "temperature_spread"
    assert s.attrs["standard_name"] == "air_temperature"
    assert s.attrs["cell_methods"] == "realization: standard_deviation"
    assert m.dims == ("time", "member", "level", "lat", "lon") and ds["member"].attrs["standard_name"] == "realization"
    np.testing.assert_allclose(m.mean("member"), t, rtol=1e-5)
    np.testing.assert_allclose(m.std("member", ddof=1), s, rtol=1e-3, atol=1e-5)


def test_output_passes_the_cf_checker(output: Path, tmp_path: Path) -> None:
    if ctypes.util.find_library("udunits2") is None:
        pytest.skip("libudunits2 is not installed (Debian libudunits2-0; make test installs it when run as root)")
    if not TABLE.is_file():
        pytest.skip(f"no CF standard-name table at {TABLE} (make test fetches it)")
    area, region = tmp_path / "area.xml", tmp_path / "region.xml"  # this file uses no area types or regions
    area.write_text("<area_type_table><version_number>0</version_number><date>-</date></area_type_table>")
    region.write_text("<standardized_region_list><version_number>0</version_number><date>-</date>"
                      "</standardized_region_list>")
    out = subprocess.run([str(Path(sys.executable).parent / "cfchecks"), "-s", str(TABLE), "-a", str(area), "-r",
                          str(region), str(output)], capture_output=True, text=True, timeout=300)
    assert "ERRORS detected: 0" in out.stdout and "WARNINGS given: 0" in out.stdout, out.stdout[-3000:]
