"""Regridding: tests that discriminate (conservative vs bilinear), ESMF weight files, bad files."""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pytest
from helpers import gaussian_like_lats

from wind_bmi.regrid import LatLonGrid, Regridder, RegridError, esmpy_available

GAUSS = LatLonGrid(gaussian_like_lats(48), np.arange(96) * 3.75)  # the SPEEDY grid, 0..360
# a coarser regular grid, north-first latitudes and -180..180 longitudes
COARSE = LatLonGrid(np.linspace(87.5, -87.5, 36), np.arange(-180, 180, 5.0) + 2.5)


def integral(grid: LatLonGrid, f: np.ndarray) -> float:
    return float((grid.areas() * f).sum())


def smooth(grid: LatLonGrid) -> np.ndarray:
    la, lo = np.meshgrid(np.deg2rad(grid.lat), np.deg2rad(grid.lon), indexing="ij")
    return 280 + 20 * np.cos(la) ** 2 + 5 * np.sin(3 * lo) * np.cos(la) + 2 * np.sin(la)


@pytest.mark.parametrize("src,dst", [(GAUSS, COARSE), (COARSE, GAUSS)], ids=["fine2coarse", "coarse2fine"])
def test_conservative_preserves_integral_and_bilinear_does_not(src: LatLonGrid, dst: LatLonGrid) -> None:
    f = smooth(src)
    cons = Regridder.build(src, dst, "conservative")(f)
    bil = Regridder.build(src, dst, "bilinear")(f)
    ref = integral(src, f)
    assert abs(integral(dst, cons) - ref) / abs(ref) < 1e-12
    assert abs(integral(dst, bil) - ref) / abs(ref) > 1e-7
    assert np.isfinite(cons).all() and cons.shape == dst.shape


def test_bilinear_reproduces_linear_fields_and_conservative_does_not() -> None:
    dst = LatLonGrid(np.linspace(-60, 60, 13), np.linspace(20, 300, 15))
    la, lo = np.meshgrid(GAUSS.lat, GAUSS.lon, indexing="ij")
    f = 3.0 + 0.5 * la + 0.1 * lo
    dla, dlo = np.meshgrid(dst.lat, dst.lon, indexing="ij")
    want = 3.0 + 0.5 * dla + 0.1 * dlo
    assert np.allclose(Regridder.build(GAUSS, dst, "bilinear")(f), want, atol=1e-10)
    assert not np.allclose(Regridder.build(GAUSS, dst, "conservative")(f), want, atol=1e-3)


def test_weight_file_round_trip_and_leading_dims(tmp_path: Path) -> None:
    r = Regridder.build(GAUSS, COARSE, "conservative")
    path = r.to_esmf_weights(tmp_path / "w.nc", GAUSS, COARSE)
    r2 = Regridder.from_esmf_weights(path)
    assert r2.src_shape == GAUSS.shape and r2.dst_shape == COARSE.shape
    x = np.random.default_rng(0).standard_normal((2, 3, *GAUSS.shape))
    np.testing.assert_array_equal(r(x), r2(x))
    assert r(x).shape == (2, 3, *COARSE.shape)


def test_coarse_fine_coarse_round_trip_is_identity_for_nested_grids() -> None:
    fine = LatLonGrid(np.linspace(-89, 89, 90), np.arange(0, 360, 2.0))
    coarse = LatLonGrid(np.linspace(-88, 88, 45), np.arange(0, 360, 4.0) + 1.0)
    f = smooth(coarse)
    back = Regridder.build(fine, coarse)(Regridder.build(coarse, fine)(f))
    np.testing.assert_allclose(back, f, rtol=1e-12)


def _write(path: Path, **vars_: np.ndarray) -> Path:
    with netCDF4.Dataset(str(path), "w") as nc:
        for name, v in vars_.items():
            nc.createDimension(f"d_{name}", v.size)
            nc.createVariable(name, v.dtype, (f"d_{name}",))[:] = v
    return path


def test_malformed_weight_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RegridError, match="missing weight variable"):
        Regridder.from_esmf_weights(_write(tmp_path / "a.nc", row=np.array([1]), col=np.array([1])), (1, 1), (1, 1))
    ok = dict(row=np.array([1, 2]), col=np.array([1, 5]), S=np.array([1.0, 1.0]))
    with pytest.raises(RegridError, match="col indices"):
        Regridder.from_esmf_weights(_write(tmp_path / "b.nc", **ok), (2, 2), (1, 2))
    with pytest.raises(RegridError, match="no source grid shape"):
        Regridder.from_esmf_weights(_write(tmp_path / "c.nc", **ok))
    r = Regridder.from_esmf_weights(_write(tmp_path / "d.nc", **ok), (1, 5), (1, 2))
    with pytest.raises(RegridError, match="trailing shape"):
        r(np.zeros((2, 2)))
    garbage = tmp_path / "e.nc"
    garbage.write_text("no")
    with pytest.raises(RegridError, match="cannot be read"):
        Regridder.from_esmf_weights(garbage)
    # destination cells without any weight come back NaN, never silently zero
    r = Regridder.from_esmf_weights(_write(tmp_path / "f.nc", row=np.array([1]), col=np.array([1]),
                                           S=np.array([1.0])), (1, 2), (1, 2))
    out = r(np.array([[3.0, 4.0]]))
    assert out[0, 0] == 3.0 and np.isnan(out[0, 1])


def test_esmpy_absence_is_reported_not_hidden() -> None:
    if esmpy_available():
        pytest.skip("esmpy present")
    with pytest.raises(ImportError, match="esmpy is not installed"):
        Regridder.from_esmpy(GAUSS, COARSE)


def test_the_regridder_and_the_model_share_one_geometry() -> None:
    """The regridder's cell areas are the model's (dry air mass, area means), on either row order, and
    a regional grid's outer edges lie half a cell out, not at the poles."""
    import torch
    from wind_bmi.model.physics import EARTH_RADIUS, cell_areas

    model = cell_areas(torch.from_numpy(GAUSS.lat), GAUSS.lon.size).numpy() / EARTH_RADIUS**2
    np.testing.assert_allclose(GAUSS.areas(), model, rtol=1e-13)
    north_first = LatLonGrid(GAUSS.lat[::-1], GAUSS.lon)
    np.testing.assert_allclose(north_first.areas(), model[::-1], rtol=1e-13)
    assert abs(GAUSS.areas().sum() - 4 * np.pi) < 1e-12
    regional = LatLonGrid(np.arange(30.0, 61.0, 2.0), np.arange(-20.0, 21.0, 2.0))
    assert regional.lat_edges()[[0, -1]].tolist() == [29.0, 61.0]
