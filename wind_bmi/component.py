"""The stateful WIND component: ensemble state, clock, pending observations, output writer.

:class:`WindComponent` knows physical arrays and the model facade; it knows nothing of BMI names
(the adapter in :mod:`wind_bmi.bmi` translates). One :meth:`advance` = one guided
diffusion-forcing window: the newest ``context_frames`` frames stay clean, ``T - context_frames``
new 6-hourly frames are generated, and every pending observation or constraint becomes an MMPS
operator for that window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wind_bmi.config import BmiConfig, ComponentError, to_dict
from wind_bmi.data import shipped_sample_path
from wind_bmi.data.initial import InitialConditionError, read_initial_condition
from wind_bmi.data.output import load_arrays, save_arrays, write_ensemble
from wind_bmi.data.windows import Channel
from wind_bmi.model.checkpoint import CheckpointError, load_prior
from wind_bmi.model.solvers import SOLVERS
from wind_bmi.model.tasks import Constraint, WindModel
from wind_bmi.observations import ObservationAssembler, PendingInputs

if TYPE_CHECKING:
    from wind_bmi.regrid import LatLonGrid
from wind_bmi.variables import STATE_VARIABLES

DEFAULT_OBS_ERROR = {"temperature": 0.5, "u_wind": 1.0, "v_wind": 1.0, "specific_humidity": 2e-4,
                     "surface_pressure": 100.0, "precipitation": 2e-5}


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
        self.assembler = ObservationAssembler(self.model, self.obs_error, cfg.host_grid, cfg.members,
                                              self.downscale_factor)
        self._load_initial_condition()
        x0 = self.history[:1, -1:]
        self.m_ref = float(self.model.dry_air_mass(self.model.denormalise(x0))[0, 0])
        if cfg.restart_file:
            self.load_restart(cfg.restart_file)
        self._refresh()
        if cfg.output:
            self._record_output()

    # -- initial condition ----------------------------------------------------------
    def _load_initial_condition(self) -> None:
        path = self.cfg.initial_condition or str(shipped_sample_path())
        try:
            ic = read_initial_condition(path, [Channel(v, lv) for v, lv in self.model.channels], (self.H, self.W),
                                        self.cfg.context_frames, self.cfg.start_time)
        except InitialConditionError as exc:
            raise ComponentError(f"config key '{exc.key}': {exc}") from exc
        self.calendar, self.start_datetime, self.sample_path = ic.calendar, ic.time, ic.path
        x = self.model.normalise(torch.from_numpy(ic.frames))  # (k, C, H, W)
        self.history = x[None].repeat(self.cfg.members, 1, 1, 1, 1).contiguous()

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

    # -- the public surface the BMI adapter and the DA driver use ----------------------------
    @property
    def host_grid(self) -> LatLonGrid | None:
        """The host's lat-lon grid of host-grid inputs, or None without ``host_grid`` in the config."""
        return self.assembler.host_grid

    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """``(lat ascending, lon, sigma levels)`` of the state."""
        return self.model.lat.numpy(), self.model.lon.numpy(), [float(v) for v in self.levels if v is not None]

    def field(self, role: str, variable: str) -> np.ndarray:
        """The newest frame of ``variable`` in physical units: ``state`` (ensemble mean), ``spread``
        (standard deviation, ddof 1) or ``members``; arrays ``([member,] [level,] lat, lon)``."""
        src = {"state": self.mean_phys, "spread": self.spread_phys, "members": self.members_phys}[role]
        return src[..., self.channel_slice(variable), :, :]

    def pending_input(self, role: str, variable: str) -> np.ndarray | None:
        """What was set for the next window (``observed``, ``coarse``, ``host_observed``), or None."""
        table = {"observed": self.pending.observed, "coarse": self.pending.coarse,
                 "host_observed": self.pending.host_grid}[role]
        return table.get(variable)

    def target(self, key: str) -> float:
        """A scalar target (``dry_air_mass``, ``warming_kelvin``, ``humidity_percent``)."""
        return float(self.targets[key])

    def set_target(self, key: str, value: float) -> None:
        if key not in self.targets:
            raise ComponentError(f"unknown target {key!r}; expected one of {sorted(self.targets)}")
        self.targets[key] = float(value)

    def current_datetime(self) -> Any:
        return self.start_datetime + _timedelta_hours(self.time_hours)

    # -- inputs ----------------------------------------------------------------------
    def set_observed(self, variable: str, values: np.ndarray) -> None:
        self.pending.observed[variable] = values.copy()

    def set_coarse(self, variable: str, values: np.ndarray) -> None:
        self.pending.coarse[variable] = values.copy()

    def set_host_observed(self, variable: str, values: np.ndarray) -> None:
        """A host-grid field (NaN = unobserved cell), assimilated as ``y = W x`` in the next window."""
        self.pending.host_grid[variable] = self.assembler.check_host_field(variable, values)

    def set_state(self, variable: str, values: np.ndarray) -> None:
        """Replace the newest clean frame of ``variable`` in every member (e.g. a host analysis)."""
        chans = self.channel_slice(variable)
        phys = self.model.denormalise(self.history[:, -1])
        phys[:, chans] = torch.from_numpy(values.reshape(len(chans), self.H, self.W)).to(phys)
        self.history[:, -1] = self.model.normalise(phys)
        self._refresh()

    # -- stepping ---------------------------------------------------------------------
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
        obs = self.assembler.observations(self.pending)
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
        """Write all frames so far as CF netCDF (:func:`wind_bmi.data.output.write_ensemble`)."""
        write_ensemble(
            path, [h for h, _, _ in self.output_frames], [m for _, m, _ in self.output_frames],
            [s for _, _, s in self.output_frames], self.output_members,
            {v: self.channel_slice(v) for v in STATE_VARIABLES}, self.model.lat.numpy(), self.model.lon.numpy(),
            [float(v) for v in self.levels if v is not None], self.model.card.get("level_bounds"),
            self.start_datetime, self.calendar,
            {"source": f"wind-bmi, prior {self.model.card.get('name', '')}", "members": self.cfg.members,
             "config": json.dumps(to_dict(self.cfg))})

    def save_restart(self, path: str | Path) -> None:
        """Ensemble history, clock and generator state (safetensors + JSON metadata), atomically."""
        gen_state = self.generator.get_state().numpy()
        tensors = {"history": self.history.cpu().numpy(), "generator": gen_state}
        if self.control is not None:  # a warming run's control twin continues too
            tensors["control_history"] = self.control[0].cpu().numpy()
            tensors["control_generator"] = self.control[1].get_state().numpy()
        meta = {"time_hours": str(self.time_hours), "m_ref": str(self.m_ref), "members": str(self.cfg.members),
                "context_frames": str(self.cfg.context_frames),
                "targets": json.dumps({k: (v if np.isfinite(v) else None) for k, v in self.targets.items()})}
        save_arrays(path, tensors, meta)

    def load_restart(self, path: str | Path) -> None:
        path = Path(path)
        try:
            tensors, meta = load_arrays(path)
        except ValueError as exc:
            raise ComponentError(f"config key 'restart_file': {exc}") from exc
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
