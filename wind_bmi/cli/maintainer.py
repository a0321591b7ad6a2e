"""Maintainer commands: generate the SPEEDY data, train the prior, fit its band limit, report on it, benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from wind_bmi.cli.args import existing_path, iso_date, non_negative_int, positive_float, positive_int, writable_folder
from wind_bmi.config import ConfigError, GenerateConfig, TrainConfig, load_config


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


def cmd_train(args: argparse.Namespace) -> int:
    from wind_bmi.training import run_training

    cfg = load_config(args.config, TrainConfig, args.set or ())
    from pathlib import Path

    data = args.data or cfg.data
    if not Path(data).is_dir():
        raise ConfigError(f"train: data folder {data!r} does not exist (--data or the config's 'data')")
    if args.init_from:
        cfg = dataclasses.replace(cfg, init_from=args.init_from)
    if args.resume_from and not Path(args.resume_from).with_suffix(".json").is_file():
        raise ConfigError(f"train: --resume-from {args.resume_from!r}: no compact state (.json + .safetensors) there")
    card = run_training(cfg, data=args.data, out=args.out, resume=args.resume, max_minutes=args.max_minutes,
                        max_steps=args.max_steps, device=args.device, resume_from=args.resume_from,
                        export_state=args.export_state)
    print(f"model card: {card}")
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


def cmd_report_prior(args: argparse.Namespace) -> int:
    from wind_bmi.evaluation.prior_report import run_prior_report

    if not Path(args.data).exists():
        raise ValueError(f"--data {args.data!r} does not exist")
    rep = run_prior_report(args.data, args.out, card=args.model, rollout_days=args.days, steps=args.steps,
                           history=args.history, update_card=args.write_card, rollout_members=args.members,
                           rollout_seed=args.seed, band_limit=not args.no_band_limit)
    print(json.dumps({k: v for k, v in rep.items() if k != "unconditional_stats"}, indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from wind_bmi.evaluation.bench import run_bench

    writable_folder(args.out)
    path = run_bench(args.out, quick=args.quick, model=args.model, steps=args.steps)
    print(f"wrote {path} and {path.parent / 'bench.md'}")
    return 0


def add_commands(sub: Any, dsub: Any) -> None:
    """Register the maintainer commands (``data generate``, ``train``, ``band-limit``, ``report-prior``, ``bench``)."""
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

    tr = sub.add_parser("train", help="train the prior with diffusion forcing (torchrun for DDP)")
    tr.add_argument("--config", required=True, help="YAML preset (kind: train)")
    tr.add_argument("--data", help="data folder (overrides the config)")
    tr.add_argument("--out", help="run folder (overrides the config)")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/train_state.*")
    tr.add_argument("--init-from", dest="init_from", help="fine-tune: start from this prior card (JSON)")
    tr.add_argument("--max-minutes", type=positive_float, dest="max_minutes", help="stop this call after N minutes")
    tr.add_argument("--max-steps", type=non_negative_int, dest="max_steps", help="stop this call at step N")
    tr.add_argument("--device", default="cpu", help="cpu or cuda")
    tr.add_argument("--resume-from", dest="resume_from", metavar="STATE",
                    help="with --resume and no <out>/train_state.*: continue from a compact state (STATE.json)")
    tr.add_argument("--export-state", dest="export_state", metavar="STATE",
                    help="after this call, write the compact resumable state (float16 weights + EMA) to STATE.*")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key (dotted for sections, YAML value), e.g. normalisation=channel")
    tr.set_defaults(func=cmd_train)

    bl = sub.add_parser("band-limit", help="fit the data's zonal band limit into a prior's card",
                        description="Per channel and latitude row, the zonal wavenumbers the training data occupies "
                                    "(mean variance above EPS, normalised units); written into the card as "
                                    "'band_limit', which the denoiser then projects its estimates onto.")
    bl.add_argument("--model", required=True, help="model card (JSON) to update")
    bl.add_argument("--data", required=True, help="data folder holding the card's training years")
    bl.add_argument("--eps", type=float, default=1e-5, help="tail-variance threshold (default 1e-5)")
    bl.set_defaults(func=cmd_band_limit)

    rp = sub.add_parser("report-prior", help="the prior's scorecard on held-out data (losses, spectra, rollout)")
    rp.add_argument("--data", required=True, help="held-out data (e.g. data/speedy/test)")
    rp.add_argument("--out", required=True, help="folder for figures and prior_report.json")
    rp.add_argument("--model", help="model card (default: the shipped prior)")
    rp.add_argument("--days", type=positive_float, default=60.0, help="length of the unguided rollout")
    rp.add_argument("--members", type=positive_int, default=4, help="independent rollout members (batched)")
    rp.add_argument("--seed", type=int, default=1, help="seed of the rollout members' generator")
    rp.add_argument("--steps", type=positive_int, help="sampler steps (default: the BMI's, DDIM)")
    rp.add_argument("--history", help="train_state.json with the training history")
    rp.add_argument("--write-card", action="store_true",
                    help="also store the report in the card as test_report (the card is never touched without it)")
    rp.add_argument("--no-band-limit", action="store_true",
                    help="sample without the card's zonal band limit (ablation; implies nothing about the card)")
    rp.set_defaults(func=cmd_report_prior)

    be = sub.add_parser("bench", help="benchmark windows, network, training and memory; bench.json + bench.md")
    be.add_argument("--out", required=True, help="output folder")
    be.add_argument("--quick", action="store_true", help="few repetitions, small sizes (for tests)")
    be.add_argument("--model", type=existing_path, help="model card (default: the shipped prior)")
    be.add_argument("--steps", type=positive_int, help="sampler steps per window (default: the BMI default sampler.steps)")
    be.set_defaults(func=cmd_bench)
