"""Regridding between lat-lon grids with ESMF-format sparse weights (numpy + scipy.sparse).

A :class:`Regridder` holds a sparse matrix ``W`` (``n_b x n_a``) and applies ``dst = W src`` to arrays
with any leading dimensions, flattening ``(lat, lon)`` in C order (longitude fastest, which is
ESMF's flattening too). Weights come from

* ESMF offline weight files (ESMF_RegridWeightGen / xESMF): ``row``, ``col``, ``S`` (1-based),
  shapes from ``src_grid_dims``/``dst_grid_dims`` (``[nlon, nlat]``), ``n_a``/``n_b`` or the caller;
  ``destarea``-normalised conservative maps are divided by ``frac_b``;
* :func:`conservative_weights` / :func:`bilinear_weights` built here for regular or Gaussian grids,
  either latitude order, 0..360 or -180..180 longitudes (exact first-order conservative overlap
  areas ``R^2 d(sin lat) d lon``; separable bilinear with periodic longitude);
* esmpy, when importable (optional ``[esmf]`` extra) -- never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from wind_bmi.model.physics import latitude_cell_edges


class RegridError(ValueError):
    """Malformed weight file, shape mismatch or unsupported request."""


@dataclasses.dataclass(frozen=True)
class LatLonGrid:
    """A rectilinear lat-lon grid: cell centres in degrees, latitudes monotonic in either order, longitudes
    monotonic in any convention (0..360, -180..180). Global or regional: the grid is periodic in longitude
    when its cells span 360 degrees, and its outer latitude edges are the poles only when the outer
    centres lie within half a cell of them; otherwise the outer edges lie half a cell beyond the centres,
    and points outside the grid get no weights (NaN), never an extrapolation."""

    lat: NDArray[np.float64]
    lon: NDArray[np.float64]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lat", np.asarray(self.lat, dtype=np.float64))
        object.__setattr__(self, "lon", np.asarray(self.lon, dtype=np.float64))
        if self.lat.ndim != 1 or self.lon.ndim != 1 or self.lat.size < 2 or self.lon.size < 2:
            raise RegridError("lat and lon must be 1-D with at least 2 points")
        if np.abs(self.lat).max() > 90:
            raise RegridError("latitudes must lie in [-90, 90]")
        dlat = np.diff(self.lat)
        if not ((dlat > 0).all() or (dlat < 0).all()):
            raise RegridError("latitudes must be strictly monotonic (ascending or descending)")
        dlon = np.diff(np.unwrap(self.lon, period=360.0))
        if not (dlon > 0).all():
            raise RegridError("longitudes must increase along the grid (any origin, wrapping at 360 allowed)")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lat.size, self.lon.size)

    @property
    def periodic(self) -> bool:
        """Whether the cells span all 360 degrees of longitude."""
        lon = np.unwrap(self.lon, period=360.0)
        step = float(np.median(np.diff(lon)))
        return abs(lon[-1] - lon[0] + step - 360.0) < 0.5 * step

    def lat_edges(self) -> NDArray[np.float64]:
        """``(nlat + 1,)`` edges in the grid's own order (:func:`~wind_bmi.model.physics.latitude_cell_edges`)."""
        return latitude_cell_edges(self.lat)

    def lon_edges(self) -> NDArray[np.float64]:
        """``(nlon + 1,)`` edges, increasing; spanning 360 degrees when the grid is periodic."""
        lon = np.unwrap(self.lon, period=360.0)
        mid = 0.5 * (lon[1:] + lon[:-1])
        first = lon[0] - 0.5 * (lon[1] - lon[0])
        last = first + 360.0 if self.periodic else lon[-1] + 0.5 * (lon[-1] - lon[-2])
        return np.concatenate([[first], mid, [last]])

    def areas(self) -> NDArray[np.float64]:
        """Cell areas on the unit sphere ``|d sin lat| d lon`` (radians), ``(nlat, nlon)``."""
        dsin = np.abs(np.diff(np.sin(np.deg2rad(self.lat_edges()))))
        dlon = np.deg2rad(np.diff(self.lon_edges()))
        return dsin[:, None] * dlon[None, :]


