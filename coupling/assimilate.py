"""Cycled data assimilation with MPI: observation streams on different ranks, members spread over ranks.

Each rank runs a :class:`~wind_bmi.WindBmi` holding its share of the ensemble. Every cycle:

1. each rank draws the observations of its own stream (station-like cells, noisy, valid at the
   end of the next window) from the truth run: temperature, and with ``extra_observations`` other
   variables at the same cells (radiosonde-like: winds, surface pressure...);
2. the observations (flat indices, values, errors per variable) are all-gathered; duplicates of one
   cell are merged (precision-weighted mean), cells outside the grid are dropped and counted;
3. every rank feeds them to its members through ``set_value_at_indices`` and ``update()`` runs one
   MMPS-guided window; a free-running ensemble advances beside it for comparison; the ranks then
   all-gather whether their windows succeeded, so a rank whose window fails (e.g. NaN) stops every
   rank with its message instead of leaving the others waiting in the next collective;
4. the analysis mean and spread are reduced across ranks (sums of x and x^2 over members).

Rank 0 writes the netCDF output (temp file, then rename); if any rank raises, every rank stops
with the message and no partial file is left. ``comm`` is passed in; mpi4py is never imported here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from wind_bmi.model.physics import latitude_weights

from wind_bmi.bmi import VARIABLE_TABLE
from wind_bmi.config import AssimilationConfig, BmiConfig, ConfigError, from_dict, load_config
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels
from wind_bmi.variables import STATE_VARIABLES, VARIABLES, derived_name

OBS_NAME = "atmosphere_air__observed_value_of_temperature"
STATE_NAME = "atmosphere_air__temperature"


class AssimilationError(RuntimeError):
    """A rank failed; the cycle stopped on every rank."""


class SerialComm:
    """The subset of an mpi4py communicator used here, for one process without MPI."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj


def load_assimilation_config(path: str | Path | None) -> AssimilationConfig:
    return load_config(path, AssimilationConfig) if path else AssimilationConfig()


def _split_members(total: int, size: int, rank: int) -> int:
    return total // size + (1 if rank < total % size else 0)


def observed_variables(cfg: AssimilationConfig) -> dict[str, float]:
    """Observed variable -> observation error (physical units): temperature first, then the extras.

    Raises ConfigError naming the key when an extra is not a state variable or its error is not positive.
    """

    if not cfg.inflation >= 1.0:
        raise ConfigError(f"inflation: expected a factor >= 1 (1 = none), got {cfg.inflation}")
    out = {"temperature": cfg.obs_error}
    for var, err in cfg.extra_observations.items():
        if var not in STATE_VARIABLES or var == "temperature":
            raise ConfigError(f"extra_observations.{var}: expected one of "
                              f"{[v for v in STATE_VARIABLES if v != 'temperature']}")
        if not err > 0:
            raise ConfigError(f"extra_observations.{var}: the observation error must be > 0, got {err}")
        out[var] = float(err)
    return out


def station_indices(cells: np.ndarray, n_levels: int, level_index: int, plane: int) -> np.ndarray:
    """Flat indices of the station ``cells`` in a ``(n_levels, H, W)`` field with ``plane = H * W``:
    every level, the one ``level_index`` (>= 0), or the cells themselves for a surface field."""
    if n_levels == 1:
        return cells
    if level_index >= 0:
        return level_index * plane + cells
    return (np.arange(n_levels)[:, None] * plane + cells[None, :]).reshape(-1)


def _bmi_config(cfg: AssimilationConfig, members: int, seed: int, truth: str, start: str) -> BmiConfig:
    """The config of one rank's component, built and validated in memory (nothing written)."""
    told = {v: e / math.sqrt(cfg.inflation) for v, e in observed_variables(cfg).items()}  # inflation (see the config)
    d = {"kind": "bmi", "model": cfg.model, "members": members, "seed": seed, "context_frames": 4, "initial_condition": truth,
         "start_time": start, "sampler": {"steps": cfg.steps, "eta": 1.0},
         "guidance": {"method": "mmps", "iterations": cfg.iterations},
         "observation_error": told, "run_hours": 6.0 * cfg.cycles}
    return from_dict(BmiConfig, d, "assimilation config (component)")


