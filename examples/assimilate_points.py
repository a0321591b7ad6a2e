"""Data assimilation through BMI: station-like temperature observations set with set_value_at_indices.

A "truth" is taken from the shipped sample (frames after the start); every window, 5 % of the
cells are observed with noise, and the guided ensemble mean is compared with a free run.

    python examples/assimilate_points.py [CONFIG.yaml] [--windows 2]
"""

from __future__ import annotations

import argparse

import numpy as np

from wind_bmi import WindBmi
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels

NAME = "atmosphere_air__temperature"
OBS = "atmosphere_air__observed_value_of_temperature"


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.05)
    args = p.parse_args(argv)

    free, da = WindBmi(), WindBmi()
    free.initialize(args.config)
    da.initialize(args.config)
    comp = da.component
    ds = open_any(comp.sample_path)
    times = list(ds["time"].values)
    levels = comp.levels
    n = da.get_grid_size(da.get_var_grid(NAME))
    rng = np.random.default_rng(0)
    err = {"free": [], "assimilated": []}
    for _ in range(args.windows):
        valid = comp.current_datetime() + __import__("datetime").timedelta(hours=da.get_time_step())
        if valid not in times:
            break
        truth = stack_channels(ds.isel(time=[times.index(valid)]), [Channel("temperature", lv) for lv in levels])
        truth = truth.reshape(-1).astype(np.float64)
        idx = rng.choice(n, size=int(args.fraction * n), replace=False)
        da.set_value_at_indices(OBS, idx, truth[idx] + rng.normal(0.0, 0.5, idx.size))
        free.update()
        da.update()
        for key, bmi in (("free", free), ("assimilated", da)):
            est = bmi.get_value(NAME, np.empty(n))
            unobserved = np.setdiff1d(np.arange(n), idx)
            err[key].append(float(np.sqrt(np.mean((est[unobserved] - truth[unobserved]) ** 2))))
        print(f"valid {valid}: RMSE at unobserved cells free {err['free'][-1]:.2f} K, "
              f"assimilated {err['assimilated'][-1]:.2f} K")
    free.finalize()
    da.finalize()
    return {k: float(np.mean(v)) for k, v in err.items()}


if __name__ == "__main__":
    main()
