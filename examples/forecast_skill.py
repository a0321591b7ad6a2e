"""How well the prior forecasts 6 hours from a perfect state, against persistence, per latitude band.

The background of every data-assimilation cycle (``wind-bmi assimilate``) is such a 6-h forecast,
so its error is the floor the analysis works from away from the observations. For each start the
four truth frames ending at it are the clean context; the prior generates the next frame (no
observations), and the ensemble mean of one variable (temperature by default; ``--variable``,
``--level``) is compared with the truth and with persisting the last context frame. RMSEs are
latitude-weighted over the chosen levels (default all), in the variable's units.

    python examples/forecast_skill.py [--data DIR] [--starts 3 11 19 27] [--members 4] [--steps 8]
    python examples/forecast_skill.py --data DIR --denoise-levels 0.02 0.1 0.3 1 [--starts ...]
    python examples/forecast_skill.py --variable surface_pressure --denoise-levels 0.02 0.3

``--denoise-levels`` asks why: with the four truth frames clean, the true next frame is noised to
each level ``t`` once and denoised in one network call; it reports the estimate's RMSE against the
truth beside the rescaled noisy input ``z / alpha`` (what the noise alone leaves), persistence, and
``lambda*``, the least-squares weight of persistence in ``x_hat + lambda (x_p - x_hat)`` over these
starts (all channels, normalised) with the RMSE it would give. An estimate that uses four clean
frames well is never worse than persistence.

Measured figures for the shipped prior are in docs/results.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from wind_bmi.coupling.assimilate import weighted_rms
from wind_bmi.model.checkpoint import load_prior, shipped_card_path
from wind_bmi.model.physics import latitude_weights
from wind_bmi.model.tasks import WindModel

from wind_bmi.data import shipped_sample_path
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels

BANDS = ((-90.0, -60.0), (-60.0, -30.0), (-30.0, 30.0), (30.0, 60.0), (60.0, 90.0))


def _rms(e: torch.Tensor, w: torch.Tensor) -> float:
    """Latitude-weighted RMS of ``e (..., H, W)`` with row weights ``w (H,)``, as the OSSE scores it."""
    e64 = e.double().numpy()
    return weighted_rms(e64, np.broadcast_to(w.double().numpy()[:, None], e64.shape))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="truth data folder or file (default: the shipped sample)")
    p.add_argument("--model", default="", help="model card (default: the shipped prior)")
    p.add_argument("--starts", type=int, nargs="+", default=[3, 11, 19, 27], help="frame index of each start (>= 3)")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variable", default="temperature", help="channel variable to score (default temperature)")
    p.add_argument("--level", type=float, default=None, help="one sigma level of a 3-D variable (default: all)")
    p.add_argument("--denoise-levels", type=float, nargs="+", default=None,
                   help="instead of forecasting: one-call denoising of the next frame at these levels t in (0, 1]")
    args = p.parse_args(argv)
    wm = WindModel(load_prior(args.model or shipped_card_path()), "cpu", bf16=None)
    ds = open_any(args.data or shipped_sample_path())
    need = max(args.starts) + 2
    if min(args.starts) < 3 or ds.sizes["time"] < need:
        raise SystemExit(f"--starts must be >= 3 and leave a next frame: the data have {ds.sizes['time']} frames")
    x = torch.from_numpy(stack_channels(ds.isel(time=slice(0, need)), [Channel(v, lv) for v, lv in wm.channels]))
    tc = wm.channels_of(args.variable) if args.level is None else [wm.channel_index(args.variable, args.level)]
    units = UNITS.get(args.variable, "")
    lat = wm.lat.float()
    w = latitude_weights(wm.lat).float()
    if args.denoise_levels:
        return _denoise_levels(wm, x, args, tc, w, units)
    errs, pers = [], []
    for s in args.starts:
        g = torch.Generator().manual_seed(args.seed + s)
        f = wm.forecast(x[s - 3:s + 1], 6.0, args.members, g, context_frames=4, steps=args.steps,
                        eta=args.eta)[:, 0]
        errs.append(f[:, tc].mean(0) - x[s + 1, tc])
        pers.append(x[s, tc] - x[s + 1, tc])
    e, q = torch.stack(errs), torch.stack(pers)  # (starts, levels, H, W)
    out: dict[str, Any] = {"variable": args.variable, "units": units, "forecast_6h": _rms(e, w),
                           "persistence_6h": _rms(q, w), "bands": {}}
    for lo, hi in BANDS:
        m = (lat >= lo) & (lat < hi) if hi < 90 else (lat >= lo)
        out["bands"][f"{lo:g}..{hi:g}"] = {"forecast_6h": _rms(e[..., m, :], w[m]),
                                         "persistence_6h": _rms(q[..., m, :], w[m])}
    print(f"6-h {args.variable} RMSE ({units}, lat-weighted, {_levels(args)}), {len(args.starts)} starts, "
          f"{args.members} members, {args.steps} steps:\n"
          f"  ensemble mean {out['forecast_6h']:.3g}, persistence {out['persistence_6h']:.3g}")
    for band, r in out["bands"].items():
        print(f"  lat {band:>10}: {r['forecast_6h']:.3g} vs {r['persistence_6h']:.3g}")
    return out


UNITS = {"temperature": "K", "surface_pressure": "Pa", "u_wind": "m/s", "v_wind": "m/s",
         "specific_humidity": "kg/kg", "precipitation": "kg m-2 s-1"}


def _levels(args: argparse.Namespace) -> str:
    return "all levels" if args.level is None else f"sigma {args.level:g}"


def _denoise_levels(wm: WindModel, x: torch.Tensor, args: argparse.Namespace, tc: list[int],
                    w: torch.Tensor, units: str) -> dict[str, Any]:
    """Per level: RMSE of the network's one-call estimate of the next frame, of ``z / alpha``, of
    persistence, and of the persistence blend with its least-squares weight (module docstring)."""
    if any(not 0.0 < t <= 1.0 for t in args.denoise_levels):
        raise SystemExit(f"--denoise-levels must lie in (0, 1], got {args.denoise_levels}")
    xn = wm.normalise(x)
    std = wm.std[tc].float()[:, None, None]
    out: dict[str, Any] = {"variable": args.variable, "units": units, "levels": {}}
    print(f"one-call estimate of the next frame's {args.variable} after 4 clean frames ({units}, lat-weighted, "
          f"{_levels(args)}), {len(args.starts)} starts:")
    for level in args.denoise_levels:
        g = torch.Generator().manual_seed(args.seed)
        net, noisy, pers, keep = [], [], [], []
        for s in args.starts:
            win = xn[s - 3:s + 2][None]
            t = torch.zeros(1, 5)
            t[0, 4] = level
            z = wm.schedule.noise(win, t, g)
            with torch.no_grad():
                xh = wm.denoiser(z, t)[0, 4]
            a = float(wm.schedule.coefficients(t)[0][0, 4])
            truth, xp = win[0, 4], win[0, 3]
            net.append((xh[tc] - truth[tc]) * std)
            noisy.append((z[0, 4, tc] / a - truth[tc]) * std)
            pers.append((xp[tc] - truth[tc]) * std)
            keep.append((xh, xp, truth))
        d = torch.cat([(xp - xh).reshape(-1) for xh, xp, _ in keep])
        r = torch.cat([(tr - xh).reshape(-1) for xh, _, tr in keep])
        lam = float((d * r).sum() / (d * d).sum().clamp_min(1e-30))
        blend = [((xh + lam * (xp - xh))[tc] - tr[tc]) * std for xh, xp, tr in keep]
        row = {"network": _rms(torch.stack(net), w), "noisy_input": _rms(torch.stack(noisy), w),
               "persistence": _rms(torch.stack(pers), w), "lambda_star": lam,
               "blend": _rms(torch.stack(blend), w)}
        out["levels"][f"{level:g}"] = row
        print(f"  t = {level:<5g} network {row['network']:.3g}, z/alpha {row['noisy_input']:.3g}, "
              f"persistence {row['persistence']:.3g}, blend (lambda* {lam:.2f}) {row['blend']:.3g}")
    return out


if __name__ == "__main__":
    main()
