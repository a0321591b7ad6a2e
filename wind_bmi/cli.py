"""``wind-bmi``: command-line interface (data, train, run, evaluate, bench, assimilate)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from wind_bmi.config import ConfigError, GenerateConfig, TrainConfig, load_config


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def iso_date(text: str) -> str:
    """argparse type: a calendar date ``YYYY-MM-DD``."""
    import datetime as dt

    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None
    return text


def existing_path(text: str) -> str:
    """argparse type: a file or folder that exists."""
    from pathlib import Path

    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def writable_folder(path: str) -> None:
    """Raise ``OSError`` naming ``path`` unless it is, or could be made as, a writable folder. Creates
    nothing: the first existing ancestor must be a folder this process may write into."""
    import os
    from pathlib import Path

    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or (p.exists() and not p.is_dir()):
        raise OSError(f"{path!r} is not a writable folder")


def _parse_days(args: argparse.Namespace) -> int | None:
    if args.days is not None and args.years is not None:
        raise SystemExit("give --days or --years, not both")
    if args.years is not None:
        return int(round(args.years * 365))
    return int(args.days) if args.days is not None else None


def cmd_data_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wind_bmi.data.speedy import generate

    cfg = load_config(args.config, GenerateConfig) if args.config else GenerateConfig()
    overrides = {"start": args.start, "days": _parse_days(args), "spinup_days": args.spinup_days, "seed": args.seed,
                 "sst_offset": args.sst_offset, "sst_anomaly": True if args.sst_anomaly else None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    bar = tqdm(total=cfg.days, unit="day", desc="SPEEDY")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    files = generate(cfg, args.out, progress=progress)
    bar.close()
    dt = time.perf_counter() - t0
    print(f"wrote {len(files)} files to {args.out} in {dt:.1f} s")
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


def cmd_band_limit(args: argparse.Namespace) -> int:
    from wind_bmi.training import fit_band_limit_into_card

    try:
        band = fit_band_limit_into_card(args.model, args.data, args.eps)
    except ValueError as exc:  # CheckpointError included: nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}: band limit (eps {args.eps:g}) keeps {100 * band.kept_fraction():.1f} % of the zonal "
          f"degrees of freedom; cutoff next to the poles {band.cutoff[:, 0].max()} / {band.cutoff[:, -1].max()}, "
          f"at the middle row {band.cutoff[:, band.cutoff.shape[1] // 2].max()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from wind_bmi.training import run_training

    cfg = load_config(args.config, TrainConfig)
    from pathlib import Path

    data = args.data or cfg.data
    if not Path(data).is_dir():
        raise ConfigError(f"train: data folder {data!r} does not exist (--data or the config's 'data')")
    if args.init_from:
        cfg = dataclasses.replace(cfg, init_from=args.init_from)
    card = run_training(cfg, data=args.data, out=args.out, resume=args.resume, max_minutes=args.max_minutes,
                        max_steps=args.max_steps, device=args.device)
    print(f"model card: {card}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from wind_bmi import __version__

    p = argparse.ArgumentParser(prog="wind-bmi", description=__doc__)
    p.add_argument("--version", action="version", version=f"wind-bmi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate or inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    gen = dsub.add_parser("generate", help="run the SPEEDY GCM (jcm, T31) and write 6-hourly CF netCDF, a file a month",
                          description="Run jcm SPEEDY at T31 offline, discard the spin-up, write monthly CF files. "
                                      "Re-running with the same options skips finished months.")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--start", type=iso_date, help="first saved date YYYY-MM-DD (default 1981-01-01)")
    gen.add_argument("--days", type=positive_int, help="days to save")
    gen.add_argument("--years", type=positive_float, help="years to save (365 days each)")
    gen.add_argument("--spinup-days", type=non_negative_int, dest="spinup_days",
                     help="days simulated and discarded first")
    gen.add_argument("--seed", type=int, help="initial-state seed (independent members)")
    gen.add_argument("--sst-offset", type=float, dest="sst_offset", help="uniform SST offset in K (e.g. 2)")
    gen.add_argument("--sst-anomaly", action="store_true", dest="sst_anomaly",
                     help="add the packaged interannual SST anomalies (1979-2013)")
    gen.add_argument("--config", help="YAML preset (kind: generate); flags override it")
    gen.set_defaults(func=cmd_data_generate)
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

    tr = sub.add_parser("train", help="train the prior with diffusion forcing (torchrun for DDP)")
    tr.add_argument("--config", required=True, help="YAML preset (kind: train)")
    tr.add_argument("--data", help="data folder (overrides the config)")
    tr.add_argument("--out", help="run folder (overrides the config)")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/train_state.*")
    tr.add_argument("--init-from", dest="init_from", help="fine-tune: start from this prior card (JSON)")
    tr.add_argument("--max-minutes", type=positive_float, dest="max_minutes", help="stop this call after N minutes")
    tr.add_argument("--max-steps", type=non_negative_int, dest="max_steps", help="stop this call at step N")
    tr.add_argument("--device", default="cpu", help="cpu or cuda")
    tr.set_defaults(func=cmd_train)

    bl = sub.add_parser("band-limit", help="fit the data's zonal band limit into a prior's card",
                        description="Per channel and latitude row, the zonal wavenumbers the training data occupies "
                                    "(mean variance above EPS, normalised units); written into the card as "
                                    "'band_limit', which the denoiser then projects its estimates onto.")
    bl.add_argument("--model", required=True, help="model card (JSON) to update")
    bl.add_argument("--data", required=True, help="data folder holding the card's training years")
    bl.add_argument("--eps", type=float, default=1e-5, help="tail-variance threshold (default 1e-5)")
    bl.set_defaults(func=cmd_band_limit)

    from wind_bmi import cli_more

    cli_more.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (a config key, a file, an argument) ends in one line on stderr naming
    it, exit status 2; anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:  # ConfigError, CheckpointError, LayoutError, ComponentError are ValueErrors
        message = " ".join(str(exc).split())
        print(f"wind-bmi {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
