"""``WindBmi``: the BMI 2.0 adapter. It only translates names, units, grids and flat arrays.

State, clock and sampling live in :class:`wind_bmi.component.WindComponent`.

Variables (CSDMS names; the full table is in docs/bmi.md):

* outputs (ensemble mean at the current time): ``atmosphere_air__temperature`` ... on grid 0
  (rank 3: sigma level, latitude ascending, longitude) or grid 1 (rank 2: latitude, longitude);
  ``<object>__ensemble_standard_deviation_of_<quantity>`` (ddof 1) on the same grids;
  ``<object>__ensemble_members_of_<quantity>`` on the unstructured grids 5/6 (one node per member and
  cell, C order ``(member, [level,] lat, lon)``). Derived names follow the CSDMS operation template
  ``<object>__<operation>_of_<quantity>`` (``wind_bmi.variables.OPERATIONS``).
* inputs: every state variable (``set_value`` replaces the newest clean frame of all members);
  observed twins ``<object>__observed_value_of_<quantity>`` (NaN = unobserved; valid at the end of the next
  ``update``); coarse twins ``<object>__coarse_mean_of_<quantity>`` on grids 2/3 (4x coarser area means);
  scalar targets on grid 4; with ``host_grid`` in the config, host-grid twins
  ``<object>__host_grid_observed_value_of_<quantity>`` on grid 7 (the host's lat-lon grid; NaN = unobserved),
  assimilated through the regridding weights as ``y = W x`` (3-D variables: one sigma level).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bmipy import Bmi
from numpy.typing import NDArray

from wind_bmi.component import ComponentError, WindComponent
from wind_bmi.config import BmiConfig, ConfigError, from_dict, load_config
from wind_bmi.variables import STATE_VARIABLES, VARIABLES, derived_name

GRID_3D, GRID_2D, GRID_3D_COARSE, GRID_2D_COARSE, GRID_SCALAR, GRID_MEMBERS_3D, GRID_MEMBERS_2D, GRID_HOST = range(8)

LOG = logging.getLogger("wind_bmi")

BMI_UNITS = {"precipitation": ("m s-1", 1e-3)}  # leq volume flux: kg m-2 s-1 / 1000 kg m-3

SCALAR_TARGETS = {
    "atmosphere_dry_air__target_value_of_mass": ("dry_air_mass", "kg"),
    "atmosphere_air__target_value_of_domain_mean_increment_of_temperature": ("warming_kelvin", "K"),
    "atmosphere_air_water~vapor__target_value_of_domain_mean_relative_increment_of_specific_saturation":
        ("humidity_percent", "percent"),
}


@dataclasses.dataclass(frozen=True)
class VarSpec:
    """One BMI variable: project variable, role, grid, units and scale (BMI = project * scale)."""

    name: str
    variable: str
    role: str  # state | spread | members | observed | coarse | scalar | host_observed
    grid: int
    units: str
    scale: float = 1.0


def build_variable_table() -> dict[str, VarSpec]:
    table: dict[str, VarSpec] = {}
    for var in STATE_VARIABLES:
        info = VARIABLES[var]
        units, scale = BMI_UNITS.get(var, (info.units, 1.0))
        g, gc, gm = (GRID_3D, GRID_3D_COARSE, GRID_MEMBERS_3D) if info.levels else \
            (GRID_2D, GRID_2D_COARSE, GRID_MEMBERS_2D)
        table[info.csdms] = VarSpec(info.csdms, var, "state", g, units, scale)
        for word, grid in (("spread", g), ("members", gm), ("observed", g), ("coarse", gc)):
            name = derived_name(info.csdms, word)
            table[name] = VarSpec(name, var, word, grid, units, scale)
    for name, (key, units) in SCALAR_TARGETS.items():
        table[name] = VarSpec(name, key, "scalar", GRID_SCALAR, units)
    for name, units in DIAGNOSTICS.items():
        table[name] = VarSpec(name, "whitened_residual", "diagnostic", GRID_SCALAR, units)
    return table


def host_variable_table() -> dict[str, VarSpec]:
    """Inputs on the host grid (grid 7), present when the config has ``host_grid``."""
    table = {}
    for var in STATE_VARIABLES:
        info = VARIABLES[var]
        units, scale = BMI_UNITS.get(var, (info.units, 1.0))
        name = derived_name(info.csdms, "host_observed")
        table[name] = VarSpec(name, var, "host_observed", GRID_HOST, units, scale)
    return table


# diagnostics of the last window (scalar grid): how well the guided window honours what it was told
DIAGNOSTICS = {"model_guidance__max_of_whitened_residual": "1"}

VARIABLE_TABLE = build_variable_table()
HOST_VARIABLE_TABLE = host_variable_table()
OUTPUT_ROLES = ("state", "spread", "members", "diagnostic")
INPUT_ROLES = ("state", "observed", "coarse", "scalar", "host_observed")


def get_time_units_of(comp: WindComponent) -> str:
    """``hours since YYYY-MM-DD HH:MM:SS`` of the component's initial time."""
    return f"hours since {comp.start_datetime.strftime('%Y-%m-%d %H:%M:%S')}"