def _overlap_1d(a_lo: NDArray[Any], a_hi: NDArray[Any], b_lo: NDArray[Any], b_hi: NDArray[Any]) -> NDArray[Any]:
    """Overlap lengths ``(len(b), len(a))`` of intervals ``[b_lo, b_hi]`` and ``[a_lo, a_hi]``."""
    lo = np.maximum(a_lo[None, :], b_lo[:, None])
    hi = np.minimum(a_hi[None, :], b_hi[:, None])
    return np.clip(hi - lo, 0.0, None)


def _lon_overlap(src: LatLonGrid, dst: LatLonGrid) -> NDArray[np.float64]:
    """Periodic overlap lengths in degrees ``(nlon_dst, nlon_src)``."""
    se, de = src.lon_edges(), dst.lon_edges()
    out = np.zeros((dst.lon.size, src.lon.size))
    for shift in (-360.0, 0.0, 360.0):
        out += _overlap_1d(se[:-1] + shift, se[1:] + shift, de[:-1], de[1:])
    return out


def _lat_overlap(src: LatLonGrid, dst: LatLonGrid) -> NDArray[np.float64]:
    """Overlaps in ``sin(lat)`` ``(nlat_dst, nlat_src)``, any latitude order."""
    s = np.sin(np.deg2rad(src.lat_edges()))
    d = np.sin(np.deg2rad(dst.lat_edges()))
    s_lo, s_hi = np.minimum(s[:-1], s[1:]), np.maximum(s[:-1], s[1:])
    d_lo, d_hi = np.minimum(d[:-1], d[1:]), np.maximum(d[:-1], d[1:])
    return _overlap_1d(s_lo, s_hi, d_lo, d_hi)


