"""load_config: presets load; a dozen bad configs fail naming file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from wind_bmi.config import AssimilationConfig, BmiConfig, ConfigError, GenerateConfig, TrainConfig, load_config

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("preset", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset: Path) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, (GenerateConfig, TrainConfig, BmiConfig, AssimilationConfig))


def test_values_are_typed_and_frozen(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("kind: train\nlr: 1\ntrain_years: [2000, 2001]\nmodel: {channels: [8, 16]}\n")
    cfg = load_config(p)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.train_years == (2000, 2001) and cfg.model.channels == (8, 16)
    with pytest.raises(AttributeError):
        cfg.lr = 2.0  # type: ignore[misc]


BAD = [
    ("kind: train\nlearning_rate: 0.1\n", "learning_rate"),
    ("kind: train\nlr: fast\n", "lr"),
    ("kind: train\nsteps: 1.5\n", "steps"),
    ("kind: train\nbf16: 'yes'\n", "bf16"),
    ("kind: train\ntrain_years: 1981\n", "train_years"),
    ("kind: train\ntrain_years: [1981, x]\n", "train_years[1]"),
    ("kind: train\nmodel: {channels: [8], depht: 2}\n", "depht"),
    ("kind: train\nmodel: 3\n", "model"),
    ("kind: banana\n", "kind"),
    ("- a\n- b\n", "mapping"),
    ("kind: bmi\nmembers: true\n", "members"),
    ("kind: bmi\nobservation_error: {temperature: hot}\n", "observation_error.temperature"),
    ("kind: bmi\nsampler: {steps: 10, eta: 1, order: 2}\n", "order"),
    ("kind: generate\nsst_offset: [2]\n", "sst_offset"),
    ("kind: train\nlr: [unclosed\n", "not valid YAML"),
    ("kind: train\nclean_prefix_prob: 1.5\n", "clean_prefix_prob"),
]


@pytest.mark.parametrize("text,key", BAD)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "bad.yaml" in msg and key in msg


def test_missing_file_and_wrong_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "g.yaml"
    p.write_text("kind: generate\n")
    with pytest.raises(ConfigError, match="expected 'train'"):
        load_config(p, TrainConfig)
