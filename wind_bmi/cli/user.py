"""User commands: run the component, evaluate it, cycle data assimilation, inspect and cut data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from wind_bmi.cli.args import existing_path, iso_date, positive_int, writable_folder
from wind_bmi.config import BmiConfig, load_config


def quicklook(nc_path: Path, png_path: Path, land_mask: np.ndarray | None = None) -> Path:
    """Map of the last frame's lowest-level temperature (mean and spread) with the land-sea outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import xarray as xr

    ds = xr.open_dataset(nc_path)
    last = ds.isel(time=-1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), constrained_layout=True)
    for ax, name, cmap in ((axes[0], "temperature", "RdBu_r"), (axes[1], "temperature_spread", "viridis")):
        da = last[name].isel(level=0)
        im = ax.pcolormesh(ds["lon"], ds["lat"], da, cmap=cmap, shading="auto")
        if land_mask is not None:
            ax.contour(ds["lon"], ds["lat"], land_mask, levels=[0.5], colors="k", linewidths=0.6)
        ax.set_title(f"{name} sigma={float(ds['level'][0]):.3f} at {str(last['time'].values)[:16]}")
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        fig.colorbar(im, ax=ax, label=ds[name].attrs.get("units", ""))
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def cmd_run(args: argparse.Namespace) -> int:
    """Drive WindBmi headless for ``run_hours`` and write netCDF output plus a quick-look PNG."""
    import xarray as xr
    from tqdm import tqdm

    from wind_bmi.bmi import WindBmi
    cfg = load_config(args.config, BmiConfig)
    out = Path(args.out) if args.out else Path(cfg.output or "out/run").parent
    writable_folder(str(out))
    nc = out / (Path(cfg.output).name if cfg.output else "forecast.nc")
    cfg = dataclasses.replace(cfg, output=str(nc))
    bmi = WindBmi()
    bmi.initialize_config(cfg, args.config)  # errors name the user's file, not a copy; nothing written yet
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_windows = int(np.ceil((bmi.get_end_time() - bmi.get_current_time()) / bmi.get_time_step()))
    with tqdm(total=n_windows, unit="window", desc="WindBmi") as bar:
        while bmi.get_current_time() < bmi.get_end_time() - 1e-9:
            bmi.update()
            bar.update(1)
    wall = time.perf_counter() - t0
    sample = bmi.component.sample_path
    bmi.finalize()
    mask = None
    try:
        from wind_bmi.data.layouts import open_any

        src: Any = open_any(sample)
        if "land_sea_mask" in src:
            lsm = src["land_sea_mask"]
            mask = np.asarray(lsm.isel(time=0).values if "time" in lsm.dims else lsm.values)
    except Exception:  # the outline is decoration; a file without a mask still gets its map
        mask = None
    png = quicklook(nc, out / "quicklook.png", mask)
    ds = xr.open_dataset(nc)
    print(f"wrote {nc} ({ds.sizes['time']} frames, {cfg.members} members) and {png} in {wall:.1f} s")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from wind_bmi.evaluation.experiments import run_evaluation

    try:
        path = run_evaluation(args.task, args.data, args.out, quick=args.quick, model=args.model, seed=args.seed,
                              warm_data=args.warm_data, ar_model=args.ar_model)
    except ValueError as exc:  # bad task, data or --out report (CheckpointError included)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.parent / 'report.md'}")
    return 0


