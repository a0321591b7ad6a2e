"""The pymt contract: entry point, metadata files, defaults equal to the config defaults."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import yaml

from wind_bmi.bmi import WindBmi
from wind_bmi.config import BmiConfig


def test_entry_point_resolves_to_windbmi() -> None:
    eps = entry_points(group="pymt.plugins")
    ep = next(e for e in eps if e.name == "WindBmi")
    assert ep.load() is WindBmi


def test_metadata_files_exist_and_defaults_match_config() -> None:
    meta = Path(WindBmi.METADATA)
    for name in ("api.yaml", "info.yaml", "parameters.yaml", "run.yaml"):
        assert (meta / name).is_file(), name
    params = yaml.safe_load((meta / "parameters.yaml").read_text())
    cfg = BmiConfig()
    flat = {
        "model": cfg.model, "initial_condition": cfg.initial_condition, "start_time": cfg.start_time,
        "members": cfg.members, "seed": cfg.seed, "context_frames": cfg.context_frames,
        "sampler_steps": cfg.sampler.steps, "sampler_eta": cfg.sampler.eta, "guidance_method": cfg.guidance.method,
        "iterations": cfg.guidance.iterations, "dry_air_mass": cfg.constraints.dry_air_mass,
        "run_hours": cfg.run_hours, "device": cfg.device,
    }
    assert set(params) == set(flat)
    for key, value in flat.items():
        assert params[key]["value"]["default"] == value, key
    api = yaml.safe_load((meta / "api.yaml").read_text())
    assert api["class"] == "WindBmi" and api["package"] == "wind_bmi"


def test_pymt_staging_renders_a_config_that_initializes(tmp_path: Path) -> None:
    """Stage with model_metadata's own Jinja2 loader, as pymt does, then initialize from the staged file."""
    from model_metadata.api import stage

    from wind_bmi.config import from_dict, load_config

    manifest = stage(WindBmi.METADATA, str(tmp_path))
    staged = tmp_path / yaml.safe_load((Path(WindBmi.METADATA) / "run.yaml").read_text())["config_file"]["path"]
    assert staged.name in {Path(m).name for m in manifest} and staged.is_file()
    assert load_config(staged, BmiConfig) == from_dict(BmiConfig, {})  # the defaults, exactly
    bmi = WindBmi()
    bmi.initialize(str(staged))
    assert bmi.get_time_units().startswith("hours since ")
    bmi.finalize()
