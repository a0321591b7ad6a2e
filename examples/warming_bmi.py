"""A warming scenario through BMI: +2 K domain-mean temperature and +14 % humidity, held window by window.

Two components from the same config and seed: a free run and a guided one told the targets with
``set_value``; the dry-air-mass constraint stays on. Every window prints the area-mean increments of
the guided run against the free run, its dry-air-mass drift and the largest whitened residual of
its operators (near 1: the operators fit to their errors), after and before the projection that
meets the constraints exactly (``wind_bmi.model.tasks.project_constraints``).

    python examples/warming_bmi.py [CONFIG.yaml] [--days 10] [--members 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from wind_bmi import WindBmi
from wind_bmi.config import BmiConfig, from_dict
from wind_bmi.regrid import LatLonGrid

T_NAME = "atmosphere_air__temperature"
Q_NAME = "atmosphere_air_water~vapor__specific_saturation"
DT_TARGET = "atmosphere_air__target_value_of_domain_mean_increment_of_temperature"
DQ_TARGET = "atmosphere_air_water~vapor__target_value_of_domain_mean_relative_increment_of_specific_saturation"


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="", help="YAML config (kind: bmi); empty = shipped defaults")
    p.add_argument("--days", type=float, default=10.0)
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--warming", type=float, default=2.0, help="K")
    p.add_argument("--moistening", type=float, default=14.0, help="%%")
    args = p.parse_args(argv)

    source = args.config or "shipped defaults"
    d = yaml.safe_load(Path(args.config).read_text()) if args.config else {"kind": "bmi"}
    d = {**d, "members": args.members, "constraints": {**d.get("constraints", {}), "dry_air_mass": True}}
    cfg = from_dict(BmiConfig, d, source)  # one validated config object for both components
    free, warm = WindBmi(), WindBmi()
    free.initialize_config(cfg, source)
    warm.initialize_config(cfg, source)
    warm.set_value(DT_TARGET, np.array([args.warming]))
    warm.set_value(DQ_TARGET, np.array([args.moistening]))
    grid = warm.get_var_grid(T_NAME)
    shape = tuple(int(v) for v in warm.get_grid_shape(grid, np.empty(3, dtype=int)))
    areas = LatLonGrid(warm.get_grid_y(grid, np.empty(shape[1])), warm.get_grid_x(grid, np.empty(shape[2]))).areas()

    def mean(b: WindBmi, name: str) -> float:  # area mean over the levels
        field = b.get_value(name, np.empty(int(np.prod(shape)))).reshape(shape)
        return float((field * areas).sum() / areas.sum() / shape[0])

    comp = warm.component
    m0 = comp.m_ref
    rows = []
    while warm.get_current_time() < args.days * 24.0 - 1e-9:
        free.update()
        warm.update()
        mass = comp.model.dry_air_mass(comp.model.denormalise(comp.history[:, -1:]))  # (members, 1)
        row = {"hours": warm.get_current_time(),
               "dT_K": mean(warm, T_NAME) - mean(free, T_NAME),
               "dq_percent": 100.0 * (mean(warm, Q_NAME) / mean(free, Q_NAME) - 1.0),
               "mass_drift": float((mass / m0 - 1.0).abs().max()),
               "max_whitened_residual": float(warm.get_value("model_guidance__max_of_whitened_residual",
                                                             np.empty(1))[0]),
               "max_whitened_residual_before_projection": max(r["whitened_residual_before_projection"]
                                                              for r in comp.report)}
        rows.append(row)
        print(f"{row['hours']:6.0f} h ({warm.get_time_units()}): dT {row['dT_K']:+.3f} K, dq {row['dq_percent']:+.2f} %, "
              f"dry-air-mass drift {row['mass_drift']:.1e}, max whitened residual {row['max_whitened_residual']:.2f} "
              f"({row['max_whitened_residual_before_projection']:.2f} before the constraints' projection)",
              flush=True)
    free.finalize()
    warm.finalize()
    return rows


if __name__ == "__main__":
    main()