def merge_observations(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Concatenate streams; drop indices outside ``0..size-1``; merge duplicates by precision weighting.

    Returns ``(indices, values, errors, n_outside, n_duplicates)``.
    """
    idx = np.concatenate([p[0] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    val = np.concatenate([p[1] for p in parts]).astype(np.float64) if parts else np.zeros(0)
    err = np.concatenate([p[2] for p in parts]).astype(np.float64) if parts else np.zeros(0)
    inside = (idx >= 0) & (idx < size) & np.isfinite(val) & (err > 0)
    n_out = int((~inside).sum())
    idx, val, err = idx[inside], val[inside], err[inside]
    uniq, inv = np.unique(idx, return_inverse=True)
    w = 1.0 / err**2
    wsum = np.bincount(inv, weights=w, minlength=uniq.size)
    merged = np.bincount(inv, weights=w * val, minlength=uniq.size) / np.maximum(wsum, 1e-300)
    return uniq, merged, 1.0 / np.sqrt(np.maximum(wsum, 1e-300)), int(idx.size - uniq.size), n_out


def run_assimilation(cfg: AssimilationConfig, out: str | Path, comm: Any = None) -> dict[str, Any]:
    """Run the OSSE; returns the summary (also written to ``<out>/summary.json`` by rank 0)."""
    from wind_bmi import WindBmi
    from wind_bmi.data import shipped_sample_path

    comm = comm or SerialComm()
    rank, size = comm.Get_rank(), comm.Get_size()
    observed = observed_variables(cfg)  # a bad key stops the run here, before anything is written
    out = Path(out)
    truth_path = cfg.truth or str(shipped_sample_path())
    ds = open_any(truth_path)  # a missing truth stops the run here, named, before anything is written
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    comm.bcast(None)
    times = list(ds["time"].values)
    if len(times) < 4 + cfg.cycles:
        raise AssimilationError(f"truth {truth_path} has {len(times)} frames; {cfg.cycles} cycles need {4 + cfg.cycles}")
    start = times[3]
    start_s = f"{start.year:04d}-{start.month:02d}-{start.day:02d} {start.hour:02d}:00:00"
    my_members = _split_members(cfg.members, size, rank)
    if my_members < 1:
        raise AssimilationError(f"{cfg.members} members cannot be spread over {size} ranks")
    da, free = WindBmi(), WindBmi()
    component_cfg = _bmi_config(cfg, my_members, cfg.seed + 1000 * rank, truth_path, start_s)
    da.initialize_config(component_cfg)
    free.initialize_config(component_cfg)
    grid = da.get_var_grid(STATE_NAME)  # everything about the grid through BMI
    n = da.get_grid_size(grid)
    K, H, W = (int(v) for v in da.get_grid_shape(grid, np.zeros(3, dtype=int)))
    levels = da.get_grid_z(grid, np.empty(K))
    lat, lon = da.get_grid_y(grid, np.empty(H)), da.get_grid_x(grid, np.empty(W))
    card = da.model_card
    rng = np.random.default_rng(cfg.seed * 7919 + rank)
    stations = rng.choice(H * W, size=max(1, int(cfg.obs_fraction * H * W)), replace=False)
    lat_w = (latitude_weights(torch.from_numpy(lat)).numpy()[None, :, None] * np.ones((K, H, W))).reshape(-1)
    extras = [v for v in observed if v != "temperature"]
    # scored beside temperature, observed or not: the winds and surface pressure (and any other extra)
    scored = list(dict.fromkeys(["u_wind", "v_wind", "surface_pressure", *extras]))
    served = {VARIABLES[v].csdms: v for v in STATE_VARIABLES}
    outputs = {served[name] for name in da.get_output_var_names() if name in served}
    scored = [v for v in scored if v in outputs]
    ext_channels = {v: [Channel(v, float(lv)) for lv in levels] if VARIABLES[v].levels else [Channel(v, None)]
                    for v in scored}
    ext_size = {v: len(ext_channels[v]) * H * W for v in scored}
    scale = {v: VARIABLE_TABLE[VARIABLES[v].csdms].scale for v in scored}  # project -> BMI units
    history: dict[str, list[float]] = {"rmse_analysis": [], "rmse_free": [], "spread_analysis": [], "n_obs": [],
                                       "rmse_analysis_observed": [], "rmse_analysis_unobserved": []}
    mean_frames, spread_frames, out_times = [], [], []
    failed: str | None = None
    for cycle in range(cfg.cycles):
        valid = start + dt.timedelta(hours=6 * (cycle + 1))
        frame = ds.isel(time=[times.index(valid)])
        truth = stack_channels(frame, [Channel("temperature", lv) for lv in levels]).reshape(-1).astype(np.float64)
        truth_other = {name: stack_channels(frame, ext_channels[name]).reshape(-1) * scale[name] for name in scored}
        try:
            if cfg.moving:
                stations = rng.choice(H * W, size=stations.size, replace=False)
            cells = stations
            idx = station_indices(cells, K, cfg.level_index, H * W)
            vals = truth[idx] + rng.normal(0.0, cfg.obs_error, idx.size)
            errs = np.full(idx.size, cfg.obs_error)
            streams = {"temperature": (idx, vals, errs)}
            for name in extras:  # the same cells (all the variable's levels, or the one observed level)
                vi = station_indices(cells, len(ext_channels[name]), cfg.level_index, H * W)
                streams[name] = (vi, truth_other[name][vi] + rng.normal(0.0, observed[name], vi.size) * scale[name],
                                 np.full(vi.size, observed[name] * scale[name]))
            mine: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | str = streams
        except Exception as exc:  # noqa: BLE001 - any failure must reach every rank
            mine = f"rank {rank}: {type(exc).__name__}: {exc}"
        gathered = comm.allgather(mine)
        failed = _failures(gathered)
        if failed:
            break
        parts = [g for g in gathered if not isinstance(g, str)]
        g_idx, g_val, g_err, n_dup, n_out = merge_observations([g["temperature"] for g in parts], n)
        merged_extra = {name: merge_observations([g[name] for g in parts], ext_size[name]) for name in extras}
        # the observation error is per variable in the component: use the merged values at the stream error
        try:
            da.set_value_at_indices(OBS_NAME, g_idx, g_val)
            for name, (e_idx, e_val, *_) in merged_extra.items():
                da.set_value_at_indices(derived_name(VARIABLES[name].csdms, "observed"), e_idx, e_val)
            da.update()
            free.update()
            status: str | None = None
        except Exception as exc:  # noqa: BLE001 - a rank that fails its window must not leave the others waiting
            status = f"rank {rank} (cycle {cycle + 1}, window update): {type(exc).__name__}: {exc}"
        failed = _failures(comm.allgather(status))
        if failed:
            break
        members = da.get_value(derived_name(STATE_NAME, "members"), np.empty(my_members * n)).reshape(my_members, n)
        fm = free.get_value(derived_name(STATE_NAME, "members"), np.empty(my_members * n)).reshape(my_members, n)
        s1, s2, f1, cnt = _reduce(comm, members, fm)
        mean = s1 / cnt
        var = np.maximum(s2 / cnt - mean**2, 0.0) * cnt / max(cnt - 1, 1)
        fmean = f1 / cnt
        seen = np.zeros(n, dtype=bool)
        seen[g_idx] = True  # the analysis where observed (fit to the data) and away from them
        history["rmse_analysis"].append(weighted_rms(mean - truth, lat_w))
        history["rmse_free"].append(weighted_rms(fmean - truth, lat_w))
        history["spread_analysis"].append(weighted_rms(np.sqrt(var), lat_w))
        history["rmse_analysis_observed"].append(weighted_rms((mean - truth)[seen], lat_w[seen]))
        history["rmse_analysis_unobserved"].append(weighted_rms((mean - truth)[~seen], lat_w[~seen]))
        history["n_obs"].append(int(g_idx.size))
        for name in scored:  # the analysis of the other variables (BMI units) against their truth
            nv = ext_size[name]
            out_name = derived_name(VARIABLES[name].csdms, "members")
            em = da.get_value(out_name, np.empty(my_members * nv)).reshape(my_members, nv)
            ef = free.get_value(out_name, np.empty(my_members * nv)).reshape(my_members, nv)
            e1, _, ef1, ecnt = _reduce(comm, em, ef)
            tv = truth_other[name]
            history.setdefault(f"rmse_analysis_{name}", []).append(weighted_rms(e1 / ecnt - tv, lat_w[:nv]))
            history.setdefault(f"rmse_free_{name}", []).append(weighted_rms(ef1 / ecnt - tv, lat_w[:nv]))
            if name in merged_extra and merged_extra[name][0].size:  # where it is observed
                at = merged_extra[name][0]
                history.setdefault(f"rmse_observed_{name}", []).append(weighted_rms((e1 / ecnt - tv)[at], lat_w[at]))
        if cycle == 0:
            history["duplicates_merged"] = [n_dup]
            history["outside_grid_dropped"] = [n_out]
        mean_frames.append(mean.reshape(K, H, W))
        spread_frames.append(np.sqrt(var).reshape(K, H, W))
        out_times.append(valid)
    da.finalize()
    free.finalize()
    if failed:
        if rank == 0:
            for f in out.glob("*.tmp"):
                f.unlink()
        raise AssimilationError(f"assimilation stopped at a cycle: {failed}")
    ra, rf, sp, ro, ru = (np.mean(history[k][len(history[k]) // 2:]) for k in (
        "rmse_analysis", "rmse_free", "spread_analysis", "rmse_analysis_observed", "rmse_analysis_unobserved"))
    summary = {"model": card.get("name"), "model_sha256": card["weights"]["sha256"],
               "cycles": cfg.cycles, "ranks": size, "members": cfg.members, "obs_error_K": cfg.obs_error,
               "inflation": cfg.inflation,
               "observed_variables": observed,
               "rmse_analysis_K": float(ra), "rmse_free_K": float(rf), "spread_analysis_K": float(sp),
               "rmse_analysis_observed_K": float(ro), "rmse_analysis_unobserved_K": float(ru),
               "ssr": float(sp / ra) if ra > 0 else float("nan"),
               "other_variables_rmse": {name: {k: float(np.mean(history[f"rmse_{k}_{name}"][len(history[
                   f"rmse_{k}_{name}"]) // 2:])) for k in ("analysis", "free", "observed")
                   if f"rmse_{k}_{name}" in history} for name in scored},
               "history": history,
               "note": "means over the second half of the cycles; latitude-weighted over all levels"}
    if rank == 0:
        dsout = xr.Dataset(
            {"temperature_analysis": (("time", "level", "lat", "lon"), np.stack(mean_frames).astype(np.float32),
                                      {"units": "K", "long_name": "analysis ensemble mean temperature"}),
             "temperature_spread": (("time", "level", "lat", "lon"), np.stack(spread_frames).astype(np.float32),
                                    {"units": "K", "long_name": "analysis ensemble spread"})},
            coords={"time": out_times, "level": np.asarray(levels), "lat": lat, "lon": lon},
            attrs={"Conventions": "CF-1.11", "summary": json.dumps({k: v for k, v in summary.items()
                                                                   if k != "history"})})
        tmp = out / "analysis.nc.tmp"
        dsout.to_netcdf(tmp, encoding={"time": {"units": "hours since 1900-01-01", "calendar": "proleptic_gregorian"}})
        os.replace(tmp, out / "analysis.nc")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        _figure(history, cfg.obs_error, out / "osse.png")
    return summary


def _failures(gathered: list[Any]) -> str | None:
    """The ranks' error messages (the strings among the all-gathered items) joined, or None."""
    errors = [g for g in gathered if isinstance(g, str)]
    return "; ".join(errors) if errors else None


def weighted_rms(e: np.ndarray, w: np.ndarray) -> float:
    """``sqrt(sum w e^2 / sum w)``: the latitude-weighted RMS of ``e`` over the cells given."""
    return float(np.sqrt(np.sum(w * e**2) / max(float(w.sum()), 1e-12)))


def _figure(history: dict[str, list[float]], obs_error: float, path: Path) -> None:
    """RMSE of the analysis and free ensembles, analysis spread and the observation error per cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = (np.arange(len(history["rmse_analysis"])) + 1) * 0.25
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    ax.plot(days, history["rmse_free"], label="free ensemble mean RMSE")
    ax.plot(days, history["rmse_analysis"], label="analysis mean RMSE")
    ax.plot(days, history["rmse_analysis_observed"], lw=0.8, label="analysis RMSE at observed points")
    ax.plot(days, history["spread_analysis"], "--", label="analysis spread")
    ax.axhline(obs_error, color="k", lw=0.8, ls=":", label="observation error")
    ax.set_xlabel("days")
    ax.set_ylabel("temperature (K)")
    ax.legend(fontsize=8)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _reduce(comm: Any, members: np.ndarray, fm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    parts = comm.allgather((members.sum(0), (members**2).sum(0), fm.sum(0), members.shape[0]))
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), sum(p[3] for p in parts))