def cmd_assimilate(args: argparse.Namespace) -> int:
    import os
    import sys

    from wind_bmi.coupling.assimilate import AssimilationError, load_assimilation_config, run_assimilation
    from wind_bmi.data import shipped_sample_path

    cfg = load_assimilation_config(args.config)
    if args.quick:  # a first run: the shipped sample is the truth, so it works on a fresh clone
        cfg = dataclasses.replace(cfg, truth="", cycles=min(cfg.cycles, 2), members=min(cfg.members, 2), steps=4)
    comm = None
    if any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")):
        from mpi4py import MPI  # imported only under an MPI launcher: importing initialises MPI

        comm = MPI.COMM_WORLD
    try:
        summary = run_assimilation(cfg, args.out, comm)
    except AssimilationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if comm is None or comm.Get_rank() == 0:
        if args.quick:
            print(f"--quick: {cfg.cycles} cycles, {cfg.members} members, {cfg.steps} steps, truth = the shipped "
                  f"sample ({shipped_sample_path()}), not the config's truth {load_assimilation_config(args.config).truth!r}")
        print(f"analysis RMSE {summary['rmse_analysis_K']:.3f} K, free {summary['rmse_free_K']:.3f} K, "
              f"spread {summary['spread_analysis_K']:.3f} K (SSR {summary['ssr']:.2f}); output in {args.out}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from wind_bmi.data.layouts import LayoutError, inspect_path

    status = 0
    for path in args.paths:
        try:
            report = inspect_path(path)
        except LayoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        if args.json:
            print(json.dumps(report, indent=1))
            continue
        print(f"{report['path']}: layout {report['layout']}")
        g, t = report["grid"], report["time"]
        print(f"  grid: {g['nlat']} x {g['nlon']} (lat {g['lat_range']}, lon {g['lon_range']})")
        print(f"  levels: {report['levels']}")
        if t["count"] == 1:
            print(f"  time: {t['first']} (one time, no step)")
        else:
            print(f"  time: {t['first']} .. {t['last']} ({t['count']} times, steps of {t['steps_hours']} h)")
        for name, v in report["variables"].items():
            print(f"  {name:28s} {v['units']:12s} {v['dims']}")
    return status


def cmd_data_subset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wind_bmi.data.speedy import write_subset

    writable_folder(str(Path(args.out).parent))
    path = write_subset(args.src, args.out, args.start, args.days, drop=tuple(args.drop))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_commands(sub: Any, dsub: Any) -> None:
    """Register the user commands (``run``, ``evaluate``, ``assimilate``, ``data inspect``, ``data subset``)."""
    ins = dsub.add_parser("inspect", help="report variables, levels, grid and time span of files or folders")
    ins.add_argument("paths", nargs="+")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=cmd_data_inspect)

    sub_ = dsub.add_parser("subset", help="cut a few days out of a dataset into one compact file (e.g. the shipped sample)")
    sub_.add_argument("src", type=existing_path, help="file or folder in a recognised layout")
    sub_.add_argument("--out", required=True, help="output netCDF file")
    sub_.add_argument("--start", type=iso_date, required=True, help="first time kept, YYYY-MM-DD")
    sub_.add_argument("--days", type=positive_int, required=True, help="days kept")
    sub_.add_argument("--drop", nargs="*", default=["geopotential"], help="variables left out")
    sub_.set_defaults(func=cmd_data_subset)

    run = sub.add_parser("run", help="drive WindBmi headless for the configured span; netCDF + quick-look PNG",
                         description="Initialise WindBmi from CONFIG (kind: bmi), update until run_hours, write the "
                                     "ensemble mean and spread as CF netCDF and a quick-look map.")
    run.add_argument("config", help="YAML config (kind: bmi)")
    run.add_argument("--out", help="output folder (default: the folder of the config's output)")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("evaluate", help="the paper's experiments against baselines; metrics.json, report.md, figures",
                        description="TASK: forecast, downscale, temporal, sparse, mass, warming or all.")
    ev.add_argument("task", choices=["forecast", "downscale", "temporal", "sparse", "mass", "warming", "all"])
    ev.add_argument("--data", required=True, help="held-out data (file or folder, any recognised layout)")
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--quick", action="store_true", help="tiny sizes for CI (<= 3 minutes); default: 8 dates, "
                                                   "8 members, 14-day forecasts, a 1-year mass run")
    ev.add_argument("--model", help="model card (default: the shipped prior)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--warm-data", help="the same period from the GCM with --sst-offset 2 (warming: the GCM's own "
                                        "precipitation-intensity change)")
    ev.add_argument("--ar-model", type=existing_path, help="forecast: also score this autoregressive baseline "
                                                         "(AR-UViT card, config/prior_ar.yaml) side by side")
    ev.set_defaults(func=cmd_evaluate)

    da = sub.add_parser("assimilate", help="cycled DA OSSE (run under mpiexec -n N): members and observation "
                                           "streams spread over ranks",
                        description="mpiexec -n N wind-bmi assimilate CONFIG [--quick] [--out DIR]")
    da.add_argument("config", nargs="?", default="config/assimilate.yaml", help="YAML (config/assimilate.yaml)")
    da.add_argument("--quick", action="store_true",
                    help="2 cycles, 2 members, 4 steps, truth = the shipped sample (a first run on a fresh clone)")
    da.add_argument("--out", default="out/assimilate", help="output folder")
    da.set_defaults(func=cmd_assimilate)
