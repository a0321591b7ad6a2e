"""A host model's time loop driving WindBmi through BMI only (initialize / update / get_value / finalize).

    python examples/host_loop.py [CONFIG.yaml] [--hours 48]
"""

from __future__ import annotations

import argparse

import numpy as np

from wind_bmi import WindBmi


def main(argv: list[str] | None = None) -> list[tuple[float, float]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="", help="YAML config (kind: bmi); empty = shipped defaults")
    p.add_argument("--hours", type=float, default=48.0)
    args = p.parse_args(argv)

    bmi = WindBmi()
    bmi.initialize(args.config)
    name = "atmosphere_air__temperature"
    shape = bmi.get_grid_shape(bmi.get_var_grid(name), np.empty(3, dtype=int))
    lat = bmi.get_grid_y(bmi.get_var_grid(name), np.empty(shape[1]))
    weights = np.cos(np.deg2rad(lat))[None, :, None] * np.ones(shape)
    temperature = np.empty(bmi.get_grid_size(bmi.get_var_grid(name)))
    series = []
    while bmi.get_current_time() < args.hours:
        bmi.update()  # one guided diffusion-forcing window
        t = bmi.get_value(name, temperature).reshape(shape)
        series.append((bmi.get_current_time(), float((t * weights).sum() / weights.sum())))
        print(f"t = {series[-1][0]:6.1f} {bmi.get_time_units()}: global-mean T = {series[-1][1]:.2f} "
              f"{bmi.get_var_units(name)}")
    bmi.finalize()
    return series


if __name__ == "__main__":
    main()
