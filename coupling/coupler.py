"""A two-component coupler in the spirit of pymt: BMI on both sides, no silent fallbacks.

The coupler reads each component's grids through BMI (rectilinear or uniform rectilinear lat-lon,
``[level,] lat, lon``), builds regridding weights between them (or reads an ESMF weight file),
converts time units (``h``, ``days``, or CF ``<unit> since <date>`` with the component's calendar:
dated clocks must agree on the date) and variable units, and alternates *exchange, then advance both to the next
coupling time with* ``update_until``. Anything it cannot do exactly -- an unknown time or
variable unit, a coupling interval that is not a multiple of a component's time step, a grid it
cannot read as lat-lon, a level that does not exist -- raises :class:`CouplerError` naming the
component and variable.

    coupler = Coupler({"wind": wind, "ocean": ocean}, [
        Exchange("wind", "atmosphere_air__temperature", "ocean", "atmosphere_bottom_air__temperature", level=0.95),
        Exchange("ocean", "sea_surface_air__temperature", "wind", "atmosphere_air__host_grid_observed_value_of_temperature"),
    ], interval_seconds=86400.0)
    coupler.run(10 * 86400.0)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import cftime
import numpy as np
from numpy.typing import NDArray

from wind_bmi.regrid import LatLonGrid, Regridder, RegridError

SECONDS_PER_UNIT = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "min": 60.0, "minute": 60.0,
                    "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
                    "d": 86400.0, "day": 86400.0, "days": 86400.0}

# (from, to) -> (scale, offset): to = from * scale + offset
UNIT_CONVERSIONS = {("K", "degC"): (1.0, -273.15), ("degC", "K"): (1.0, 273.15),
                    ("Pa", "hPa"): (0.01, 0.0), ("hPa", "Pa"): (100.0, 0.0),
                    ("m s-1", "mm d-1"): (8.64e7, 0.0), ("mm d-1", "m s-1"): (1 / 8.64e7, 0.0),
                    ("m s-1", "mm h-1"): (3.6e6, 0.0), ("mm h-1", "m s-1"): (1 / 3.6e6, 0.0)}


class CouplerError(ValueError):
    """A coupling the coupler cannot do exactly (units, grids, time steps)."""


@dataclasses.dataclass(frozen=True)
class Exchange:
    """Copy ``src_var`` of component ``source`` into ``dst_var`` of component ``target`` at every coupling time.

    Attributes:
        method: ``conservative`` or ``bilinear`` (weights built here), or the path of an ESMF weight file.
        level: for a source variable on a ``(level, lat, lon)`` grid, the level coordinate to take.
    """

    source: str
    src_var: str
    target: str
    dst_var: str
    method: str = "conservative"
    level: float | None = None


@dataclasses.dataclass(frozen=True)
class GridInfo:
    """A BMI grid read as lat-lon: the horizontal grid and the level coordinates (empty for rank 2)."""

    latlon: LatLonGrid
    levels: NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class Clock:
    """A component's time axis: seconds per unit, and for CF ``<unit> since <date>`` units the reference
    date (a ``cftime`` datetime in the component's calendar), else None (a relative clock)."""

    seconds_per_unit: float
    reference: Any = None

    def date_at(self, value: float) -> Any:
        """The date of time ``value`` on this clock (None for a relative clock)."""
        if self.reference is None:
            return None
        return self.reference + dt.timedelta(seconds=float(value) * self.seconds_per_unit)


def component_clock(bmi: Any, name: str) -> Clock:
    """Read ``get_time_units()`` (``h``, ``days`` ... or CF ``hours since 1900-01-01 00:00:0.0``) and the
    calendar (``get_calendar()`` where the component has it, CF's ``standard`` otherwise)."""
    units = str(bmi.get_time_units()).strip()
    unit, _, since = units.partition(" since ")
    unit = unit.strip()
    if unit not in SECONDS_PER_UNIT:
        raise CouplerError(f"component {name!r}: time units {units!r} not understood; expected one of "
                           f"{sorted(SECONDS_PER_UNIT)}, optionally as CF '<unit> since <date>'")
    if not since:
        return Clock(SECONDS_PER_UNIT[unit])
    calendar = str(bmi.get_calendar()) if callable(getattr(bmi, "get_calendar", None)) else "standard"
    try:
        reference = cftime.num2date(0.0, f"{unit} since {since.strip()}", calendar=calendar)
    except (ValueError, TypeError) as exc:
        raise CouplerError(f"component {name!r}: time units {units!r} (calendar {calendar!r}) are not CF "
                           f"time units: {exc}") from exc
    return Clock(SECONDS_PER_UNIT[unit], reference)


GREGORIAN = {"standard", "gregorian", "proleptic_gregorian"}  # identical after 1582-10-15


def _seconds_between(a: Any, b: Any) -> float | None:
    """``a - b`` in seconds for dates of the same calendar, or of two Gregorian ones; None otherwise."""
    if a.calendar != b.calendar:
        if not {a.calendar, b.calendar} <= GREGORIAN:
            return None
        a, b = (cftime.datetime(*d.timetuple()[:6], calendar="proleptic_gregorian") for d in (a, b))
    return float((a - b).total_seconds())


def _coords(getter: Any, grid: int, size: int) -> NDArray[np.float64] | None:
    """A BMI coordinate getter's values, or None where the component does not provide them."""
    try:
        return np.asarray(getter(grid, np.empty(size)), dtype=np.float64)
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return None


def read_grid(bmi: Any, name: str, var: str) -> GridInfo:
    """The lat-lon grid of ``var`` through BMI (rank 2 ``lat, lon`` or rank 3 ``level, lat, lon``).

    ``rectilinear``: the coordinates ``get_grid_y/x/z``. ``uniform_rectilinear``: origin and spacing (the
    coordinates of node 0 and the signed step along each axis); where the component also reports
    coordinates they must agree, so a host whose rows run north to south is read as such, never flipped.
    ``structured_quadrilateral``: node coordinates that separate into one latitude per row and one
    longitude per column. Anything else, or coordinates that contradict each other, is refused.
    """
    grid = bmi.get_var_grid(var)
    gtype, rank = bmi.get_grid_type(grid), bmi.get_grid_rank(grid)
    where = f"component {name!r}, variable {var!r} (grid {grid}, {gtype}, rank {rank})"
    if rank not in (2, 3):
        raise CouplerError(f"{where}: expected a rank-2 (lat, lon) or rank-3 (level, lat, lon) grid")
    shape = [int(v) for v in bmi.get_grid_shape(grid, np.zeros(rank, dtype=int))]
    ny, nx = shape[-2], shape[-1]
    levels: NDArray[np.float64] = np.zeros(0)
    if gtype == "rectilinear":
        lat, lon = _coords(bmi.get_grid_y, grid, ny), _coords(bmi.get_grid_x, grid, nx)
        if lat is None or lon is None:
            raise CouplerError(f"{where}: a rectilinear grid must report get_grid_y and get_grid_x")
        if rank == 3:
            z = _coords(bmi.get_grid_z, grid, shape[0])
            levels = np.zeros(0) if z is None else z
    elif gtype == "uniform_rectilinear":
        spacing = np.asarray(bmi.get_grid_spacing(grid, np.empty(rank)), dtype=np.float64)
        origin = np.asarray(bmi.get_grid_origin(grid, np.empty(rank)), dtype=np.float64)
        lat = origin[-2] + spacing[-2] * np.arange(ny)
        lon = origin[-1] + spacing[-1] * np.arange(nx)
        if rank == 3:
            levels = origin[0] + spacing[0] * np.arange(shape[0])
        for axis, computed, getter, n in (("y", lat, bmi.get_grid_y, ny), ("x", lon, bmi.get_grid_x, nx)):
            reported = _coords(getter, grid, n)
            if reported is not None and not np.allclose(reported, computed, atol=1e-6 * max(1.0, np.abs(computed).max())):
                raise CouplerError(f"{where}: get_grid_{axis} reports {reported[:2].tolist()}... but origin + spacing "
                                   f"give {computed[:2].tolist()}...: the grid's orientation is ambiguous")
    elif gtype == "structured_quadrilateral":
        y, x = _coords(bmi.get_grid_y, grid, ny * nx), _coords(bmi.get_grid_x, grid, ny * nx)
        if y is None or x is None:
            raise CouplerError(f"{where}: a structured grid must report its node coordinates")
        y2, x2 = y.reshape(ny, nx), x.reshape(ny, nx)
        if not (np.allclose(y2, y2[:, :1]) and np.allclose(x2, x2[:1, :])):
            raise CouplerError(f"{where}: a curvilinear grid (latitude varying along rows or longitude along "
                               f"columns) cannot be coupled; supply ESMF weights for it")
        lat, lon = y2[:, 0], x2[0, :]
    else:
        raise CouplerError(f"{where}: only rectilinear, uniform_rectilinear and separable structured_quadrilateral "
                           f"lat-lon grids can be coupled")
    try:
        return GridInfo(LatLonGrid(lat, lon), np.asarray(levels, dtype=np.float64))
    except RegridError as exc:
        raise CouplerError(f"{where}: not a lat-lon grid in degrees ({exc})") from exc


def unit_conversion(src_units: str, dst_units: str, where: str) -> tuple[float, float]:
    if src_units == dst_units:
        return 1.0, 0.0
    if (src_units, dst_units) in UNIT_CONVERSIONS:
        return UNIT_CONVERSIONS[(src_units, dst_units)]
    raise CouplerError(f"{where}: no conversion from {src_units!r} to {dst_units!r} (known: "
                       f"{sorted(UNIT_CONVERSIONS)})")


class _Link:
    """One prepared exchange: level index, regridder (``None`` = same grid), unit conversion."""

    def __init__(self, ex: Exchange, comps: Mapping[str, Any]) -> None:
        for key in (ex.source, ex.target):
            if key not in comps:
                raise CouplerError(f"exchange {ex.src_var!r} -> {ex.dst_var!r}: no component named {key!r}")
        src, dst = comps[ex.source], comps[ex.target]
        if ex.src_var not in src.get_output_var_names():
            raise CouplerError(f"component {ex.source!r} has no output variable {ex.src_var!r}")
        if ex.dst_var not in dst.get_input_var_names():
            raise CouplerError(f"component {ex.target!r} has no input variable {ex.dst_var!r}")
        self.ex = ex
        where = f"exchange {ex.source}.{ex.src_var} -> {ex.target}.{ex.dst_var}"
        sg, dg = read_grid(src, ex.source, ex.src_var), read_grid(dst, ex.target, ex.dst_var)
        if dg.levels.size:
            raise CouplerError(f"{where}: the destination must be a 2-D (lat, lon) field")
        self.level: int | None = None
        if sg.levels.size:
            if ex.level is None:
                raise CouplerError(f"{where}: the source has levels {sg.levels.tolist()}; say which with level=")
            hit = np.flatnonzero(np.isclose(sg.levels, ex.level, rtol=0, atol=1e-6))
            if hit.size != 1:
                raise CouplerError(f"{where}: level {ex.level} is not one of {sg.levels.tolist()}")
            self.level = int(hit[0])
        elif ex.level is not None:
            raise CouplerError(f"{where}: level={ex.level} given but the source is a 2-D field")
        self.src_shape = ((int(sg.levels.size),) if sg.levels.size else ()) + sg.latlon.shape
        self.dst_size = int(np.prod(dg.latlon.shape))
        same = (sg.latlon.shape == dg.latlon.shape and np.allclose(sg.latlon.lat, dg.latlon.lat)
                and np.allclose(np.mod(sg.latlon.lon, 360), np.mod(dg.latlon.lon, 360)))
        self.regrid: Regridder | None
        try:
            if same and ex.method in ("conservative", "bilinear"):
                self.regrid = None
            elif ex.method in ("conservative", "bilinear"):
                self.regrid = Regridder.build(sg.latlon, dg.latlon, ex.method)
            else:
                self.regrid = Regridder.from_esmf_weights(ex.method, sg.latlon.shape, dg.latlon.shape)
        except RegridError as exc:
            raise CouplerError(f"{where}: {exc}") from exc
        self.scale, self.offset = unit_conversion(src.get_var_units(ex.src_var), dst.get_var_units(ex.dst_var), where)
        self.buf = np.empty(int(np.prod(self.src_shape)))

    def transfer(self, comps: Mapping[str, Any]) -> NDArray[np.float64]:
        ex = self.ex
        field = comps[ex.source].get_value(ex.src_var, self.buf).reshape(self.src_shape)
        if self.level is not None:
            field = field[self.level]
        out = field if self.regrid is None else self.regrid(field)
        values = np.asarray(out, dtype=np.float64).reshape(-1) * self.scale + self.offset
        comps[ex.target].set_value(ex.dst_var, values)
        return values


class Coupler:
    """Step two (or more) initialized BMI components together and exchange fields between them.

    Args:
        components: name -> initialized BMI component.
        exchanges: what goes where, applied in order at every coupling time (before stepping).
        interval_seconds: coupling interval; a multiple of every component's time step.
    """

    def __init__(self, components: Mapping[str, Any], exchanges: Sequence[Exchange], interval_seconds: float) -> None:
        if interval_seconds <= 0:
            raise CouplerError(f"interval_seconds must be positive, got {interval_seconds}")
        self.components = dict(components)
        self.interval = float(interval_seconds)
        self.clock = {n: component_clock(c, n) for n, c in self.components.items()}
        self.unit = {n: clk.seconds_per_unit for n, clk in self.clock.items()}
        for name, comp in self.components.items():
            step = comp.get_time_step() * self.unit[name]
            ratio = self.interval / step
            if step <= 0 or abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
                raise CouplerError(f"component {name!r}: coupling interval {self.interval} s is not a multiple of its "
                                   f"time step {step} s")
        self.start = {n: c.get_current_time() for n, c in self.components.items()}
        # components with CF reference dates must stand at the same date (to the second) to be coupled
        dates = {n: self.clock[n].date_at(self.start[n]) for n in self.components}
        dated = {n: d for n, d in dates.items() if d is not None}
        if len(dated) > 1:
            first_name, first = next(iter(dated.items()))
            for n, d in dated.items():
                gap = _seconds_between(d, first)
                if gap is None:
                    raise CouplerError(f"component {n!r} uses the {d.calendar!r} calendar and component "
                                       f"{first_name!r} the {first.calendar!r} calendar: their dates cannot be matched")
                if abs(gap) > 1.0:
                    raise CouplerError(f"component {n!r} is at {d} but component {first_name!r} at {first}: "
                                       f"their clocks must show the same date to be coupled")
        self.start_date = next(iter(dated.values()), None)
        self.links = [_Link(ex, self.components) for ex in exchanges]
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []

    def time_of(self, name: str) -> float:
        """Seconds since the coupler started, as component ``name``'s clock says."""
        return (self.components[name].get_current_time() - self.start[name]) * self.unit[name]

    def step(self) -> None:
        """Exchange all fields, then advance every component by one coupling interval."""
        record: dict[str, Any] = {"seconds": self.elapsed}
        for link in self.links:
            values = link.transfer(self.components)
            record[f"{link.ex.target}.{link.ex.dst_var}"] = float(np.nanmean(values)) if np.isfinite(values).any() \
                else float("nan")
        self.elapsed += self.interval
        for name, comp in self.components.items():
            comp.update_until(self.start[name] + self.elapsed / self.unit[name])
            if abs(self.time_of(name) - self.elapsed) > 1e-6 * max(1.0, self.elapsed):
                raise CouplerError(f"component {name!r} is at {self.time_of(name)} s after update_until, "
                                   f"expected {self.elapsed} s")
        self.history.append(record)

    def run(self, seconds: float) -> list[dict[str, Any]]:
        """Couple for ``seconds`` (a multiple of the interval); returns one record per coupling step."""
        n = seconds / self.interval
        if abs(n - round(n)) > 1e-9:
            raise CouplerError(f"run length {seconds} s is not a multiple of the coupling interval {self.interval} s")
        for _ in range(round(n)):
            self.step()
        return self.history