class WindBmi(Bmi):
    """WIND as a BMI 2.0 component (``initialize`` / ``update`` / ``finalize``)."""

    METADATA = str(Path(__file__).parent / "metadata")
    _name = "WIND: Weather Inverse Diffusion (zero-shot guided video-diffusion atmosphere)"

    def __init__(self) -> None:
        self._c: WindComponent | None = None
        self._finalized = False
        self._out: dict[str, NDArray[np.float64]] = {}

    # -- helpers -------------------------------------------------------------------
    @property
    def _comp(self) -> WindComponent:
        if self._c is None:
            state = "finalized" if self._finalized else "not initialized"
            raise RuntimeError(f"WindBmi is {state}: call initialize(config_file) first")
        return self._c

    @property
    def _table(self) -> dict[str, VarSpec]:
        if self._c is not None and self._c.host_grid is not None:
            return {**VARIABLE_TABLE, **HOST_VARIABLE_TABLE}
        return VARIABLE_TABLE

    def _spec(self, name: str) -> VarSpec:
        try:
            return self._table[name]
        except KeyError:
            raise KeyError(f"unknown variable {name!r}; see get_input_var_names()/get_output_var_names()") from None

    def _grid_shape(self, grid: int) -> tuple[int, ...]:
        c = self._comp
        k = c.downscale_factor
        return {
            GRID_3D: (c.K, c.H, c.W), GRID_2D: (c.H, c.W), GRID_3D_COARSE: (c.K, c.H // k, c.W // k),
            GRID_2D_COARSE: (c.H // k, c.W // k), GRID_SCALAR: (1,),
            GRID_MEMBERS_3D: (c.cfg.members * c.K * c.H * c.W,), GRID_MEMBERS_2D: (c.cfg.members * c.H * c.W,),
            GRID_HOST: c.host_grid.shape if c.host_grid is not None else (0, 0),
        }[grid]

    def _check_grid(self, grid: int) -> None:
        n = 8 if self._comp.host_grid is not None else 7
        if grid not in range(n):
            raise KeyError(f"unknown grid id {grid}; grids are 0..{n - 1}")

    def _compute(self, spec: VarSpec) -> NDArray[np.float64]:
        c = self._comp
        if spec.role == "scalar":
            return np.array([c.target(spec.variable)], dtype=np.float64)
        if spec.role == "diagnostic":  # the largest over the window's operators; NaN after an unguided window
            values = [r["whitened_residual"] for r in c.report]
            return np.array([max(values) if values else np.nan], dtype=np.float64)
        if spec.role in ("observed", "coarse", "host_observed"):
            pending = c.pending_input(spec.role, spec.variable)
            size = int(np.prod(self._grid_shape(spec.grid)))
            return np.full(size, np.nan) if pending is None else pending.reshape(-1) * spec.scale
        return c.field(spec.role, spec.variable).astype(np.float64).reshape(-1) * spec.scale

    def _refresh_outputs(self) -> None:
        for name, buf in self._out.items():
            buf[...] = self._compute(self._table[name])

    # -- initialize / run / finalize --------------------------------------------------
    def initialize(self, config_file: str | None = None) -> None:
        """Read a YAML config (``kind: bmi``); an empty string uses the shipped model and sample."""
        if config_file:
            cfg = load_config(config_file, BmiConfig)
        else:
            cfg = from_dict(BmiConfig, {}, "<defaults>")
        self.initialize_config(cfg, config_file or "<defaults>")

    def initialize_config(self, cfg: BmiConfig, source: str = "<config>") -> None:
        """Initialize from a config object (``source`` names it in errors: the user's file)."""
        try:
            comp = WindComponent(cfg)
        except ComponentError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        self._c = comp
        self._finalized = False
        self._out = {}

    def update(self) -> None:
        c = self._comp
        c.advance()
        for r in c.report:  # one line per operator: a whitened residual near 1 fits to its error
            LOG.info("window ending %g h: %s (%d values) whitened residual %.2f", c.time_hours, r["name"],
                     r["entries"], r["whitened_residual"])
        self._refresh_outputs()

    def update_until(self, time: float) -> None:
        """Advance window by window until ``time``, which must be a window boundary.

        The component advances in whole windows of ``get_time_step()`` hours (one guided diffusion
        window cannot stop part-way), so a time between boundaries is refused with the boundaries on
        either side named, before anything runs; the state stays as it was.
        """
        c = self._comp
        if time < c.time_hours - 1e-9:
            raise ValueError(f"update_until: time {time} h is before the current time {c.time_hours} h")
        n = (time - c.time_hours) / c.step_hours
        if abs(n - round(n)) > 1e-9:
            before = c.time_hours + math.floor(n) * c.step_hours
            raise ValueError(f"update_until: time {time} h is not a window boundary; the component advances in "
                             f"windows of {c.step_hours:g} h ({get_time_units_of(c)}): use {before:g} or "
                             f"{before + c.step_hours:g}")
        for _ in range(round(n)):
            self.update()

    def finalize(self) -> None:
        self._c = None
        self._out = {}
        self._finalized = True

    # -- info ----------------------------------------------------------------------------
    def get_component_name(self) -> str:
        return self._name

    def get_input_item_count(self) -> int:
        return len(self.get_input_var_names())

    def get_output_item_count(self) -> int:
        return len(self.get_output_var_names())

    def get_input_var_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(n for n, s in self._table.items() if s.role in INPUT_ROLES)

    def get_output_var_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(n for n, s in self._table.items() if s.role in OUTPUT_ROLES)

    # -- variables -------------------------------------------------------------------------
    def get_var_grid(self, name: str) -> int:
        return self._spec(name).grid

    def get_var_type(self, name: str) -> str:
        self._spec(name)
        return "float64"

    def get_var_units(self, name: str) -> str:
        return self._spec(name).units

    def get_var_itemsize(self, name: str) -> int:
        self._spec(name)
        return 8

    def get_var_nbytes(self, name: str) -> int:
        return 8 * int(np.prod(self._grid_shape(self._spec(name).grid)))

    def get_var_location(self, name: str) -> str:
        self._spec(name)
        return "node"

    # -- time ----------------------------------------------------------------------------
    def get_current_time(self) -> float:
        return float(self._comp.time_hours)

    def get_start_time(self) -> float:
        return 0.0

    def get_end_time(self) -> float:
        return float(self._comp.cfg.run_hours)

    def get_time_units(self) -> str:
        """CF time units with the reference date: ``hours since <initial time>`` (start time 0.0)."""
        return get_time_units_of(self._comp)

    def get_calendar(self) -> str:
        """The CF calendar of the clock (e.g. ``proleptic_gregorian``), as the initial condition's time axis
        has it; with :meth:`get_time_units` a coupler turns any time into a date with ``cftime.num2date``."""
        return str(self._comp.calendar)

    def get_time_step(self) -> float:
        return float(self._comp.step_hours)

    # -- getters/setters -------------------------------------------------------------------
    def get_value(self, name: str, dest: NDArray[Any]) -> NDArray[Any]:
        src = self._compute(self._spec(name))
        if dest.size != src.size:
            raise ValueError(f"get_value({name!r}): dest has {dest.size} elements, expected {src.size}")
        dest[:] = src
        return dest

    def get_value_ptr(self, name: str) -> NDArray[Any]:
        spec = self._spec(name)
        if spec.role not in ("state", "spread", "members"):
            raise ValueError(f"get_value_ptr({name!r}): only output variables have a live buffer")
        if name not in self._out:
            self._out[name] = self._compute(spec)
        return self._out[name]

    def get_value_at_indices(self, name: str, dest: NDArray[Any], inds: NDArray[np.int_]) -> NDArray[Any]:
        src = self._compute(self._spec(name))
        inds = self._check_indices(name, inds, src.size)
        dest[:] = src[inds]
        return dest

    def _check_indices(self, name: str, inds: Any, size: int) -> NDArray[np.int64]:
        arr = np.asarray(inds)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name}: indices must be integers, got dtype {arr.dtype}")
        arr = arr.reshape(-1).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= size):
            raise IndexError(f"{name}: indices must lie in 0..{size - 1}, got range {arr.min()}..{arr.max()}")
        return arr

    def _check_values(self, name: str, values: Any, size: int) -> NDArray[np.float64]:
        arr = np.asarray(values)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name}: values must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64).reshape(-1)
        if arr.size != size:
            raise ValueError(f"{name}: expected {size} values, got {arr.size}")
        return arr

    def set_value(self, name: str, src: NDArray[Any]) -> None:
        spec = self._spec(name)
        if spec.role not in INPUT_ROLES:
            raise KeyError(f"{name!r} is an output only; inputs are get_input_var_names()")
        size = int(np.prod(self._grid_shape(spec.grid)))
        self._apply(spec, self._check_values(name, src, size))

    def set_value_at_indices(self, name: str, inds: NDArray[np.int_], src: NDArray[Any]) -> None:
        spec = self._spec(name)
        if spec.role not in INPUT_ROLES:
            raise KeyError(f"{name!r} is an output only; inputs are get_input_var_names()")
        size = int(np.prod(self._grid_shape(spec.grid)))
        idx = self._check_indices(name, inds, size)
        vals = self._check_values(name, src, idx.size)
        current = self._compute(spec)
        current[idx] = vals
        self._apply(spec, current)

    def _apply(self, spec: VarSpec, values: NDArray[np.float64]) -> None:
        """Validate fully, then commit: the component is unchanged when this raises."""
        c = self._comp
        phys = values / spec.scale
        if spec.role in ("state", "coarse"):
            if not np.isfinite(phys).all():
                raise ValueError(f"{spec.name}: NaN/inf not allowed (a value is required at every cell)")
        elif spec.role in ("observed", "host_observed"):
            if np.isinf(phys).any():
                raise ValueError(f"{spec.name}: inf not allowed (NaN marks unobserved cells)")
        elif spec.role == "scalar":
            if np.isinf(phys).any() or (spec.variable != "dry_air_mass" and not np.isfinite(phys).all()):
                raise ValueError(f"{spec.name}: expected a finite number (NaN allowed only for the dry-mass target)")
            if spec.variable == "dry_air_mass" and np.isfinite(phys[0]) and phys[0] <= 0:
                raise ValueError(f"{spec.name}: dry air mass must be positive kg, got {phys[0]}")
        if spec.role == "host_observed":
            try:
                c.set_host_observed(spec.variable, phys)
            except ComponentError as exc:
                raise ValueError(f"{spec.name}: {exc}") from exc
            self._refresh_outputs()
            return
        setter: Callable[[str, NDArray[Any]], None] = {
            "state": c.set_state, "observed": c.set_observed, "coarse": c.set_coarse,
        }.get(spec.role, lambda v, a: c.set_target(v, float(a[0])))
        setter(spec.variable, phys.astype(np.float32) if spec.role != "scalar" else phys)
        self._refresh_outputs()

    # -- grids -----------------------------------------------------------------------------
    def get_grid_rank(self, grid: int) -> int:
        self._check_grid(grid)
        return {GRID_3D: 3, GRID_3D_COARSE: 3, GRID_2D: 2, GRID_2D_COARSE: 2, GRID_SCALAR: 0, GRID_HOST: 2,
                GRID_MEMBERS_3D: 3, GRID_MEMBERS_2D: 2}[grid]

    def get_grid_size(self, grid: int) -> int:
        self._check_grid(grid)
        return int(np.prod(self._grid_shape(grid)))

    def get_grid_type(self, grid: int) -> str:
        self._check_grid(grid)
        if grid == GRID_SCALAR:
            return "scalar"
        # every member's value sits at its cell's (lon, lat[, sigma]): an unstructured grid of nodes only
        # (a point set, no edges or faces) whose node i is the
        # i-th value of the flat C-order (member, [level,] lat, lon) array, so a coupler or plot puts it
        # where it belongs (the members of a cell share its coordinates)
        if grid in (GRID_MEMBERS_3D, GRID_MEMBERS_2D):
            return "unstructured"  # nodes only: no edges, no faces
        return "rectilinear"

    def get_grid_shape(self, grid: int, shape: NDArray[np.int_]) -> NDArray[np.int_]:
        self._check_grid(grid)
        s = self._grid_shape(grid) if grid != GRID_SCALAR else ()
        shape[: len(s)] = s
        return shape

    def _coords(self, grid: int) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        c = self._comp
        if grid in (GRID_MEMBERS_3D, GRID_MEMBERS_2D):
            lat, lon = c.model.lat.numpy(), c.model.lon.numpy()
            shape = (c.cfg.members, c.K, c.H, c.W) if grid == GRID_MEMBERS_3D else (c.cfg.members, c.H, c.W)
            z = np.asarray(c.levels, dtype=np.float64)
            x = np.broadcast_to(lon, shape).reshape(-1)
            y = np.broadcast_to(lat[:, None], shape).reshape(-1)
            zz = np.broadcast_to(z[:, None, None], shape).reshape(-1) if grid == GRID_MEMBERS_3D else np.zeros(0)
            return x, y, zz
        if grid == GRID_HOST and c.host_grid is not None:
            return c.host_grid.lon, c.host_grid.lat, np.zeros(0)
        lat, lon = c.model.lat.numpy(), c.model.lon.numpy()
        if grid in (GRID_3D_COARSE, GRID_2D_COARSE):
            k = c.downscale_factor
            lat = lat.reshape(-1, k).mean(axis=1)
            lon = lon.reshape(-1, k).mean(axis=1)
        return lon, lat, np.asarray(c.levels, dtype=np.float64)

    def _fill_coord(self, grid: int, dest: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
        self._check_grid(grid)
        values = self._coords(grid)[axis]
        dest[: values.size] = values
        return dest

    def get_grid_x(self, grid: int, x: NDArray[np.float64]) -> NDArray[np.float64]:
        return self._fill_coord(grid, x, 0)

    def get_grid_y(self, grid: int, y: NDArray[np.float64]) -> NDArray[np.float64]:
        return self._fill_coord(grid, y, 1)

    def get_grid_z(self, grid: int, z: NDArray[np.float64]) -> NDArray[np.float64]:
        return self._fill_coord(grid, z, 2)

    def get_grid_spacing(self, grid: int, spacing: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError("rectilinear grids have no uniform spacing; use get_grid_x/y/z")

    def get_grid_origin(self, grid: int, origin: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError("rectilinear grids have no origin; use get_grid_x/y/z")

    def get_grid_node_count(self, grid: int) -> int:
        return self.get_grid_size(grid)

    def _point_set(self, grid: int) -> None:
        """The member grids are point sets (no edges or faces); other grids have no connectivity at all."""
        if self.get_grid_type(grid) != "unstructured":
            raise NotImplementedError(f"grid {grid} is {self.get_grid_type(grid)}: edges and faces are defined "
                                      f"for unstructured grids only")

    def get_grid_edge_count(self, grid: int) -> int:
        self._point_set(grid)
        return 0

    def get_grid_face_count(self, grid: int) -> int:
        self._point_set(grid)
        return 0

    def get_grid_edge_nodes(self, grid: int, edge_nodes: NDArray[np.int_]) -> NDArray[np.int_]:
        self._point_set(grid)
        return edge_nodes

    def get_grid_face_edges(self, grid: int, face_edges: NDArray[np.int_]) -> NDArray[np.int_]:
        self._point_set(grid)
        return face_edges

    def get_grid_face_nodes(self, grid: int, face_nodes: NDArray[np.int_]) -> NDArray[np.int_]:
        self._point_set(grid)
        return face_nodes

    def get_grid_nodes_per_face(self, grid: int, nodes_per_face: NDArray[np.int_]) -> NDArray[np.int_]:
        self._point_set(grid)
        return nodes_per_face

    # -- extras (not BMI) -------------------------------------------------------------------------
    def save_restart(self, path: str) -> None:
        """Write a restart file; ``restart_file: PATH`` in the config resumes from it."""
        self._comp.save_restart(path)

    @property
    def model_card(self) -> dict[str, Any]:
        """The prior's card (name, weights checksum, training record): provenance for outputs."""
        return dict(self._comp.model.card)

    @property
    def component(self) -> WindComponent:
        return self._comp
