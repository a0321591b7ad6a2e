"""``wind-bmi train``: data splits -> Trainer -> exported prior (safetensors + card).

Run single-process, or with ``torchrun --nproc_per_node N`` for DistributedDataParallel
(gloo on CPU, nccl on GPUs); the process group is set up here from torchrun's environment.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wind_bmi.config import ConfigError, TrainConfig, to_dict
from wind_bmi.data.windows import Channel, Normalisation, Splits, WindowDataset, build_splits, load_years
from wind_bmi.model.bandlimit import ZonalBandLimit
from wind_bmi.model.checkpoint import Prior, load_prior, save_prior, write_card
from wind_bmi.model.denoiser import fast_bf16
from wind_bmi.model.network import UViT, count_parameters
from wind_bmi.model.physics import latitude_weights
from wind_bmi.model.schedule import CosineVPSchedule
from wind_bmi.model.train import Trainer, TrainSettings, hardware_description
from wind_bmi.variables import VECTOR_VARIABLES


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def settings_from(cfg: TrainConfig) -> TrainSettings:
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    return TrainSettings(**{k: getattr(cfg, k) for k in names})


def batch_fn(ds: WindowDataset) -> Any:
    def get(idx: Any) -> torch.Tensor:
        return torch.from_numpy(ds.batch(idx))
    return get


def network_for(cfg: TrainConfig, variables: list[str], grid: tuple[int, int]) -> UViT:
    """The UViT of ``cfg.model`` over channels whose variables are ``variables`` (one per channel)."""
    m = cfg.model
    vector = tuple(i for i, v in enumerate(variables) if v in VECTOR_VARIABLES) if m.pole_flip_winds else ()
    return UViT(len(variables), m.frames, grid, channels=m.channels, blocks_per_stage=m.blocks_per_stage, dim=m.dim,
                depth=m.depth, heads=m.heads, patch=m.patch, in_patch=m.in_patch, vector_channels=vector,
                temporal_mix=m.temporal_mix)


def check_init(prior: Prior, cfg: TrainConfig, splits: Splits, net: UViT) -> None:
    """Raise ``ValueError`` naming what differs between the prior in ``cfg.init_from`` and this run."""
    card, src = prior.card, cfg.init_from
    mine = [(c.variable, c.level) for c in splits.channels]
    theirs = [(c["variable"], c["level"]) for c in card["channels"]]
    if [(v, None if lv is None else round(float(lv), 6)) for v, lv in mine] != \
            [(v, None if lv is None else round(float(lv), 6)) for v, lv in theirs]:
        raise ValueError(f"init_from {src}: channels {theirs[:3]}... differ from the data's {mine[:3]}...")
    for key, values in (("lat", splits.lat), ("lon", splits.lon)):
        if not np.allclose(np.asarray(card["grid"][key]), np.asarray(values), atol=1e-6):
            raise ValueError(f"init_from {src}: grid {key} differs from the data's")
    sched = {k: v for k, v in card["schedule"].items() if k != "kind"}
    if sched != to_dict(cfg.schedule):
        raise ValueError(f"init_from {src}: schedule {sched} differs from the config's {to_dict(cfg.schedule)}")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in prior.net.state_dict().items()}
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff and not set(diff) <= added_mixers(prior, net):
        raise ValueError(f"init_from {src}: architecture differs from the config's model (tensors {diff[:4]})")


def added_mixers(prior: Prior, net: UViT) -> set[str]:
    """Tensors of ``net``'s frame mixers when ``prior`` has none: a prior grows them at fine-tuning.

    The mixers start as the identity (zero-initialised residual), so the grown network computes
    exactly what ``prior`` does until training moves them.
    """
    if not net.temporal_mix or prior.net.temporal_mix:
        return set()
    return {k for k in net.state_dict() if k.startswith(("mix_down.", "mix_up."))}


def _init_record(prior: Prior, path: str) -> dict[str, Any]:
    tr = prior.card.get("training", {})
    return {"card": path, "name": prior.card.get("name"), "sha256": prior.card["weights"]["sha256"],
            "steps": tr.get("total_steps", tr.get("steps")),
            "wall_seconds": tr.get("total_wall_seconds", tr.get("wall_seconds")),
            "elapsed_seconds": tr.get("total_elapsed_seconds", tr.get("elapsed_seconds")),
            "git_commit": prior.card.get("git_commit")}


def make_card(cfg: TrainConfig, splits: Splits, net: UViT, trainer: Trainer, val: dict[str, float],
              init: dict[str, Any] | None = None) -> dict[str, Any]:
    arch = dict(to_dict(cfg.model))
    arch["in_channels"] = len(splits.channels)
    arch["vector_channels"] = list(net.vector_channels)
    training: dict[str, Any] = {
        "steps": trainer.step, "wall_seconds": round(trainer.wall, 1), "elapsed_seconds": round(trainer.elapsed, 1),
        "settings": to_dict(trainer.s), "hardware": hardware_description(),
        "windows_train": len(splits.train), "windows_val": len(splits.val),
        "pieces": [h for h in trainer.history if h.get("event") == "piece"],
        "history_tail": [h for h in trainer.history if h.get("event") != "piece"][-5:]}
    if init is not None:  # fine-tuned: the totals count the prior it started from
        training["init_from"] = init
        training["total_steps"] = int(init["steps"] or 0) + trainer.step
        training["total_wall_seconds"] = round(float(init["wall_seconds"] or 0.0) + trainer.wall, 1)
        if init.get("elapsed_seconds") is not None:
            training["total_elapsed_seconds"] = round(float(init["elapsed_seconds"]) + trainer.elapsed, 1)
    return {
        "name": Path(cfg.out).name,
        "architecture": arch,
        "parameters": count_parameters(net),
        "schedule": {"kind": "cosine_vp", **to_dict(cfg.schedule)},
        "channels": [{"variable": c.variable, "level": c.level} for c in splits.channels],
        "variables": list(cfg.variables),
        "levels": [float(v) for v in splits.levels],
        "level_kind": "sigma",
        "level_bounds": splits.level_bounds.tolist() if splits.level_bounds is not None else None,
        "grid": {"kind": "gaussian", "lat": [float(v) for v in splits.lat], "lon": [float(v) for v in splits.lon]},
        "time_step_hours": 6,
        "normalisation": splits.norm.to_dict(),
        "provenance": splits.provenance,
        "training": training,
        "validation": val,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _init_distributed() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return True
    return False


def data_folders(data: str | Path) -> list[Path]:
    """The generator runs (one sub-folder per seed) under ``data``, or ``data`` itself."""
    # folders still empty (being generated) are skipped
    return [p for p in sorted(Path(data).iterdir()) if p.is_dir() and any(p.glob("*.nc"))] or [Path(data)]


def fit_band_limit_into_card(card: str | Path, data: str | Path, eps: float = 1e-5,
                             years: Sequence[int] | None = None) -> ZonalBandLimit:
    """Fit the zonal band limit of a prior's training data and write it into its card (atomically).

    The frames of ``years`` (default: the card's training years) in ``data`` are normalised with the
    card's statistics; the weights are not touched (their checksum in the card stays valid).

    Raises:
        ValueError: the data lacks the years, or its channels or grid differ from the card's.
    """
    card_path = Path(card)
    prior = load_prior(card_path)
    c = prior.card
    years = list(years if years is not None else c.get("provenance", {}).get("train_years") or [])
    if not years:
        raise ValueError(f"model card {card_path}: no provenance 'train_years'; pass the years to fit on")
    channels = [Channel(ch["variable"], ch["level"]) for ch in c["channels"]]
    norm = Normalisation.from_dict(c["normalisation"], prior.tensors)
    shape = (len(channels), *prior.grid)

    def chunks() -> Iterator[np.ndarray]:  # one year at a time bounds memory
        for year in years:
            raw = load_years(data_folders(data), [year], channels)
            if raw.shape[1:] != shape:
                raise ValueError(f"data {data}, year {year}: frames of shape {raw.shape[1:]}, the card's model "
                                 f"is (C, H, W) = {shape}")
            yield norm.normalise(raw)

    band = ZonalBandLimit.fit(chunks(), eps)
    c["band_limit"] = {**band.to_dict(), "fitted_on": {"data": str(data), "years": years}}
    write_card(c, card_path)
    return band


def run_training(cfg: TrainConfig, data: str | None = None, out: str | None = None, resume: bool = False,
                 max_minutes: float | None = None, max_steps: int | None = None, device: str = "cpu",
                 progress: bool = True, resume_from: str | None = None, export_state: str | None = None) -> Path:
    """Train (or resume) and export ``<out>/model.json`` + ``model.safetensors`` from the EMA weights.

    ``resume``: continue bit for bit from ``<out>/train_state.*``; where there is none, from the
    compact state ``resume_from`` (weights and EMA, fresh optimiser: see ``Trainer.export_compact``).
    ``export_state``: write the compact state there after this call (what a campaign commits).
    """
    if cfg.normalisation not in Normalisation.KINDS:
        raise ConfigError(f"config key 'normalisation': expected one of {list(Normalisation.KINDS)}, "
                          f"got {cfg.normalisation!r}")
    if data:
        cfg = dataclasses.replace(cfg, data=data)
    if out:
        cfg = dataclasses.replace(cfg, out=out)
    started_dist = _init_distributed()
    try:
        paths = data_folders(cfg.data)  # each sub-folder is one generator run (seed)
        init = load_prior(cfg.init_from) if cfg.init_from else None
        norm = Normalisation.from_dict(init.card["normalisation"], init.tensors) if init else None
        splits = build_splits(paths, cfg.variables, cfg.train_years, cfg.val_years, (), T=cfg.model.frames,
                              norm=norm, normalisation=cfg.normalisation)
        grid = (len(splits.lat), len(splits.lon))
        torch.manual_seed(cfg.seed)
        net = network_for(cfg, [c.variable for c in splits.channels], grid)
        if init is not None:
            check_init(init, cfg, splits, net)
            # check_init let only grown mixers differ; they keep their identity init (EMA copies all)
            net.load_state_dict(init.net.state_dict(), strict=False)
        sched = CosineVPSchedule(cfg.schedule.a_min, cfg.schedule.s_min)
        latw = latitude_weights(torch.tensor(np.array(splits.lat, dtype=np.float64))).float()
        band = init.band_limit if init is not None else None  # a fine-tuned prior keeps its own
        if band is None and cfg.band_limit_eps is not None:
            band = ZonalBandLimit.fit(splits.train.frames, cfg.band_limit_eps)
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device(device)
        settings = settings_from(cfg)
        if settings.bf16 and not fast_bf16(dev):
            # emulated bf16 is far slower than fp32 (fast_bf16): say so and train in fp32
            print(f"config key 'bf16': {dev} has no native bfloat16 (AMX, AVX-512 BF16 or CUDA); "
                  "training in fp32", file=sys.stderr)
            settings = dataclasses.replace(settings, bf16=False)
        trainer = Trainer(net, sched, settings, batch_fn(splits.train), len(splits.train),
                          batch_fn(splits.val), len(splits.val), latw, cfg.out, dev, band)
        if resume and (Path(cfg.out) / "train_state.json").exists():
            trainer.load_state()
        elif resume_from:
            trainer.load_compact(resume_from)
        val = trainer.fit(max_steps=max_steps, max_minutes=max_minutes, progress=progress)
        card_path = Path(cfg.out) / "model.json"
        if trainer.rank == 0:
            record = _init_record(init, str(cfg.init_from)) if init is not None else None
            card = make_card(cfg, splits, net, trainer, val, record)
            if band is not None:
                card["band_limit"] = {**band.to_dict(), "fitted_on": {"years": list(cfg.train_years)}}
            save_prior(trainer.ema, card, card_path, splits.norm.tensors())
            if export_state:
                trainer.export_compact(export_state)
        return card_path
    finally:
        if started_dist:
            dist.destroy_process_group()