def _normalise_rows(w: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rows divided by their sums; rows without overlap stay empty (their cells come back NaN)."""
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def conservative_weights(src: LatLonGrid, dst: LatLonGrid) -> sp.csr_matrix:
    """First-order conservative weights: ``W[b, a] = area(b ∩ a) / area(b ∩ source grid)`` (exact on the
    sphere; a destination cell partly outside a regional source averages the part it covers)."""
    wlat = _normalise_rows(_lat_overlap(src, dst))
    wlon = _normalise_rows(_lon_overlap(src, dst))
    return sp.csr_matrix(sp.kron(sp.csr_matrix(wlat), sp.csr_matrix(wlon)))


def _linear_1d(x_src: NDArray[Any], x_dst: NDArray[Any], periodic: bool,
               extend: tuple[float, float] | None = None) -> sp.csr_matrix:
    """Linear interpolation weights; outside the source points a destination point takes the nearest
    source point only within ``extend`` (the source grid's outer edges), else gets no weights."""
    n = x_src.size
    order = np.argsort(x_src)
    xs = x_src[order]
    rows, cols, vals = [], [], []
    for i, x in enumerate(x_dst):
        if periodic:
            x0 = xs[0]
            xx = x0 + np.mod(x - x0, 360.0)
            ext = np.concatenate([xs, [xs[0] + 360.0]])
            k = int(np.clip(np.searchsorted(ext, xx, side="right") - 1, 0, n - 1))
            w = (xx - ext[k]) / (ext[k + 1] - ext[k])
            a, b = order[k], order[(k + 1) % n]
        else:
            if x <= xs[0] or x >= xs[-1]:  # beyond the outer rows: the nearest row, inside the grid only
                lo, hi = (min(extend), max(extend)) if extend is not None else (xs[0], xs[-1])
                if not lo - 1e-9 <= x <= hi + 1e-9:
                    continue
                k = 0 if x <= xs[0] else n - 1
                rows.append(i)
                cols.append(order[k])
                vals.append(1.0)
                continue
            k = int(np.searchsorted(xs, x, side="right") - 1)
            w = (x - xs[k]) / (xs[k + 1] - xs[k])
            a, b = order[k], order[k + 1]
        rows += [i, i]
        cols += [a, b]
        vals += [1.0 - w, w]
    return sp.csr_matrix((vals, (rows, cols)), shape=(x_dst.size, n))


def bilinear_weights(src: LatLonGrid, dst: LatLonGrid) -> sp.csr_matrix:
    """Separable bilinear weights: periodic in longitude for a global source; between the outermost
    source rows and the source grid's edges (a pole for a global grid) the nearest row; points outside a
    regional source get no weights."""
    edges = src.lat_edges()
    wlat = _linear_1d(src.lat, dst.lat, periodic=False, extend=(float(edges[0]), float(edges[-1])))
    if src.periodic:
        wlon = _linear_1d(np.mod(src.lon, 360.0), np.mod(dst.lon, 360.0), periodic=True)
    else:  # regional: interpolate in the source's own unwrapped longitudes
        slon = np.unwrap(src.lon, period=360.0)
        dlon = slon[0] + np.mod(dst.lon - slon[0], 360.0)
        le = src.lon_edges()
        wlon = _linear_1d(slon, dlon, periodic=False, extend=(float(le[0]), float(le[-1])))
    return sp.csr_matrix(sp.kron(wlat, wlon))


def esmpy_available() -> bool:
    try:
        import esmpy  # noqa: F401
    except ImportError:
        return False
    return True


class Regridder:
    """Sparse ``dst = W src`` between two grids of known shapes.

    Args:
        weights: ``(n_dst, n_src)`` sparse matrix.
        src_shape, dst_shape: ``(nlat, nlon)`` (or any shape whose product matches).
        method: description (``conservative``, ``bilinear``, or the file's ``map_method``).
    """

    def __init__(self, weights: sp.spmatrix, src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
                 method: str = "") -> None:
        W = sp.csr_matrix(weights)
        if W.shape != (int(np.prod(dst_shape)), int(np.prod(src_shape))):
            raise RegridError(f"weights shape {W.shape} does not match dst {dst_shape} x src {src_shape}")
        self.weights, self.src_shape, self.dst_shape, self.method = W, tuple(src_shape), tuple(dst_shape), method

    @classmethod
    def build(cls, src: LatLonGrid, dst: LatLonGrid, method: str = "conservative") -> Regridder:
        """Weights built here between lat-lon grids (``conservative`` or ``bilinear``)."""
        if method == "conservative":
            W = conservative_weights(src, dst)
        elif method == "bilinear":
            W = bilinear_weights(src, dst)
        else:
            raise RegridError(f"method must be 'conservative' or 'bilinear', got {method!r}")
        return cls(W, src.shape, dst.shape, method)

    @classmethod
    def from_esmpy(cls, src: LatLonGrid, dst: LatLonGrid, method: str = "conservative") -> Regridder:
        """Weights generated by esmpy (optional extra); raises ImportError saying so when it is missing."""
        if not esmpy_available():
            raise ImportError("esmpy is not installed (optional extra [esmf], conda-only); use Regridder.build(...) "
                              "or an ESMF weight file via Regridder.from_esmf_weights(...)")
        return cls(_esmpy_weights(src, dst, method), src.shape, dst.shape, f"esmpy {method}")  # pragma: no cover

    @classmethod
    def from_esmf_weights(cls, path: str | Path, src_shape: tuple[int, ...] | None = None,
                          dst_shape: tuple[int, ...] | None = None) -> Regridder:
        """Read an ESMF offline weight file (``row``, ``col``, ``S``, 1-based)."""
        import netCDF4

        path = Path(path)
        try:
            nc = netCDF4.Dataset(str(path))
        except (OSError, RuntimeError) as exc:
            raise RegridError(f"{path}: cannot be read as netCDF ({exc})") from exc
        with nc:
            missing = [v for v in ("row", "col", "S") if v not in nc.variables]
            if missing:
                raise RegridError(f"{path}: missing weight variable(s) {missing} (an ESMF weight file has row, col, S)")
            row = np.asarray(nc.variables["row"][:], dtype=np.int64)
            col = np.asarray(nc.variables["col"][:], dtype=np.int64)
            S = np.asarray(nc.variables["S"][:], dtype=np.float64)

            def dims(name: str) -> tuple[int, ...] | None:
                if name in nc.variables:
                    d = [int(v) for v in np.asarray(nc.variables[name][:])]
                    return tuple(reversed(d))  # ESMF stores [nlon, nlat]
                return None

            file_src, file_dst = dims("src_grid_dims"), dims("dst_grid_dims")
            n_a = len(nc.dimensions["n_a"]) if "n_a" in nc.dimensions else None
            n_b = len(nc.dimensions["n_b"]) if "n_b" in nc.dimensions else None
            frac_b = np.asarray(nc.variables["frac_b"][:], dtype=np.float64) if "frac_b" in nc.variables else None
            norm = str(getattr(nc, "normalization", "")).lower()
            method = str(getattr(nc, "map_method", ""))
        src_shape = _resolve_shape(path, "source", src_shape, file_src, n_a)
        dst_shape = _resolve_shape(path, "destination", dst_shape, file_dst, n_b)
        na, nb = int(np.prod(src_shape)), int(np.prod(dst_shape))
        if not (row.size == col.size == S.size):
            raise RegridError(f"{path}: row, col and S have different lengths ({row.size}, {col.size}, {S.size})")
        if row.size and (row.min() < 1 or row.max() > nb):
            raise RegridError(f"{path}: row indices {row.min()}..{row.max()} outside 1..{nb} (destination size)")
        if col.size and (col.min() < 1 or col.max() > na):
            raise RegridError(f"{path}: col indices {col.min()}..{col.max()} outside 1..{na} (source size)")
        if not np.isfinite(S).all():
            raise RegridError(f"{path}: weights S contain NaN/inf")
        W = sp.csr_matrix((S, (row - 1, col - 1)), shape=(nb, na))
        if norm == "destarea" and frac_b is not None:
            if frac_b.size != nb:
                raise RegridError(f"{path}: frac_b has {frac_b.size} entries, destination has {nb}")
            scale = np.where(frac_b > 0, 1.0 / np.where(frac_b > 0, frac_b, 1.0), 0.0)
            W = sp.csr_matrix(sp.diags(scale) @ W)
        return cls(W, src_shape, dst_shape, method)

    def __call__(self, src: NDArray[Any]) -> NDArray[np.float64]:
        """Regrid ``(..., *src_shape)`` to ``(..., *dst_shape)``; destination cells with no source get NaN."""
        src = np.asarray(src, dtype=np.float64)
        k = len(self.src_shape)
        if src.shape[src.ndim - k:] != self.src_shape:
            raise RegridError(f"input trailing shape {src.shape[src.ndim - k:]} != source grid {self.src_shape}")
        lead = src.shape[: src.ndim - k]
        flat = src.reshape(-1, int(np.prod(self.src_shape)))
        out = (self.weights @ flat.T).T
        covered = np.asarray(self.weights.getnnz(axis=1)) > 0
        out[:, ~covered] = np.nan  # never return silently unmapped values
        return out.reshape(*lead, *self.dst_shape)

    def to_esmf_weights(self, path: str | Path, src: LatLonGrid | None = None, dst: LatLonGrid | None = None) -> Path:
        """Write an ESMF-format weight file (1-based ``row``/``col``/``S``), temp file then rename."""
        import netCDF4

        path = Path(path)
        W = sp.coo_matrix(self.weights)
        tmp = path.with_name(path.name + ".tmp")
        with netCDF4.Dataset(str(tmp), "w") as nc:
            nb, na = W.shape
            nc.createDimension("n_s", W.nnz)
            nc.createDimension("n_a", na)
            nc.createDimension("n_b", nb)
            nc.createDimension("src_grid_rank", len(self.src_shape))
            nc.createDimension("dst_grid_rank", len(self.dst_shape))
            nc.createVariable("row", "i4", ("n_s",))[:] = W.row + 1
            nc.createVariable("col", "i4", ("n_s",))[:] = W.col + 1
            nc.createVariable("S", "f8", ("n_s",))[:] = W.data
            nc.createVariable("src_grid_dims", "i4", ("src_grid_rank",))[:] = list(reversed(self.src_shape))
            nc.createVariable("dst_grid_dims", "i4", ("dst_grid_rank",))[:] = list(reversed(self.dst_shape))
            nc.createVariable("frac_b", "f8", ("n_b",))[:] = np.asarray(self.weights.sum(axis=1)).ravel()
            for grid, tag in ((src, "a"), (dst, "b")):
                if grid is not None:
                    la, lo = np.meshgrid(grid.lat, grid.lon, indexing="ij")
                    nc.createVariable(f"yc_{tag}", "f8", (f"n_{tag}",))[:] = la.ravel()
                    nc.createVariable(f"xc_{tag}", "f8", (f"n_{tag}",))[:] = lo.ravel()
                    nc.createVariable(f"area_{tag}", "f8", (f"n_{tag}",))[:] = grid.areas().ravel()
            nc.map_method = self.method or "unknown"
            nc.normalization = "fracarea"
            nc.title = "wind-bmi regridding weights (ESMF offline weight file format)"
        os.replace(tmp, path)
        return path


def _esmpy_grid(esmpy: Any, g: LatLonGrid) -> Any:  # pragma: no cover - esmpy is conda-only
    """An ESMF grid (spherical degrees, periodic in longitude, poles) with centres and corners.

    ESMF indexes ``(lon, lat)`` with longitude fastest, so its 1-based sequence index minus one is
    our C-order ``(lat, lon)`` flat index.
    """
    grid = esmpy.Grid(np.array([g.lon.size, g.lat.size]), staggerloc=[esmpy.StaggerLoc.CENTER, esmpy.StaggerLoc.CORNER],
                      coord_sys=esmpy.CoordSys.SPH_DEG, num_peri_dims=1, periodic_dim=0, pole_dim=1)
    for stagger, lon, lat in ((esmpy.StaggerLoc.CENTER, g.lon, g.lat),
                              (esmpy.StaggerLoc.CORNER, g.lon_edges()[:-1], g.lat_edges())):
        x = grid.get_coords(0, staggerloc=stagger)
        y = grid.get_coords(1, staggerloc=stagger)
        x[...] = np.asarray(lon)[grid.lower_bounds[stagger][0]:grid.upper_bounds[stagger][0], None]
        y[...] = np.asarray(lat)[None, grid.lower_bounds[stagger][1]:grid.upper_bounds[stagger][1]]
    return grid


def _esmpy_weights(src: LatLonGrid, dst: LatLonGrid, method: str) -> sp.csr_matrix:  # pragma: no cover
    """Weights from ``esmpy.Regrid(..., factors=True)`` (single PET); untested here: esmpy is conda-only."""
    import esmpy

    methods = {"conservative": esmpy.RegridMethod.CONSERVE, "bilinear": esmpy.RegridMethod.BILINEAR}
    if method not in methods:
        raise RegridError(f"method must be one of {sorted(methods)}, got {method!r}")
    src_field = esmpy.Field(_esmpy_grid(esmpy, src), name="src")
    dst_field = esmpy.Field(_esmpy_grid(esmpy, dst), name="dst")
    regrid = esmpy.Regrid(src_field, dst_field, regrid_method=methods[method],
                          unmapped_action=esmpy.UnmappedAction.IGNORE, factors=True)
    index, factors = regrid.get_factors()
    W = sp.csr_matrix((np.asarray(factors, dtype=np.float64), (np.asarray(index[:, 1]) - 1, np.asarray(index[:, 0]) - 1)),
                      shape=(int(np.prod(dst.shape)), int(np.prod(src.shape))))
    regrid.destroy()
    return W


def _resolve_shape(path: Path, which: str, given: tuple[int, ...] | None, in_file: tuple[int, ...] | None,
                   n: int | None) -> tuple[int, ...]:
    if given is not None and in_file is not None and tuple(given) != in_file:
        raise RegridError(f"{path}: {which} shape {tuple(given)} given, file says {in_file}")
    shape = tuple(given) if given is not None else in_file
    if shape is None:
        if n is None:
            raise RegridError(f"{path}: no {which} grid shape in the file (no grid dims or n_a/n_b); pass it")
        shape = (n,)
    if n is not None and int(np.prod(shape)) != n:
        raise RegridError(f"{path}: {which} shape {shape} has {int(np.prod(shape))} cells, file says {n}")
    return shape
