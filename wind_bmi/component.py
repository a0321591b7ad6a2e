"""The stateful WIND component: ensemble state, clock, pending observations, output writer.

:class:`WindComponent` knows physical arrays and the model facade; it knows nothing of BMI names
(the adapter in :mod:`wind_bmi.bmi` translates). One :meth:`advance` = one guided
diffusion-forcing window: the newest ``context_frames`` frames stay clean, ``T - context_frames``
new 6-hourly frames are generated, and every pending observation or constraint becomes an MMPS
operator for that window.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cftime
import numpy as np
import torch
import xarray as xr
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from wind_bmi.config import BmiConfig, to_dict
from wind_bmi.data import shipped_sample_path
from wind_bmi.data.layouts import LayoutError, open_any
from wind_bmi.data.windows import Channel, stack_channels
from wind_bmi.model.checkpoint import CheckpointError, load_prior
from wind_bmi.model.operators import AveragePoolOperator, MaskOperator, Observation, SparseLinearOperator
from wind_bmi.model.solvers import SOLVERS
from wind_bmi.model.tasks import Constraint, WindModel
from wind_bmi.variables import STATE_VARIABLES, VARIABLES

if TYPE_CHECKING:  # scipy (via the regridder) registers a warnings filter on import: load it only when used
    from wind_bmi.coupling.regrid import LatLonGrid, Regridder

DEFAULT_OBS_ERROR = {"temperature": 0.5, "u_wind": 1.0, "v_wind": 1.0, "specific_humidity": 2e-4,
                     "surface_pressure": 100.0, "precipitation": 2e-5}


class ComponentError(ValueError):
    """Bad configuration or input for the component; its state is unchanged."""


@dataclasses.dataclass
class PendingInputs:
    """Inputs set since the last window: sparse observations, coarse fields, scalar targets."""

    observed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # variable -> (K,H,W)|(H,W), NaN = none
    coarse: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    host_grid: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # variable -> host (nlat, nlon)


class WindComponent:
    """Ensemble state and clock of one WIND run.

    Args:
        cfg: validated :class:`BmiConfig`.
    """

    def __init__(self, cfg: BmiConfig) -> None:
        if not 1 <= cfg.members:
            raise ComponentError(f"config key 'members': expected >= 1, got {cfg.members}")
        if cfg.sampler.steps < 1:
            raise ComponentError(f"config key 'sampler.steps': expected >= 1 reverse steps, got {cfg.sampler.steps}")
        if not 0.0 <= cfg.sampler.eta <= 1.0:
            raise ComponentError(f"config key 'sampler.eta': expected 0 (DDIM) .. 1 (DDPM), got {cfg.sampler.eta}")
        if not cfg.run_hours > 0:
            raise ComponentError(f"config key 'run_hours': expected a positive number of hours, got {cfg.run_hours}")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ComponentError(f"config key 'device': {cfg.device!r} requested but this torch build sees no CUDA "
                                 f"device (torch {torch.__version__}); use 'cpu'")
        if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
            raise ComponentError(f"config key 'device': expected 'cpu' or 'cuda[:N]', got {cfg.device!r}")
        if cfg.guidance.method not in ("mmps", "dps"):
            raise ComponentError(f"guidance.method must be 'mmps' or 'dps', got {cfg.guidance.method!r}")
        if cfg.guidance.solver not in SOLVERS or cfg.guidance.solver == "cg":
            raise ComponentError(f"config key 'guidance.solver': expected auto, gmres or direct, "
                                 f"got {cfg.guidance.solver!r}")
        if cfg.guidance.iterations < 1:
            raise ComponentError(f"config key 'guidance.iterations': expected >= 1, got {cfg.guidance.iterations}")
        self.cfg = cfg
        try:
            prior = load_prior(cfg.model or None, cfg.device)
        except CheckpointError as exc:
            raise ComponentError(f"config key 'model': {exc}") from exc
        self.model = WindModel(prior, cfg.device, bf16=None, steps=cfg.sampler.steps,
                               eta=cfg.sampler.eta, method=cfg.guidance.method,
                               iterations=cfg.guidance.iterations, solver=cfg.guidance.solver)
        missing = [v for v in STATE_VARIABLES if not any(c == v for c, _ in self.model.channels)]
        if missing:
            have = sorted({c for c, _ in self.model.channels})
            raise ComponentError(f"config key 'model': the prior's card has no channels for {missing} (it has {have}); "
                                 f"WindBmi serves {list(STATE_VARIABLES)}: use a prior trained on the SPEEDY "
                                 f"variables")
        T = self.model.T
        if not 1 <= cfg.context_frames < T:
            raise ComponentError(f"config key 'context_frames': expected 1..{T - 1}, got {cfg.context_frames}")
        unknown = set(cfg.observation_error) - set(STATE_VARIABLES)
        if unknown:
            raise ComponentError(f"config key 'observation_error': unknown variable(s) {sorted(unknown)}; "
                                 f"expected some of {list(STATE_VARIABLES)}")
        self.obs_error = {**DEFAULT_OBS_ERROR, **cfg.observation_error}
        self.levels = [c[1] for c in self.model.channels if c[0] == "temperature"]
        self.K, self.H, self.W = len(self.levels), self.model.H, self.model.W
        self.downscale_factor = 4
        self.generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        self.time_hours = 0.0
        self.step_hours = 6.0 * (T - cfg.context_frames)
        self.pending = PendingInputs()
        self.targets: dict[str, float] = {"dry_air_mass": float("nan"), "warming_kelvin": cfg.constraints.warming_kelvin,
                                          "humidity_percent": cfg.constraints.humidity_percent}
        self.output_frames: list[tuple[float, np.ndarray, np.ndarray]] = []
        self.output_members: list[np.ndarray] = []
        # the control twin of a warming run (history, generator) and the last window's guidance report
        self.control: tuple[torch.Tensor, torch.Generator] | None = None
        self.report: list[dict[str, Any]] = []
        self.host: Regridder | None = None
        self.host_grid: LatLonGrid | None = None
        self.host_level = 0
        if cfg.host_grid.enabled:
            self._setup_host_grid()
        self._load_initial_condition()
        x0 = self.history[:1, -1:]
        self.m_ref = float(self.model.dry_air_mass(self.model.denormalise(x0))[0, 0])
        if cfg.restart_file:
            self.load_restart(cfg.restart_file)
        self._refresh()
        if cfg.output:
            self._record_output()

    # -- host grid ----------------------------------------------------------------------
    def _setup_host_grid(self) -> None:
        """Build (or read) ``W``: WIND grid -> host grid, for host-grid observations ``y = W x``."""
        from wind_bmi.coupling.regrid import LatLonGrid, Regridder, RegridError

        hg = self.cfg.host_grid
        if hg.resolution_deg:
            if hg.lat or hg.lon:
                raise ComponentError("config key 'host_grid': give either lat/lon or resolution_deg, not both")
            r = hg.resolution_deg
            if not 0 < r <= 90 or abs(180 / r - round(180 / r)) > 1e-9:
                raise ComponentError(f"config key 'host_grid.resolution_deg': expected a divisor of 180, got {r}")
            lat = np.asarray(-90 + r * (np.arange(round(180 / r)) + 0.5), dtype=np.float64)
            lon = np.asarray(-180 + r * (np.arange(round(360 / r)) + 0.5), dtype=np.float64)
        else:
            lat, lon = np.asarray(hg.lat, dtype=np.float64), np.asarray(hg.lon, dtype=np.float64)
        try:
            self.host_grid = LatLonGrid(lat, lon)
            wind = LatLonGrid(self.model.lat.numpy(), self.model.lon.numpy())
            if hg.weights:
                self.host = Regridder.from_esmf_weights(hg.weights, (self.H, self.W), self.host_grid.shape)
            else:
                self.host = Regridder.build(wind, self.host_grid, hg.method)
        except RegridError as exc:
            raise ComponentError(f"config key 'host_grid': {exc}") from exc
        self.host_covered = (self.host.weights.getnnz(axis=1) > 0).reshape(self.host_grid.shape)
        levels = np.asarray(self.levels, dtype=np.float64)
        self.host_level = int(np.argmin(np.abs(levels - hg.sigma)))

    def host_channel(self, variable: str) -> int:
        """The channel a host-grid field of ``variable`` observes (3-D: the level nearest ``host_grid.sigma``)."""
        chans = self.channel_slice(variable)
        return chans[self.host_level] if len(chans) > 1 else chans[0]

    def set_host_observed(self, variable: str, values: np.ndarray) -> None:
        """A host-grid field (NaN = unobserved cell), assimilated as ``y = W x`` in the next window."""
        if self.host is None or self.host_grid is None:
            raise ComponentError("host-grid observations need 'host_grid' in the config")
        values = np.asarray(values, dtype=np.float64).reshape(self.host_grid.shape)
        bad = np.isfinite(values) & ~self.host_covered
        if bad.any():
            raise ComponentError(f"{variable}: {int(bad.sum())} host cell(s) have values but no WIND cells map to "
                                 "them (weights rows are empty); set them to NaN")
        self.pending.host_grid[variable] = values.copy()

    def _host_grid_observations(self, last: int) -> list[Observation]:
        obs: list[Observation] = []
        if self.host is None:
            return obs
        Wm = self.host.weights
        for var, values in self.pending.host_grid.items():
            flat = values.reshape(-1)
            rows = np.flatnonzero(np.isfinite(flat))
            if rows.size == 0:
                continue
            sub = Wm[rows].tocoo()
            chan = self.host_channel(var)
            op = SparseLinearOperator(torch.from_numpy(sub.row.astype(np.int64)), torch.from_numpy(sub.col.astype(np.int64)),
                                      torch.from_numpy(sub.data), rows.size, last, chan)
            # the host value of a mapped cell is a weighted sum of normalised values: W (m + s x) = m W1 + s W x
            wsum = np.asarray(sub.sum(axis=1)).reshape(-1)
            mean, std = float(self.model.mean[chan]), float(self.model.std[chan])
            yn = torch.from_numpy((flat[rows] - mean * wsum) / std).float()
            vn = self.model.error_variance(torch.full((rows.size,), self.obs_error[var], dtype=torch.float64),
                                           torch.full((rows.size,), chan, dtype=torch.long))
            obs.append(Observation(op, yn[None].expand(self.cfg.members, -1), vn.float()[None]))
        return obs

    # -- initial condition ----------------------------------------------------------
    def _load_initial_condition(self) -> None:
        path = self.cfg.initial_condition or str(shipped_sample_path())
        try:
            ds = open_any(path)
        except LayoutError as exc:
            raise ComponentError(f"config key 'initial_condition': {exc}") from exc
        times = ds["time"].values
        self.calendar = getattr(times[0], "calendar", "proleptic_gregorian")
        if self.cfg.start_time:
            try:
                start = cftime.datetime.strptime(self.cfg.start_time.replace("T", " "), "%Y-%m-%d %H:%M:%S",
                                                 calendar=self.calendar) \
                    if ":" in self.cfg.start_time else \
                    cftime.datetime.strptime(self.cfg.start_time, "%Y-%m-%d", calendar=self.calendar)
            except ValueError as exc:
                raise ComponentError(f"config key 'start_time': expected 'YYYY-MM-DD[ HH:MM:SS]', "
                                     f"got {self.cfg.start_time!r}") from exc
            matches = [i for i, t in enumerate(times) if t == start]
            if not matches:
                raise ComponentError(f"config key 'start_time': {self.cfg.start_time} is not a time of {path} "
                                     f"({times[0]} .. {times[-1]})")
            idx = matches[0]
        else:
            idx = self.cfg.context_frames - 1
        if idx + 1 < self.cfg.context_frames:
            raise ComponentError(f"config key 'start_time': need {self.cfg.context_frames} frames up to it in {path}")
        channels = [Channel(v, lv) for v, lv in self.model.channels]
        try:
            frames = stack_channels(ds.isel(time=slice(idx + 1 - self.cfg.context_frames, idx + 1)), channels)
        except KeyError as exc:
            raise ComponentError(f"config key 'initial_condition': {path} lacks a model channel: {exc}") from exc
        if frames.shape[-2:] != (self.H, self.W):
            raise ComponentError(f"config key 'initial_condition': grid {frames.shape[-2:]} of {path} differs from the "
                                 f"model's {(self.H, self.W)} (regrid it first)")
        if not np.isfinite(frames).all():
            raise ComponentError(f"config key 'initial_condition': {path} has NaN/inf in the initial frames")
        self.start_datetime = times[idx]
        x = self.model.normalise(torch.from_numpy(frames))  # (k, C, H, W)
        self.history = x[None].repeat(self.cfg.members, 1, 1, 1, 1).contiguous()
        self.sample_path = path

    # -- views ---------------------------------------------------------------------
    def _refresh(self) -> None:
        """Physical numpy mirrors of the newest frame: members, mean, spread (in place, stable identity)."""
        phys = self.model.denormalise(self.history[:, -1]).cpu().numpy()  # (M, C, H, W)
        if not hasattr(self, "members_phys"):
            self.members_phys = np.empty_like(phys)
            self.mean_phys = np.empty(phys.shape[1:], dtype=np.float32)
            self.spread_phys = np.empty(phys.shape[1:], dtype=np.float32)
        self.members_phys[...] = phys
        self.mean_phys[...] = phys.mean(axis=0)
        self.spread_phys[...] = phys.std(axis=0, ddof=1) if phys.shape[0] > 1 else 0.0

    def channel_slice(self, variable: str) -> list[int]:
        return self.model.channels_of(variable)

    def current_datetime(self) -> Any:
        return self.start_datetime + _timedelta_hours(self.time_hours)

    # -- inputs ----------------------------------------------------------------------
    def set_observed(self, variable: str, values: np.ndarray) -> None:
        self.pending.observed[variable] = values.copy()

    def set_coarse(self, variable: str, values: np.ndarray) -> None:
        self.pending.coarse[variable] = values.copy()

    def set_state(self, variable: str, values: np.ndarray) -> None:
        """Replace the newest clean frame of ``variable`` in every member (e.g. a host analysis)."""
        chans = self.channel_slice(variable)
        phys = self.model.denormalise(self.history[:, -1])
        phys[:, chans] = torch.from_numpy(values.reshape(len(chans), self.H, self.W)).to(phys)
        self.history[:, -1] = self.model.normalise(phys)
        self._refresh()

    # -- stepping ---------------------------------------------------------------------
    def _observations(self) -> list[Observation]:
        """Pending inputs of this window as observations on the last generated frame."""
        T, C, H, W = self.model.T, self.model.C, self.H, self.W
        M = self.cfg.members
        obs: list[Observation] = []
        last = T - 1
        if self.pending.observed:
            values = torch.full((T, C, H, W), float("nan"), dtype=torch.float32)
            for var, arr in self.pending.observed.items():
                chans = self.channel_slice(var)
                values[last, chans] = torch.from_numpy(arr.reshape(len(chans), H, W).astype(np.float32))
            mask = torch.isfinite(values)
            if mask.any():
                filled = torch.where(mask, values, torch.zeros(()))
                norm = self.model.normalise(filled)
                ch = torch.arange(C)[None, :, None, None].expand_as(mask)[mask]
                sig = torch.tensor([self.obs_error[self.model.channels[int(c)][0]] for c in range(C)],
                                   dtype=torch.float64)
                obs.append(Observation(MaskOperator(mask), norm[mask][None].expand(M, -1),
                                       self.model.error_variance(sig[ch], ch)))
        for var, arr in self.pending.coarse.items():
            chans = self.channel_slice(var)
            k = self.downscale_factor
            op = AveragePoolOperator(k, self.model.lat, frames=[last], channels=chans)
            coarse = torch.from_numpy(arr.reshape(len(chans), H // k, W // k).astype(np.float64))
            ynorm = ((coarse - self.model.mean[chans, None, None]) / self.model.std[chans, None, None]).float()
            var_n = self.model.error_variance(torch.full((len(chans),), self.obs_error[var], dtype=torch.float64),
                                              torch.tensor(chans))
            obs.append(Observation(op, ynorm.reshape(1, -1).expand(M, -1),
                                   var_n[:, None].expand(-1, (H // k) * (W // k)).reshape(1, -1)))
        obs += self._host_grid_observations(last)
        return obs

    def _constraints(self) -> list[Constraint]:
        cons: list[Constraint] = []
        c = self.cfg.constraints
        target = self.targets["dry_air_mass"]
        if c.dry_air_mass or np.isfinite(target):
            cons.append(self.model.dry_air_mass_constraint(target if np.isfinite(target) else self.m_ref,
                                                           c.dry_air_mass_rel_error))
        return cons

    @property
    def warming(self) -> bool:
        """Whether warming targets are set (then a control twin runs beside the ensemble)."""
        return bool(self.targets["warming_kelvin"] or self.targets["humidity_percent"])

    def advance(self) -> None:
        """One window: generate ``T - context_frames`` frames guided by pending inputs, then clear them."""
        T, k = self.model.T, self.cfg.context_frames
        mask = torch.zeros(T, dtype=torch.bool)
        mask[:k] = True
        win = torch.zeros(self.cfg.members, T, self.model.C, self.H, self.W, device=self.model.device)
        win[:, :k] = self.history[:, -k:]
        obs = self._observations()
        obs += [c(win, mask) for c in self._constraints()]
        control_history = None
        if self.warming:
            # pseudo-global warming against a control twin: the same window without the warming targets,
            # the same random draws (a copy of the generator), started when the targets first appear
            if self.control is None:
                g = torch.Generator(device=self.model.device)
                g.set_state(self.generator.get_state())
                self.control = (self.history.clone(), g)
            ctx, g = self.control
            cwin = win.clone()
            cwin[:, :k] = ctx[:, -k:]
            control = self.model.sample(cwin, mask, obs, g)
            obs = obs + self.model.warming_observations(control, mask, self.targets["warming_kelvin"],
                                                        self.targets["humidity_percent"])
            control_history = torch.cat([ctx, control[:, k:]], dim=1)[:, -k:].contiguous()
        out = self.model.sample(win, mask, obs, self.generator)
        new = out[:, k:]
        if not torch.isfinite(new).all():
            raise ComponentError("the window produced NaN/inf; state left unchanged")
        self.report = self.model.report
        self.history = torch.cat([self.history, new], dim=1)[:, -k:].contiguous()
        if control_history is not None and self.control is not None:
            self.control = (control_history, self.control[1])
        self.pending = PendingInputs()
        self.time_hours += self.step_hours
        self._refresh()
        if self.cfg.output:
            phys = self.model.denormalise(new).cpu().numpy()
            for f in range(new.shape[1]):
                hours = self.time_hours - 6.0 * (new.shape[1] - 1 - f)
                spread = phys[:, f].std(axis=0, ddof=1) if phys.shape[0] > 1 else np.zeros_like(phys[0, f])
                self.output_frames.append((hours, phys[:, f].mean(axis=0), spread))
                if self.cfg.output_members:
                    self.output_members.append(phys[:, f].copy())
            self.write_output(self.cfg.output)

    # -- output and restart ---------------------------------------------------------------
    def _record_output(self) -> None:
        self.output_frames.append((self.time_hours, self.mean_phys.copy(), self.spread_phys.copy()))
        if self.cfg.output_members:
            self.output_members.append(self.members_phys.copy())

    def write_output(self, path: str | Path) -> None:
        """Write all frames so far as CF-1.8 netCDF (temp file, then rename; checked with cfchecker).

        Per state variable: the ensemble mean (``cell_methods: realization: mean``), its spread
        (standard deviation, ddof 1) linked as an ancillary variable, and with ``output_members`` every
        member on a ``member`` dimension (``standard_name: realization``). Sigma levels carry their
        parametric definition (``p = ptop + sigma (ps - ptop)``, ``ptop`` = 0), latitude, longitude and
        sigma their cell bounds; coordinates have no fill value; time is in the BMI's units.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hours = np.array([h for h, _, _ in self.output_frames], dtype=np.float64)
        mean = np.stack([m for _, m, _ in self.output_frames])
        spread = np.stack([s for _, _, s in self.output_frames])
        lat, lon = self.model.lat.numpy(), self.model.lon.numpy()
        from wind_bmi.coupling.regrid import LatLonGrid

        grid = LatLonGrid(lat, lon)
        lat_e, lon_e = grid.lat_edges(), grid.lon_edges()
        coords: dict[str, Any] = {
            "time": ("time", hours, {"standard_name": "time", "axis": "T",
                                     "units": f"hours since {self.start_datetime.strftime('%Y-%m-%d %H:%M:%S')}",
                                     "calendar": self.calendar}),
            "level": ("level", np.array(self.levels, dtype=np.float64),
                      {"standard_name": "atmosphere_sigma_coordinate", "long_name": "sigma at layer midpoints",
                       "units": "1", "axis": "Z", "positive": "down", "bounds": "level_bnds",
                       "formula_terms": "sigma: level ps: surface_pressure ptop: ptop"}),
            "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north", "axis": "Y",
                                 "bounds": "lat_bnds"}),
            "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east", "axis": "X",
                                 "bounds": "lon_bnds"}),
        }
        data: dict[str, Any] = {
            "lat_bnds": (("lat", "nv"), np.stack([lat_e[:-1], lat_e[1:]], axis=1)),
            "lon_bnds": (("lon", "nv"), np.stack([lon_e[:-1], lon_e[1:]], axis=1)),
            "ptop": ((), 0.0, {"long_name": "pressure at the model top", "units": "Pa"}),
        }
        bounds = self.model.card.get("level_bounds")
        if bounds:
            data["level_bnds"] = (("level", "nv"), np.array(bounds, dtype=np.float64))
        else:
            coords["level"][2].pop("bounds")
        members = self.cfg.output_members and bool(self.output_members)
        if members:
            coords["member"] = ("member", np.arange(self.cfg.members, dtype=np.int32),
                                {"standard_name": "realization", "long_name": "ensemble member", "units": "1"})
            member_frames = np.stack(self.output_members)  # (time, member, C, H, W)
        for var in STATE_VARIABLES:
            chans = self.channel_slice(var)
            info = VARIABLES[var]
            three_d = len(chans) > 1
            dims: tuple[str, ...] = ("time", "level", "lat", "lon") if three_d else ("time", "lat", "lon")
            sel: Any = chans if three_d else chans[0]
            base = {"units": info.units, "standard_name": info.standard_name}
            data[var] = (dims, mean[:, sel], {**base, "long_name": f"ensemble mean {info.long_name}",
                                            "cell_methods": "realization: mean",
                                            "ancillary_variables": f"{var}_spread"})
            data[f"{var}_spread"] = (dims, spread[:, sel], {**base, "long_name": f"ensemble spread of {info.long_name}",
                                                          "cell_methods": "realization: standard_deviation"})
            if members:
                mdims = ("time", "member", *dims[1:])
                mem = member_frames[:, :, sel]
                data[f"{var}_members"] = (mdims, mem, {**base, "long_name": f"ensemble members: {info.long_name}"})
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update({"Conventions": "CF-1.8", "title": "WIND ensemble (wind-bmi WindBmi)",
                         "source": f"wind-bmi, prior {self.model.card.get('name', '')}",
                         "members": self.cfg.members, "config": json.dumps(to_dict(self.cfg))})
        enc: dict[str, dict[str, Any]] = {name: {"_FillValue": None} for name in
                                          [*coords, "lat_bnds", "lon_bnds", "ptop", *(["level_bnds"] if bounds else [])]}
        enc["time"].update({"dtype": "float64"})
        tmp = path.with_name(path.name + ".tmp")
        ds.to_netcdf(tmp, encoding=enc)
        os.replace(tmp, path)

    def save_restart(self, path: str | Path) -> None:
        """Ensemble history, clock and generator state (safetensors + JSON metadata), atomically."""
        path = Path(path)
        gen_state = self.generator.get_state().numpy()
        tensors = {"history": self.history.cpu().numpy(), "generator": gen_state}
        if self.control is not None:  # a warming run's control twin continues too
            tensors["control_history"] = self.control[0].cpu().numpy()
            tensors["control_generator"] = self.control[1].get_state().numpy()
        meta = {"time_hours": str(self.time_hours), "m_ref": str(self.m_ref), "members": str(self.cfg.members),
                "context_frames": str(self.cfg.context_frames),
                "targets": json.dumps({k: (v if np.isfinite(v) else None) for k, v in self.targets.items()})}
        tmp = path.with_name(path.name + ".tmp")
        np_save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def load_restart(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ComponentError(f"config key 'restart_file': {str(path)!r} does not exist")
        try:
            tensors = np_load_file(str(path))
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata()
        except Exception as exc:
            raise ComponentError(f"config key 'restart_file': {path} is not a restart file ({exc})") from exc
        hist = torch.from_numpy(tensors["history"])
        if tuple(hist.shape) != tuple(self.history.shape):
            raise ComponentError(f"restart {path}: state shape {tuple(hist.shape)} differs from this configuration's "
                                 f"{tuple(self.history.shape)} (members/context_frames)")
        self.history = hist.to(self.model.device)
        self.generator.set_state(torch.from_numpy(tensors["generator"]))
        self.control = None
        if "control_history" in tensors:
            g = torch.Generator(device=self.model.device)
            g.set_state(torch.from_numpy(tensors["control_generator"]))
            self.control = (torch.from_numpy(tensors["control_history"]).to(self.model.device), g)
        self.time_hours = float(meta["time_hours"])
        self.m_ref = float(meta["m_ref"])
        t = json.loads(meta["targets"])
        self.targets = {k: (float("nan") if v is None else float(v)) for k, v in t.items()}
        self._refresh()


def _timedelta_hours(h: float) -> Any:
    import datetime as dt

    return dt.timedelta(hours=h)
