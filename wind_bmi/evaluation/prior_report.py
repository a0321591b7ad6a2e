"""``wind-bmi report-prior``: the prior's own scorecard on held-out data, written into its card.

* denoising loss per noise band on test windows (latitude-weighted MSE, normalised units);
* unconditional samples: per-channel mean and standard deviation against the data;
* zonal power spectra of T (sigma 0.51) and u (sigma 0.2), samples against data (figure);
* unguided rollouts (window after window, clean context; ``rollout_members`` independent members
  from the first test state): global-mean T drift per member and of the ensemble mean, NaN check;
* denoising RMSE per latitude row at one noise level (the polar rows are where a prior trained
  with area weights fails first: it passes the noise through there);
* the training curve (figure) from the run's history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wind_bmi.config import SamplerConfig
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, WindowDataset, stack_channels
from wind_bmi.evaluation.scores import latitude_weights, zonal_power_spectrum
from wind_bmi.model.checkpoint import load_prior, shipped_card_path, write_card
from wind_bmi.model.physics import latitude_weights as latw_torch
from wind_bmi.model.tasks import WindModel
from wind_bmi.model.train import validation_losses


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_ratio(sample: np.ndarray, data: np.ndarray) -> float | None:
    """Mean log10 power ratio over a wavenumber band; None where the grid has no such wavenumbers."""
    return float(np.mean(np.log10(sample / data))) if sample.size else None


def _max_abs_log_ratio(sample: np.ndarray, data: np.ndarray) -> float | None:
    """The largest ``|log10(sample / data)|`` over the wavenumbers the data hold (a factor 1.5 is 0.176)."""
    keep = data > 0
    if not keep.any():
        return None
    return float(np.abs(np.log10(np.maximum(sample[keep], 1e-300) / data[keep])).max())


def denoising_error_by_row(denoise: Any, schedule: Any, windows: torch.Tensor, t: float,
                           generator: torch.Generator) -> np.ndarray:
    """RMSE per latitude row ``(H,)`` of ``denoise(z, t)`` against clean ``windows`` ``(B, T, C, H, W)``
    noised to level ``t`` in every frame (normalised units)."""
    tt = torch.full(windows.shape[:2], t, dtype=windows.dtype)
    z = schedule.noise(windows, tt, generator)
    with torch.no_grad():
        err = denoise(z, tt) - windows
    return err.pow(2).mean(dim=(0, 1, 2, 4)).sqrt().double().numpy()  # type: ignore[no-any-return]


def context_use(denoise: Any, schedule: Any, windows: torch.Tensor, t: float,
                generator: torch.Generator) -> dict[str, list[float]]:
    """How much the estimate uses a clean first frame: RMSE per frame ``(T,)`` of ``denoise(z, t)``
    with frame 0 clean and the others at level ``t``, beside persisting frame 0 (normalised units).

    At ``t = 1`` the generated frames hold no signal, so only the context can bring the estimate below
    climatology; a prior that uses it well lands near or below persistence for the first frames.
    """
    tt = torch.full(windows.shape[:2], t, dtype=windows.dtype)
    tt[:, 0] = 0.0
    z = schedule.noise(windows, tt, generator)
    with torch.no_grad():
        err = denoise(z, tt) - windows
    rmse = lambda e: e.pow(2).mean(dim=(0, 2, 3, 4)).sqrt().double().tolist()  # noqa: E731
    return {"estimate": rmse(err), "persistence": rmse(windows - windows[:, :1]),
            "climatology": rmse(windows)}


def run_prior_report(data: str | Path, out: str | Path, card: str | Path | None = None, samples: int = 8,
                     rollout_days: float = 60.0, steps: int | None = None, history: str | Path | None = None,
                     rollout_members: int = 4, rollout_seed: int = 1,
                     update_card: bool = False, band_limit: bool = True) -> dict[str, Any]:
    if rollout_members < 1:
        raise ValueError(f"rollout_members must be >= 1, got {rollout_members}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card_path = Path(card) if card else shipped_card_path()
    prior = load_prior(card_path)
    sampler = SamplerConfig()  # the BMI's default sampler, unless ``steps`` says otherwise
    steps = steps or sampler.steps
    wm = WindModel(prior, "cpu", bf16=None, steps=steps, eta=sampler.eta, band_limit=band_limit)
    ds = open_any(data)
    phys = stack_channels(ds, [Channel(v, lv) for v, lv in wm.channels])  # (N, C, H, W)
    norm = wm.normalise(torch.from_numpy(phys)).numpy()
    windows = WindowDataset(norm, list(ds["time"].values), wm.T)
    lat = wm.lat.numpy()
    report: dict[str, Any] = {"data": str(data), "frames": int(phys.shape[0]),
                              "sampler": {"steps": steps, "eta": sampler.eta},
                              "band_limit": wm.denoiser.band_limit is not None}

    latw = latw_torch(wm.lat).float()
    report["test_loss_per_band"] = validation_losses(prior.net, lambda idx: torch.from_numpy(windows.batch(idx)),
                                                     len(windows), prior.schedule, latw, 64, True,
                                                     band_limit=wm.denoiser.band_limit)

    step = max(1, len(windows) // 8)
    sel = torch.from_numpy(windows.batch(list(range(0, len(windows), step))[:8]))
    rows = denoising_error_by_row(wm.denoiser, prior.schedule, sel, 0.3, torch.Generator().manual_seed(3))
    mid = slice(len(rows) // 2 - 4, len(rows) // 2 + 4)
    report["denoise_rmse_by_row_t0.3"] = {"rows": [float(v) for v in rows],
                                          "south_rows_0_1": [float(v) for v in rows[:2]],
                                          "north_rows_-2_-1": [float(v) for v in rows[-2:]],
                                          "equatorial_mean": float(rows[mid].mean())}
    report["context_use_t1"] = context_use(wm.denoiser, prior.schedule, sel, 1.0, torch.Generator().manual_seed(4))

    g = torch.Generator().manual_seed(0)
    ctx = torch.zeros(samples, wm.T, wm.C, wm.H, wm.W)
    uncond = wm.denormalise(wm.sample(ctx, torch.zeros(wm.T, dtype=torch.bool), generator=g)).numpy()  # (S, T, C, H, W)
    w = latitude_weights(lat)[:, None]
    stats = []
    for c, (v, lv) in enumerate(wm.channels):
        d = phys[:, c]
        s = uncond[:, :, c]
        stats.append({"variable": v, "level": lv,
                      "data_mean": float((d * w).mean()), "sample_mean": float((s * w).mean()),
                      "data_std": float(np.sqrt(((d - (d * w).mean()) ** 2 * w).mean())),
                      "sample_std": float(np.sqrt(((s - (s * w).mean()) ** 2 * w).mean()))})
    report["unconditional_stats"] = stats

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    spectra = {}
    for ax, (v, lv) in zip(axes, (("temperature", 0.51), ("u_wind", 0.2)), strict=True):
        c = wm.channel_index(v, lv)
        sd = zonal_power_spectrum(phys[:, c], lat).mean(axis=0)
        ss = zonal_power_spectrum(uncond[:, :, c].reshape(-1, wm.H, wm.W), lat).mean(axis=0)
        k = np.arange(1, sd.size)
        ax.loglog(k, sd[1:], label="SPEEDY (test year)")
        ax.loglog(k, ss[1:], label="WIND samples")
        ax.set_title(f"{v} sigma={lv}")
        ax.set_xlabel("zonal wavenumber")
        ax.set_ylabel("power")
        ax.legend()
        spectra[f"{v}@{lv}"] = {"log10_ratio_k1_10": _log_ratio(ss[1:11], sd[1:11]),
                                "log10_ratio_k11_30": _log_ratio(ss[11:31], sd[11:31]),
                                "max_abs_log10_ratio_k1_30": _max_abs_log_ratio(ss[1:31], sd[1:31])}
    fig.savefig(out / "prior_spectra.png", dpi=90)
    plt.close(fig)
    report["spectra"] = spectra

    # members as the batch: one long rollout scatters by a few tenths of a kelvin, so several are drawn
    roll = wm.rollout(torch.from_numpy(phys[0]), rollout_days, rollout_members,
                      torch.Generator().manual_seed(rollout_seed)).numpy()  # (M, n, C, H, W)
    tch = wm.channels_of("temperature")
    gm = (roll[:, :, tch] * w).mean(axis=(2, 3, 4))  # (M, n)
    gm0 = float((phys[0, tch] * w).mean())
    n = min(gm.shape[1], phys.shape[0] - 1)
    truth_gm = (phys[1:n + 1, tch] * w).mean(axis=(1, 2, 3))
    diff = np.abs(gm[:, :n] - truth_gm[None])  # (M, n)
    report["rollout"] = {"days": rollout_days, "members": rollout_members, "finite": bool(np.isfinite(roll).all()),
                         "global_mean_T_start": gm0, "global_mean_T_end": float(gm[:, -1].mean()),
                         "max_abs_drift_K": float(np.abs(gm - gm0).max()),
                         "max_abs_diff_to_truth_K": float(diff.max()),
                         "member_max_abs_diff_to_truth_K": [float(v) for v in diff.max(axis=1)],
                         "ensemble_mean_max_abs_diff_to_truth_K": float(np.abs(gm[:, :n].mean(0) - truth_gm).max()),
                         "truth_range_K": float(truth_gm.max() - truth_gm.min()) if n else 0.0}
    # spectra of the rollout's last 10 days against the data's: does a long run keep the data's scales?
    last = roll[:, -min(roll.shape[1], 40):]
    report["rollout"]["spectra_last_10_days"] = {}
    for v, lv in (("temperature", 0.51), ("u_wind", 0.2)):
        c = wm.channel_index(v, lv)
        sd = zonal_power_spectrum(phys[:, c], lat).mean(axis=0)[1:]
        sr = zonal_power_spectrum(last[:, :, c].reshape(-1, wm.H, wm.W), lat).mean(axis=0)[1:]
        report["rollout"]["spectra_last_10_days"][f"{v}@{lv}"] = {
            "max_abs_log10_ratio_k1_30": _max_abs_log_ratio(sr[:30], sd[:30]),
            "log10_ratio_k11_30": _log_ratio(sr[10:30], sd[10:30])}
    fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
    days = np.arange(1, gm.shape[1] + 1) / 4
    for m in range(rollout_members):
        ax.plot(days, gm[m], color="tab:blue", lw=0.8, alpha=0.7, label="WIND unguided members" if m == 0 else None)
    ax.plot(days, gm.mean(0), color="tab:blue", lw=2, label="ensemble mean")
    ax.plot(days[:n], truth_gm, color="k", label="SPEEDY truth")
    ax.set_xlabel("days")
    ax.set_ylabel("global-mean T (all levels), K")
    ax.legend()
    fig.savefig(out / "prior_rollout.png", dpi=90)
    plt.close(fig)

    hist_path = Path(history) if history else card_path.parent / "train_state.json"
    if hist_path.exists():
        hist = json.loads(hist_path.read_text())["history"]
        pts = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (weighted)")
        ax.set_yscale("log")
        fig.savefig(out / "training_curve.png", dpi=90)
        plt.close(fig)
    (out / "prior_report.json").write_text(json.dumps(report, indent=1))
    if update_card:
        c = json.loads(card_path.read_text())
        c["test_report"] = report
        write_card(c, card_path)
    return report
