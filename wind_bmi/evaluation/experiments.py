"""``wind-bmi evaluate``: the paper's experiments on held-out data, against baselines.

Every experiment appends flat records ``{task, variable, level, lead_hours, method, metric, value}``
to ``metrics.json``; ``report.md`` tabulates them and PNG figures are written beside them.
Physical units throughout; RMSE latitude-weighted (WeatherBench2 conventions, see ``scores``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wind_bmi.config import GuidanceConfig, SamplerConfig
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels
from wind_bmi.evaluation import scores
from wind_bmi.evaluation.gcm_baseline import PROGNOSTIC, T21Forecaster, forcing_options
from wind_bmi.model.checkpoint import load_prior
from wind_bmi.model.operators import AveragePoolOperator
from wind_bmi.model.tasks import WindModel
from wind_bmi.variables import VARIABLES

TASKS = ("forecast", "downscale", "temporal", "sparse", "mass", "warming")
# headline channels: (variable, sigma level or None)
HEADLINE = (("temperature", 0.51), ("u_wind", 0.2), ("specific_humidity", 0.835), ("surface_pressure", None))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of the experiments (``quick`` for CI, ``full`` for the committed report)."""

    init_dates: int
    members: int
    forecast_hours: float
    steps: int
    windows: int
    mass_days: float
    warming_days: float
    field_members: int = 4  # members of the field tasks (downscaling, temporal, sparse): scored as an ensemble


# a record is these keys plus "value"; evaluate writes one record per key tuple
RECORD_ID = ("task", "variable", "level", "lead_hours", "method", "metric")
QUICK = Budget(init_dates=1, members=2, forecast_hours=24, steps=8, windows=1, mass_days=1, warming_days=1,
               field_members=2)
# the committed report: 8 dates, 8 members, 14-day forecasts, a 1-year mass run, at the BMI's 8 sampler steps
# (24-h forecasts score the same with 32: docs/results.md)
FULL = Budget(init_dates=8, members=8, forecast_hours=14 * 24, steps=8, windows=2, mass_days=365, warming_days=3)
# observation errors of the field tasks, in units of each channel's standard deviation (stated in physical
# units in the report's notes)
FIELD_ERROR_STD = 0.02


