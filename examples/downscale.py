"""Spatial downscaling through BMI: a 4x coarser temperature field set as ``coarse`` input.

The coarse field is the area-weighted 4x4 mean of the sample's next frame; the window generated
by WindBmi must average back to it while carrying fine-scale structure from the prior.

    python examples/downscale.py [CONFIG.yaml]

The MMPS solve runs GMRES with ``guidance.iterations`` iterations (3 by default); a dense
observation like this one is fitted more tightly with more of them, at one backward pass each.
"""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np
import torch
from wind_bmi.model.operators import AveragePoolOperator

from wind_bmi import WindBmi
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels

COARSE = "atmosphere_air__coarse_mean_of_temperature"
NAME = "atmosphere_air__temperature"


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="")
    args = p.parse_args(argv)
    bmi = WindBmi()
    bmi.initialize(args.config)
    comp = bmi.component
    ds = open_any(comp.sample_path)
    valid = comp.current_datetime() + dt.timedelta(hours=bmi.get_time_step())
    times = list(ds["time"].values)
    truth = stack_channels(ds.isel(time=[times.index(valid)]), [Channel("temperature", lv) for lv in comp.levels])[0]
    pool = AveragePoolOperator(4, comp.model.lat)
    coarse = pool.pool(torch.from_numpy(truth.astype(np.float64))).numpy()
    bmi.set_value(COARSE, coarse.reshape(-1))
    bmi.update()
    fine = bmi.get_value(NAME, np.empty(truth.size)).reshape(truth.shape)
    back = pool.pool(torch.from_numpy(fine)).numpy()
    up = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    result = {"pool_back_rmse_K": float(np.sqrt(np.mean((back - coarse) ** 2))),
              "rmse_vs_truth_K": float(np.sqrt(np.mean((fine - truth) ** 2))),
              "rmse_blocky_upsampling_K": float(np.sqrt(np.mean((up - truth) ** 2)))}
    print(result)
    bmi.finalize()
    return result


if __name__ == "__main__":
    main()
