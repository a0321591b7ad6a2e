from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY_TRAIN_YAML, write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    write_dataset(root / "train", "2000-01-01", 40, seed=0)
    write_dataset(root / "val", "2001-01-01", 10, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(TINY_TRAIN_YAML)
    return p


@pytest.fixture(scope="session")
def tiny_model(tiny_data: Path, tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Card path of a tiny prior (8 x 16 grid) trained for a few steps."""
    from wind_bmi.config import load_config
    from wind_bmi.training import run_training

    out = tmp_path_factory.mktemp("tiny_run")
    return run_training(load_config(tiny_config), data=str(tiny_data), out=str(out), progress=False)
