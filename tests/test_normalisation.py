"""Per-gridpoint normalisation: the statistics, the card and weights file, and every operator's
physical target mapped through it exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from wind_bmi.model.checkpoint import load_prior
from wind_bmi.model.operators import AveragePoolOperator
from wind_bmi.model.physics import cell_areas, dry_air_mass
from wind_bmi.model.tasks import WindModel

from wind_bmi.config import ConfigError, HostGridConfig, load_config
from wind_bmi.data.windows import Normalisation
from wind_bmi.observations import ObservationAssembler, PendingInputs
from wind_bmi.training import run_training


def test_gridpoint_statistics_remove_the_mean_field() -> None:
    rng = np.random.default_rng(0)
    field = rng.normal(0, 1000.0, size=(2, 4, 6))  # an "orography" per channel
    frames = field[None] + rng.normal(0, 1.0, size=(400, 2, 4, 6)) * np.array([3.0, 0.5])[:, None, None]
    g = Normalisation.fit(frames, "gridpoint")
    c = Normalisation.fit(frames, "channel")
    assert g.kind == "gridpoint" and g.mean.shape == (2, 4, 6) and c.mean.shape == (2,)
    x = g.normalise(frames)
    assert np.abs(x.mean(axis=0)).max() < 1e-3 and np.allclose(x.std(axis=(0, 2, 3)), 1.0, atol=1e-3)
    assert g.std == pytest.approx([3.0, 0.5], rel=0.05)  # the anomaly scale
    assert c.std[0] > 300  # the per-channel scale is the field's spread
    np.testing.assert_allclose(g.denormalise(x), frames, rtol=1e-5, atol=1e-2)
    back = Normalisation.from_dict(g.to_dict(), g.tensors())
    np.testing.assert_allclose(back.mean, g.mean, rtol=1e-6)
    with pytest.raises(ValueError, match="normalisation.mean"):
        Normalisation.from_dict(g.to_dict())
    with pytest.raises(ValueError, match="expected one of"):
        Normalisation.fit(frames, "pixel")


@pytest.fixture(scope="module")
def gridpoint_model(tiny_data: Path, tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = dataclasses.replace(load_config(tiny_config), normalisation="gridpoint", steps=3)
    return run_training(cfg, data=str(tiny_data), out=str(tmp_path_factory.mktemp("gp")), progress=False)


def test_gridpoint_card_and_weights_file(gridpoint_model: Path, tiny_data: Path) -> None:
    from helpers import synthetic_dataset
    from safetensors.torch import load_file

    card = json.loads(gridpoint_model.read_text())
    assert card["normalisation"]["kind"] == "gridpoint"
    saved = load_file(str(gridpoint_model.with_suffix(".safetensors")))
    C, H, W = len(card["channels"]), len(card["grid"]["lat"]), len(card["grid"]["lon"])
    assert tuple(saved["normalisation.mean"].shape) == (C, H, W)
    prior = load_prior(gridpoint_model)
    assert "normalisation.mean" not in prior.net.state_dict()
    # the mean field is the training year's time mean at each gridpoint
    ds = synthetic_dataset("2000-01-01", 40, seed=0)
    t = ds["temperature"].transpose("time", "level", "lat", "lon").values.mean(axis=0)
    ti = [i for i, c in enumerate(card["channels"]) if c["variable"] == "temperature"]
    np.testing.assert_allclose(prior.mean[ti].numpy(), t, rtol=1e-5)
    assert float(prior.mean[ti[0]].std()) > 0  # a field, not a constant


def test_bad_normalisation_key_is_refused_before_loading(tiny_config: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(load_config(tiny_config), normalisation="pixel")
    with pytest.raises(ConfigError, match="config key 'normalisation'"):
        run_training(cfg, data=str(tmp_path / "nowhere"), out=str(tmp_path / "o"), progress=False)


def test_every_target_maps_through_a_gridpoint_normalisation_exactly(gridpoint_model: Path) -> None:
    """``A(normalise(x))`` equals the normalised target built from ``A_phys(x)`` for the pooled, sparse,
    host-grid, area-mean and dry-air-mass operators: a per-channel shortcut would miss by the mean
    field's structure."""
    wm = WindModel(load_prior(gridpoint_model))
    gen = torch.Generator().manual_seed(0)
    truth = wm.denormalise(torch.randn(1, wm.T, wm.C, wm.H, wm.W, generator=gen) * 0.3)  # physical window
    xn = wm.normalise(truth)
    # pooled (spatial downscaling)
    op = AveragePoolOperator(2, wm.lat)
    y = wm.normalise_pooled(op.pool(truth[0].double()), op)
    torch.testing.assert_close(op(xn), y.reshape(1, -1), atol=1e-4, rtol=1e-4)
    # the BMI's sparse, coarse and host-grid inputs on the last frame
    host = HostGridConfig(resolution_deg=45.0, method="bilinear")
    errors = {v: 1.0 for v, _ in wm.channels}
    asm = ObservationAssembler(wm, errors, host, members=1,
                               downscale_factor=2)
    last = truth[0, -1].double().numpy()
    T = wm.channels_of("temperature")
    ps = wm.channel_index("surface_pressure")
    sparse = np.full(last[T].shape, np.nan)
    sparse[:, 2, 3] = last[T][:, 2, 3]
    coarse = AveragePoolOperator(2, wm.lat).pool(torch.from_numpy(last[T])).numpy()
    hostfield = (asm.host.weights @ last[ps].reshape(-1)).reshape(asm.host_grid.shape)  # type: ignore[union-attr]
    pending = PendingInputs(observed={"temperature": sparse}, coarse={"temperature": coarse},
                            host_grid={"surface_pressure": hostfield})
    obs = asm.observations(pending)
    assert len(obs) == 3
    for o in obs:
        torch.testing.assert_close(o.A(xn).float(), o.y.float(), atol=2e-3, rtol=1e-4, msg=o.name)
    # area mean and dry air mass denormalise inside
    area = wm.area_mean_constraint("temperature", 0.0, 1.0)(xn[0], torch.zeros(wm.T, dtype=torch.bool))
    w = cell_areas(wm.lat, 1)[:, 0]
    assert float(area.A(xn)) == pytest.approx(float((truth[0, :, T].double().mean(dim=(0, 1, 3)) * w).sum()
                                                     / w.sum()), rel=1e-5)
    q = wm.channels_of("specific_humidity")
    m_op = wm.dry_air_mass_operator(range(wm.T), 1.0)
    direct = dry_air_mass(truth[:, :, ps].double(), truth[:, :, q].double(), m_op.dsigma, m_op.areas)
    torch.testing.assert_close(m_op.mass(xn), direct, rtol=1e-6, atol=0.0)