class Evaluation:
    """Holds the model, the truth frames and the collected records."""

    def __init__(self, data: str | Path, out: str | Path, budget: Budget, model: str | None = None,
                 seed: int = 0, warm_data: str | Path | None = None, ar_model: str | None = None) -> None:
        guidance = GuidanceConfig()
        self.wm = WindModel(load_prior(model), "cpu", bf16=None, steps=budget.steps, eta=SamplerConfig().eta,
                            iterations=guidance.iterations, solver=guidance.solver)
        # the paper's autoregressive baseline (AR-UViT: trained with clean context always and the new
        # frames at one level), forecast by the same sampler
        self.ar = None if ar_model is None else WindModel(load_prior(ar_model), "cpu", bf16=None, steps=budget.steps,
                                                          eta=SamplerConfig().eta)
        if self.ar is not None and self.ar.channels != self.wm.channels:
            raise ValueError(f"--ar-model {ar_model}: its channels differ from the model's")
        self.b = budget
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        ds = open_any(data)
        self.times = list(ds["time"].values)
        self.truth = torch.from_numpy(stack_channels(ds, [Channel(v, lv) for v, lv in self.wm.channels]))
        if self.truth.shape[-2:] != (self.wm.H, self.wm.W):
            raise ValueError(f"{data}: grid {tuple(self.truth.shape[-2:])} differs from the model's "
                             f"{(self.wm.H, self.wm.W)}; regrid first")
        self.land = None
        if "land_sea_mask" in ds:
            lsm = ds["land_sea_mask"]
            self.land = np.asarray(lsm.isel(time=0).values if "time" in lsm.dims else lsm.values)
        self.lat = self.wm.lat.numpy()
        self.records: list[dict[str, Any]] = []
        self.seed = seed
        self.gcm_forcing = forcing_options(dict(ds.attrs))
        self.warm: torch.Tensor | None = None
        if warm_data:
            wds = open_any(warm_data)
            self.warm = torch.from_numpy(stack_channels(wds, [Channel(v, lv) for v, lv in self.wm.channels]))
            if self.warm.shape[1:] != self.truth.shape[1:]:
                raise ValueError(f"--warm-data {warm_data}: frames {tuple(self.warm.shape[1:])} differ from --data's "
                                 f"{tuple(self.truth.shape[1:])}")
        self.notes: list[str] = []
        errs = ", ".join(f"{v} {lv if lv is not None else ''} {FIELD_ERROR_STD * float(self.wm.std[c]):.3g} "
                         f"{VARIABLES[v].units}" for v, lv, c in self.headline())
        self.notes.append(f"field tasks (downscale, temporal, sparse): {budget.field_members} members scored as "
                          f"ensemble mean (RMSE) and ensemble (fair CRPS); observation error {FIELD_ERROR_STD} of each "
                          f"channel's std: {errs}; {budget.steps} sampler steps, guidance at the BMI's defaults")

    def t21(self) -> T21Forecaster | None:
        """The T21 GCM baseline when the data are SPEEDY output and jcm is installed (else a note why not)."""
        if self.gcm_forcing is None:
            self.notes.append("gcm_t21 skipped: the data carry no SPEEDY generator options")
            return None
        try:
            import jcm  # noqa: F401
        except ImportError:
            self.notes.append("gcm_t21 skipped: jcm is not installed (extra [speedy])")
            return None
        return T21Forecaster(self.lat, self.wm.lon.numpy(), *self.gcm_forcing)

    def start_datetime(self, s: int) -> Any:
        import datetime as dt

        t = self.times[s]
        if isinstance(t, np.datetime64):
            return t.astype("datetime64[s]").astype(dt.datetime)
        return dt.datetime(t.year, t.month, t.day, t.hour, t.minute)

    # -- helpers ---------------------------------------------------------------------
    def gen(self, k: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + k)

    def headline(self) -> list[tuple[str, float | None, int]]:
        out = []
        for v, lv in HEADLINE:
            try:
                out.append((v, lv, self.wm.channel_index(v, lv)))
            except KeyError:
                continue
        return out

    def add(self, task: str, variable: str, level: float | None, lead: float, method: str, metric: str,
            value: float) -> None:
        self.records.append({"task": task, "variable": variable, "level": level, "lead_hours": float(lead),
                             "method": method, "metric": metric, "value": float(value)})

    def add_report(self, task: str, report: list[dict[str, Any]]) -> None:
        """Record how well a guided result honours each of its operators (whitened residual; 1 = fits to
        its error, the target is <= 2)."""
        for r in report:
            self.add(task, r["name"], None, 0, "wind", "whitened_residual", r["whitened_residual"])

    def level_index(self, var: str, level: float) -> int:
        levels = [lv for v, lv in self.wm.channels if v == var]
        return int(np.argmin(np.abs(np.asarray(levels, dtype=np.float64) - level)))

    def starts(self, need: int) -> list[int]:
        last = len(self.times) - need
        if last < 0:
            raise ValueError(f"the data has {len(self.times)} frames; this experiment needs {need}")
        n = min(self.b.init_dates, last + 1)
        return [int(round(i)) for i in np.linspace(0, last, n)]

    # -- experiments -----------------------------------------------------------------------
    def forecast(self) -> None:
        n = math.ceil(self.b.forecast_hours / 6)
        clim = self.truth.mean(dim=0)
        per_lead: dict[tuple[str, int], list[float]] = {}
        gcm = self.t21()
        for k, s in enumerate(self.starts(n + 1)):
            runs = {"wind": self.wm.forecast(self.truth[s], n * 6, self.b.members, self.gen(k))}  # (M, n, C, H, W)
            if self.ar is not None:
                runs["ar_uvit"] = self.ar.forecast(self.truth[s], n * 6, self.b.members, self.gen(k))
            truth = self.truth[s + 1: s + 1 + n]
            t21 = None
            if gcm is not None:
                state = {v: self.truth[s, self.wm.channels_of(v)].numpy().squeeze(0) if v == "surface_pressure"
                         else self.truth[s, self.wm.channels_of(v)].numpy() for v in PROGNOSTIC}
                t21 = gcm.forecast(state, self.start_datetime(s), n * 6)
            for var, lv, c in self.headline():
                for j in range(n):
                    y = truth[j, c].numpy()
                    scored: dict[tuple[str, str], Any] = {
                        ("persistence", "rmse"): scores.rmse(self.truth[s, c].numpy(), y, self.lat),
                        ("climatology", "rmse"): scores.rmse(clim[c].numpy(), y, self.lat),
                    }
                    for method, run in runs.items():
                        x = run[:, j, c].numpy()
                        scored[(method, "rmse")] = scores.rmse(x.mean(axis=0), y, self.lat)
                        scored[(method, "crps")] = scores.crps_fair(x, y, self.lat) if x.shape[0] > 1 else np.nan
                        scored[(method, "ssr")] = scores.spread_skill_ratio(x, y, self.lat) if x.shape[0] > 1 else np.nan
                    if t21 is not None:
                        field = t21[var][j] if lv is None else t21[var][j][self.level_index(var, lv)]
                        scored[("gcm_t21", "rmse")] = scores.rmse(field, y, self.lat)
                    for (method, metric), v in scored.items():
                        per_lead.setdefault((f"{var}|{lv}|{(j + 1) * 6}|{method}|{metric}", 0), []).append(float(v))
            # moisture overshoot: the area mean of the ensemble mean against the truth's, in percent, of the
            # variable summed over its levels (a level-by-level ratio divides by zero where a level holds no
            # moisture, as the top level does after the spin-up)
            for var in ("specific_humidity", "precipitation"):
                if not any(v == var for v, _ in self.wm.channels):
                    continue
                ch = self.wm.channels_of(var)
                for method, run in runs.items():
                    for j in range(n):
                        b = scores.relative_bias_percent(run[:, j, ch].mean(dim=0).sum(dim=0).numpy(),
                                                         truth[j, ch].sum(dim=0).numpy(), self.lat)
                        per_lead.setdefault((f"{var}|None|{(j + 1) * 6}|{method}|overshoot_percent", 0),
                                            []).append(float(b))
        for (key, _), lead_vals in per_lead.items():
            name, level, lead, method, metric = key.split("|")
            self.add("forecast", name, None if level == "None" else float(level), float(lead), method, metric,
                     float(np.nanmean(lead_vals)))

    def downscale(self) -> None:
        from scipy.ndimage import zoom

        pool = AveragePoolOperator(4, self.wm.lat)
        T = self.wm.T
        for k, s in enumerate(self.starts(T)[: self.b.windows]):
            truth = self.truth[s:s + T]
            coarse = pool.pool(truth.double()).float()
            ens = self.wm.downscale(coarse, 4, self.b.field_members, sigma_y=FIELD_ERROR_STD * self.wm.std,
                                    generator=self.gen(100 + k))
            self.add_report("downscale", self.wm.report)
            fine = ens.mean(dim=0)
            c_np = coarse.numpy()
            # periodic in longitude: pad before zooming, crop after
            padded = np.concatenate([c_np[..., -2:], c_np, c_np[..., :2]], axis=-1)
            interp = {m: zoom(padded, (1, 1, 4, 4), order=o, mode="nearest")[..., 8:-8]
                      for m, o in (("bilinear", 1), ("bicubic", 3))}
            for var, lv, c in self.headline():
                y = truth[:, c].numpy()
                self.add("downscale", var, lv, 0, "wind", "rmse", scores.rmse(fine[:, c].numpy(), y, self.lat).mean())
                self.add("downscale", var, lv, 0, "wind", "crps",
                         float(np.mean([scores.crps_fair(ens[:, f, c].numpy(), y[f], self.lat) for f in range(T)])))
                for m, arr in interp.items():
                    self.add("downscale", var, lv, 0, m, "rmse", scores.rmse(arr[:, c], y, self.lat).mean())
                if k == 0:
                    up = np.repeat(np.repeat(c_np[-1, c], 4, axis=-2), 4, axis=-1)
                    self._map_figure({"truth": y[-1], "coarse input": up, "WIND": fine[-1, c].numpy(),
                                      "bilinear": interp["bilinear"][-1, c]}, f"downscale_map_{var}.png",
                                     f"4x downscaling, {var} {lv if lv is not None else ''}")
                    spec = {m: scores.zonal_power_spectrum(a, self.lat).mean(axis=0) for m, a in
                            (("truth", y), ("wind", fine[:, c].numpy()), ("bilinear", interp["bilinear"][:, c]))}
                    self._spectrum_figure(spec, f"downscale_spectrum_{var}.png", f"{var} {lv}")

    def temporal(self) -> None:
        """Temporal downscaling: the daily mean of the four 6-hourly frames that make a day (frames 1-4
        of a window, 06 to 24 UTC after a 00 UTC frame) -> those frames; frame 0 is generated too."""
        T = self.wm.T
        day = list(range(1, T))
        for k, s in enumerate(self.starts(T)[: self.b.windows]):
            truth = self.truth[s:s + T]
            mean = truth[day].mean(dim=0)
            ens = self.wm.temporal_downscale(mean, self.b.field_members, sigma_y=FIELD_ERROR_STD * self.wm.std,
                                             frames=day, generator=self.gen(200 + k))[:, day]
            self.add_report("temporal", self.wm.report)
            out = ens.mean(dim=0)
            for var, lv, c in self.headline():
                y = truth[day, c].numpy()
                self.add("temporal", var, lv, 0, "wind", "rmse", scores.rmse(out[:, c].numpy(), y, self.lat).mean())
                self.add("temporal", var, lv, 0, "wind", "crps",
                         float(np.mean([scores.crps_fair(ens[:, f, c].numpy(), y[f], self.lat) for f in range(len(day))])))
                self.add("temporal", var, lv, 0, "daily_mean_repeated", "rmse",
                         scores.rmse(np.broadcast_to(mean[c].numpy(), y.shape), y, self.lat).mean())

    def sparse(self) -> None:
        T = self.wm.T
        for frac in (0.01, 0.05):
            for k, s in enumerate(self.starts(T)[: self.b.windows]):
                truth = self.truth[s:s + T]
                g = self.gen(300 + k)
                observed = torch.rand(truth.shape[0], 1, *truth.shape[2:], generator=g) < frac
                observed = observed.expand_as(truth)
                obs = torch.where(observed, truth, torch.full_like(truth, float("nan")))
                sig = FIELD_ERROR_STD * self.wm.std
                M = self.b.field_members
                ens = self.wm.reconstruct(obs, M, sigma_y=sig, generator=self.gen(400 + k))
                self.add_report(f"sparse_{frac:.0%}", self.wm.report)
                # the operator's residual, channel by channel (every member at its observed cells)
                white = (ens - truth) / sig.float()[None, None, :, None, None]
                for c, (var, lv) in enumerate(self.wm.channels):
                    fit_c = float(white[:, :, c][:, observed[:, c]].pow(2).mean().sqrt())
                    self.add(f"sparse_{frac:.0%}", var, lv, 0, "wind", "whitened_residual_by_channel", fit_c)
                prior = torch.cat([truth[:1].expand(M, 1, -1, -1, -1),
                                   self.wm.forecast(truth[0], (T - 1) * 6, M, self.gen(500 + k))], dim=1)
                results = {
                    "wind": ens.mean(dim=0),
                    "dps": self.wm.reconstruct(obs, M, sigma_y=sig, generator=self.gen(400 + k), method="dps").mean(dim=0),
                    "prior": prior.mean(dim=0),
                    "kriging": torch.from_numpy(kriging(obs.numpy(), self.lat, self.wm.lon.numpy())),
                }
                unobs = ~observed
                if k == 0:
                    c = self.headline()[0][2]
                    self._map_figure({"truth": truth[-1, c].numpy(), f"observed ({frac:.0%})": obs[-1, c].numpy(),
                                      "WIND": results["wind"][-1, c].numpy(), "kriging": results["kriging"][-1, c].numpy()},
                                     f"sparse_map_{int(frac * 100)}pct.png",
                                     f"sparse reconstruction, {self.headline()[0][0]} {self.headline()[0][1]}")
                for var, lv, c in self.headline():
                    y = truth[:, c]
                    m = unobs[:, c]
                    for method, est in results.items():
                        err = float(torch.sqrt(((est[:, c] - y) ** 2)[m].mean()))
                        self.add("sparse", var, lv, frac * 100, method, "rmse_unobserved", err)
                    fit = float(torch.sqrt((((results["wind"][:, c] - y) / sig[c]) ** 2)[~m].mean()))
                    self.add("sparse", var, lv, frac * 100, "wind", "whitened_residual_observed", fit)

    def mass(self) -> None:
        init = self.truth[0]
        m0 = float(self.wm.dry_air_mass(init[None, None])[0, 0])
        series = {}
        for method, cons in (("prior", []), ("wind", [self.wm.dry_air_mass_constraint(m0, 1e-5)])):
            x = self.wm.rollout(init, self.b.mass_days, 1, self.gen(600), constraints=cons)
            drift = (self.wm.dry_air_mass(x)[0] / m0 - 1).numpy()
            series[method] = drift
            for j in range(0, drift.size, max(1, drift.size // 20)):
                self.add("mass", "dry_air_mass", None, (j + 1) * 6, method, "relative_drift", float(drift[j]))
            self.add("mass", "dry_air_mass", None, drift.size * 6, method, "relative_drift", float(drift[-1]))
        self._series_figure(series, "mass_drift.png", "relative dry-air-mass drift")

    def warming(self) -> None:
        """A storm case (the frame with the heaviest 99th-percentile precipitation) warmed by +2 K / +14 % q.

        Three runs with the same random draws: the control (free), the guided warming run (targets
        relative to the control, frame by frame: :meth:`WindModel.warming`), and the free-run ablation
        (the same initial state warmed by +2 K and x 1.14 q, then run unguided: how much of the signal
        the prior keeps by itself)."""
        pc = self.wm.channel_index("precipitation")
        tc, qc = self.wm.channels_of("temperature"), self.wm.channels_of("specific_humidity")
        need = int(self.b.warming_days * 4)
        candidates = self.truth[: max(1, len(self.truth) - need), pc].reshape(-1, self.wm.H * self.wm.W)
        s = int(torch.quantile(candidates.float(), 0.99, dim=1).argmax())
        init = self.truth[s]
        self.notes.append(f"warming storm case: frame {s} ({self.start_datetime(s)}); targets +2 K and +14 % q "
                          f"against the same-seed control, frame by frame")
        warm, control = self.wm.warming(init, self.b.warming_days, self.b.members, delta_t=2.0, humidity_percent=14.0,
                                        generator=self.gen(700))
        self.add_report("warming", self.wm.report)
        perturbed = init.clone()
        perturbed[tc] += 2.0
        perturbed[qc] *= 1.14
        ablation = self.wm.rollout(perturbed, self.b.warming_days, self.b.members, self.gen(700))
        w = torch.from_numpy(scores.latitude_weights(self.lat))[:, None].float()

        def area_mean(x: torch.Tensor, chans: list[int]) -> torch.Tensor:  # per frame, over members and levels
            return (x[:, :, chans] * w).mean(dim=(0, 2, 3, 4))

        runs = {"prior": control, "wind": warm, "free_run_warmed_start": ablation}
        t_ctl, q_ctl = area_mean(control, tc), area_mean(control, qc)
        p99 = {m: float(np.percentile(x[:, :, pc].numpy(), 99)) for m, x in runs.items()}
        hours = self.b.warming_days * 24
        for method, x in runs.items():
            self.add("warming", "temperature", None, hours, method, "mean", float(area_mean(x, tc).mean()))
            self.add("warming", "precipitation", None, hours, method, "p99", p99[method])
            if method != "prior":
                dt = area_mean(x, tc) - t_ctl
                dq = 100 * (area_mean(x, qc) / q_ctl - 1)
                self.add("warming", "temperature", None, hours, method, "increment_vs_control_K_mean", float(dt.mean()))
                self.add("warming", "temperature", None, hours, method, "increment_vs_control_K_worst_frame",
                         float(dt[(dt - 2.0).abs().argmax()]))
                self.add("warming", "specific_humidity", None, hours, method, "increment_vs_control_percent_mean",
                         float(dq.mean()))
                self.add("warming", "temperature", None, hours, method, "signal_kept_last_frame",
                         float(dt[-1] / 2.0))
                dP = p99[method] / max(p99["prior"], 1e-12) - 1
                self.add("warming", "precipitation", None, hours, method, "p99_change_percent", 100 * dP)
                self.add("warming", "precipitation", None, hours, method, "p99_change_percent_per_K",
                         100 * dP / float(dt.mean()) if abs(float(dt.mean())) > 1e-6 else float("nan"))
        fields = {m: x[:, :, pc].mean(dim=(0, 1)).numpy() for m, x in runs.items()}
        self._map_figure({"control": fields["prior"], "+2 K guided": fields["wind"],
                          "change": fields["wind"] - fields["prior"]},
                         "warming_precip_map.png", "storm case: mean precipitation (kg m-2 s-1), control vs +2 K / +14 % q",
                         cmap="viridis")
        self.add("warming", "precipitation", None, 0, "clausius_clapeyron", "p99_change_percent_per_K", 7.0)
        if self.warm is not None:
            self.gcm_warming(tc, pc)

    def gcm_warming(self, tc: list[int], pc: int) -> None:
        """The GCM's own answer: the same period run with SST + 2 K against the control (``--data``)."""
        n = min(len(self.warm), len(self.truth))  # type: ignore[arg-type]
        assert self.warm is not None
        w = torch.from_numpy(scores.latitude_weights(self.lat))[:, None].float()
        stats = {}
        for name, x in (("control", self.truth[:n]), ("warm", self.warm[:n])):
            stats[name] = (float((x[:, tc] * w).mean()), float(np.percentile(x[:, pc].numpy(), 99)))
        dT = stats["warm"][0] - stats["control"][0]
        dP = stats["warm"][1] / max(stats["control"][1], 1e-12) - 1
        self.add("warming", "temperature", None, n * 6, "gcm_sst_plus_2k", "mean_change", dT)
        self.add("warming", "precipitation", None, n * 6, "gcm_sst_plus_2k", "p99_change_percent", 100 * dP)
        self.add("warming", "precipitation", None, n * 6, "gcm_sst_plus_2k", "p99_change_percent_per_K",
                 100 * dP / dT if abs(dT) > 1e-6 else float("nan"))

    # -- outputs ---------------------------------------------------------------------------
    def _spectrum_figure(self, spec: dict[str, np.ndarray], name: str, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
        for k, v in spec.items():
            ax.loglog(np.arange(1, v.size), v[1:], label=k)
        ax.set_xlabel("zonal wavenumber")
        ax.set_ylabel("power")
        ax.set_title(title)
        ax.legend()
        fig.savefig(self.out / name, dpi=90)
        plt.close(fig)

    def _map_figure(self, panels: dict[str, np.ndarray], name: str, title: str, cmap: str = "RdBu_r") -> None:
        """Side-by-side lat-lon maps on a shared colour scale, with the land-sea outline of the data's mask."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lon, lat = self.wm.lon.numpy(), self.lat
        finite = np.concatenate([p[np.isfinite(p)].ravel() for p in panels.values()])
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.4), constrained_layout=True,
                                 squeeze=False)
        im = None
        for ax, (label, field) in zip(axes[0], panels.items(), strict=True):
            im = ax.pcolormesh(lon, lat, field, vmin=lo, vmax=hi, cmap=cmap, shading="nearest")
            if self.land is not None:
                ax.contour(lon, lat, self.land, levels=[0.5], colors="k", linewidths=0.5)
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if im is not None:
            fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(title, fontsize=10)
        fig.savefig(self.out / name, dpi=80)
        plt.close(fig)

    def _series_figure(self, series: dict[str, np.ndarray], name: str, ylabel: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
        for k, v in series.items():
            ax.plot(np.arange(1, v.size + 1) * 6 / 24, v, label=k)
        ax.set_xlabel("days")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.savefig(self.out / name, dpi=90)
        plt.close(fig)

    def skill_figure(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [r for r in self.records if r["task"] == "forecast" and r["metric"] == "rmse"]
        if not recs:
            return
        vars_ = sorted({(r["variable"], r["level"]) for r in recs}, key=str)
        fig, axes = plt.subplots(1, len(vars_), figsize=(4 * len(vars_), 3.2), constrained_layout=True, squeeze=False)
        for ax, (v, lv) in zip(axes[0], vars_, strict=False):
            for method in ("wind", "persistence", "climatology", "gcm_t21"):
                pts = sorted((r["lead_hours"], r["value"]) for r in recs
                             if r["variable"] == v and r["level"] == lv and r["method"] == method)
                ax.plot([p[0] / 24 for p in pts], [p[1] for p in pts], marker=".", label=method)
            ax.set_title(f"{v} {lv if lv is not None else ''}")
            ax.set_xlabel("lead (days)")
            ax.set_ylabel("RMSE")
        axes[0][0].legend()
        fig.savefig(self.out / "forecast_rmse.png", dpi=90)
        plt.close(fig)

    def write(self) -> None:
        write_report(merge_records(self.records), self.notes, self.out)


def merge_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (task, variable, level, lead, method, metric): scores of several windows are averaged."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in RECORD_ID), []).append(r)
    return [{**rs[0], "value": float(np.mean([r["value"] for r in rs]))} for rs in groups.values()]


def write_report(records: list[dict[str, Any]], notes: list[str], out: Path) -> None:
    """``metrics.json`` (atomically) and the ``report.md`` table."""
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, out / "metrics.json")
    lines = ["| task | variable | level | lead (h) | method | metric | value |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['variable']} | {r['level'] if r['level'] is not None else ''} | "
                     f"{r['lead_hours']:g} | {r['method']} | {r['metric']} | {r['value']:.4g} |")
    head = "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")
    (out / "report.md").write_text("# wind-bmi evaluation\n\n" + head + "\n".join(lines) + "\n")


def kriging(obs: np.ndarray, lat: np.ndarray, lon: np.ndarray, length_km: float = 1000.0,
            nugget: float = 0.05) -> np.ndarray:
    """Simple kriging per frame and channel on the sphere (exponential kernel of great-circle distance).

    ``obs``: ``(T, C, H, W)`` with NaN where unobserved; the mean is the observations' mean.
    """
    T, C, H, W = obs.shape
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1).reshape(-1, 3)
    out = np.empty_like(obs)
    for t in range(T):
        for c in range(C):
            f = obs[t, c].reshape(-1)
            m = np.isfinite(f)
            if m.sum() < 2:
                out[t, c] = np.nanmean(f) if m.any() else 0.0
                continue
            p = xyz[m]
            d_oo = np.arccos(np.clip(p @ p.T, -1, 1)) * 6371.0
            d_go = np.arccos(np.clip(xyz @ p.T, -1, 1)) * 6371.0
            mu, sd = f[m].mean(), f[m].std() + 1e-12
            K = np.exp(-d_oo / length_km) + nugget * np.eye(m.sum())
            wts = np.linalg.solve(K, (f[m] - mu) / sd)
            out[t, c] = (mu + sd * np.exp(-d_go / length_km) @ wts).reshape(H, W)
    return out


def run_evaluation(task: str, data: str | Path, out: str | Path, quick: bool = False, model: str | None = None,
                   seed: int = 0, warm_data: str | Path | None = None, ar_model: str | None = None) -> Path:
    """Run one task (or ``all``) and write ``metrics.json``, ``report.md`` and figures into ``out``.

    One task run into a directory that holds a report already replaces that task's records and keeps
    the other tasks' (re-running one experiment does not lose the rest of a committed report).
    """
    tasks = TASKS if task == "all" else (task,)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"TASK must be one of {TASKS + ('all',)}, got {task!r}")
    kept: list[dict[str, Any]] = []
    kept_notes: list[str] = []
    existing = Path(out) / "metrics.json"
    if task != "all" and existing.exists():
        try:
            old = json.loads(existing.read_text())
            kept = [r for r in old if r["task"].split("_")[0] not in tasks]  # sparse_5% is sparse's
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{existing}: not a wind-bmi metrics file ({exc}); choose another --out") from exc
        kept_notes = [n for n in _report_notes(Path(out) / "report.md") if n.split()[0] not in tasks]
    ev = Evaluation(data, out, QUICK if quick else FULL, model, seed, warm_data, ar_model)
    t0 = time.perf_counter()
    for t in tasks:
        getattr(ev, t)()
        print(f"{t}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    ev.skill_figure()
    # a note is replaced by a new one on the same subject (its text before the first ':')
    subjects = {n.split(":")[0] for n in ev.notes}
    kept_notes = [n for n in kept_notes if n.split(":")[0] not in subjects]
    write_report(kept + merge_records(ev.records), kept_notes + ev.notes, ev.out)
    return Path(out) / "metrics.json"


def _report_notes(path: Path) -> list[str]:
    """The notes (``- ...`` lines above the table) of a ``report.md`` written by :func:`write_report`."""
    if not path.exists():
        return []
    notes = []
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            break
        if line.startswith("- "):
            notes.append(line[2:])
    return notes
