"""The SPEEDY generator on a short run: dims, units, attributes, no NaN, spin-up discarded, resumption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("jcm")

from wind_bmi.cli import main  # noqa: E402
from wind_bmi.data.speedy import month_spans  # noqa: E402


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speedy")
    # 2 spin-up days, then 3 saved days straddling a month boundary -> two files
    assert main(["data", "generate", "--out", str(out), "--start", "1990-01-30", "--days", "3",
                 "--spinup-days", "2", "--seed", "3", "--sst-anomaly"]) == 0
    return out


def test_files_dims_units_attributes(generated: Path) -> None:
    files = sorted(generated.glob("speedy_*.nc"))
    assert [f.name for f in files] == ["speedy_1990-01.nc", "speedy_1990-02.nc"]
    ds = xr.open_mfdataset(files, data_vars="minimal", coords="minimal", compat="override")
    assert ds["temperature"].dims == ("time", "level", "lat", "lon")
    assert ds.sizes["lat"] == 48 and ds.sizes["lon"] == 96 and ds.sizes["level"] == 8
    assert np.all(np.diff(ds["lat"].values) > 0)
    assert ds.sizes["time"] == 12  # 3 days x 4, the spin-up not written
    first = ds["time"].values[0]
    assert str(first).startswith("1990-01-30T06")  # labels mark the end of each 6-h interval
    for name, units in (("temperature", "K"), ("surface_pressure", "Pa"), ("precipitation", "kg m-2 s-1"),
                        ("u_wind", "m s-1"), ("specific_humidity", "kg kg-1")):
        assert ds[name].attrs["units"] == units
        assert ds[name].attrs["csdms_name"]
        assert np.isfinite(ds[name].values).all()
    ps = ds["surface_pressure"].values
    assert 4.5e4 < ps.min() and ps.max() < 1.15e5 and 9.5e4 < ps.mean() < 1.02e5
    t = ds["temperature"].values
    assert 180 < t.min() and t.max() < 330
    assert ds.attrs["jcm_version"] == "3.0.0" and ds.attrs["seed"] == 3 and ds.attrs["sst_anomaly"] == 1
    assert ds["time"].encoding["calendar"] == "proleptic_gregorian"


def test_rerun_skips_finished_months_and_resumes(generated: Path, tmp_path: Path) -> None:
    before = {f.name: f.stat().st_mtime_ns for f in generated.glob("speedy_*.nc")}
    assert main(["data", "generate", "--out", str(generated), "--start", "1990-01-30", "--days", "3",
                 "--spinup-days", "2", "--seed", "3", "--sst-anomaly"]) == 0
    after = {f.name: f.stat().st_mtime_ns for f in generated.glob("speedy_*.nc")}
    assert before == after  # nothing rewritten
    # an interrupted job (stopped after January) continues from the checkpointed GCM state and
    # writes the same February as the uninterrupted run
    from wind_bmi.config import GenerateConfig
    from wind_bmi.data.speedy import generate

    cfg = GenerateConfig(start="1990-01-30", days=3, spinup_days=2, seed=3, sst_anomaly=True)
    part = tmp_path / "part"
    assert [f.name for f in generate(cfg, part, max_months=1)] == ["speedy_1990-01.nc"]
    assert not (part / "speedy_1990-02.nc").exists()
    generate(cfg, part)
    ref = xr.open_dataset(generated / "speedy_1990-02.nc").load()
    got = xr.open_dataset(part / "speedy_1990-02.nc").load()
    np.testing.assert_allclose(got["temperature"].values, ref["temperature"].values, rtol=1e-5, atol=1e-3)
    assert not list(part.glob("*.tmp"))
    with pytest.raises(ValueError, match="other options"):
        generate(GenerateConfig(start="1990-01-30", days=4, spinup_days=2, seed=3, sst_anomaly=True), part)


def test_month_spans() -> None:
    import datetime as dt

    spans = month_spans(dt.date(1990, 1, 30), 35)
    assert spans[0] == (dt.date(1990, 1, 30), dt.date(1990, 2, 1))
    assert spans[-1][1] == dt.date(1990, 3, 6)
    assert sum((b - a).days for a, b in spans) == 35
