"""WindBmi on the tiny prior: stepping, every input variable, restart, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_bmi_config, write_dataset

from wind_bmi import WindBmi
from wind_bmi.bmi import VARIABLE_TABLE
from wind_bmi.config import ConfigError
from wind_bmi.data.layouts import open_any
from wind_bmi.variables import derived_name

T_NAME = "atmosphere_air__temperature"
T_OBS = "atmosphere_air__observed_value_of_temperature"
PS_NAME = "atmosphere_bottom_air__pressure"


@pytest.fixture()
def bmi_config(tiny_model: Path, tmp_path: Path) -> Path:
    ic = write_dataset(tmp_path / "ic", "2002-03-01", 2, seed=5)
    return write_bmi_config(tmp_path / "bmi.yaml", tiny_model, ic, members=3, seed=7, context_frames=1,
                            guidance={"method": "mmps", "iterations": 1}, run_hours=48.0)


def make(cfg: Path, **over: object) -> WindBmi:
    if over:
        d = yaml.safe_load(cfg.read_text())
        d.update(over)
        cfg = cfg.with_name("over.yaml")
        cfg.write_text(yaml.safe_dump(d))
    b = WindBmi()
    b.initialize(str(cfg))
    return b


def test_update_advances_one_window_and_ptr_keeps_identity(bmi_config: Path) -> None:
    b = make(bmi_config)
    assert b.get_start_time() == 0.0 and b.get_time_step() == 24.0
    ptr = b.get_value_ptr(T_NAME)
    before = ptr.copy()
    b.update()
    assert b.get_current_time() == 24.0
    assert b.get_value_ptr(T_NAME) is ptr and not np.array_equal(before, ptr)
    dest = np.empty(b.get_grid_size(b.get_var_grid(T_NAME)))
    assert b.get_value(T_NAME, dest) is dest
    np.testing.assert_array_equal(dest, ptr)
    spread = b.get_value(derived_name(T_NAME, "spread"), np.empty_like(dest))
    members = b.get_value(derived_name(T_NAME, "members"), np.empty(3 * dest.size)).reshape(3, -1)
    np.testing.assert_allclose(members.mean(axis=0), dest, rtol=1e-5)
    np.testing.assert_allclose(members.std(axis=0, ddof=1), spread, rtol=1e-4, atol=1e-6)
    assert spread.max() > 0  # members are carried independently
    b.update_until(72.0)
    assert b.get_current_time() == 72.0
    with pytest.raises(ValueError, match="before the current time"):
        b.update_until(10.0)
    assert isinstance(b.get_current_time(), float) and isinstance(b.get_grid_rank(0), int)


def test_time_units_are_cf_with_the_reference_date_and_calendar(bmi_config: Path) -> None:
    import cftime

    b = make(bmi_config)
    times = list(open_any(b.component.sample_path)["time"].values)
    start = next(t for t in times if t.strftime("%Y-%m-%d %H:%M:%S") == "2002-03-02 00:00:00")  # the config's
    units, calendar = b.get_time_units(), b.get_calendar()
    assert units == "hours since 2002-03-02 00:00:00" and calendar == start.calendar
    b.update()
    assert cftime.num2date(b.get_current_time(), units, calendar) == times[times.index(start) + 4]  # +24 h


def test_update_until_between_window_boundaries_is_refused_and_changes_nothing(bmi_config: Path) -> None:
    b = make(bmi_config)
    b.update()
    before = b.get_value(T_NAME, np.empty(b.get_grid_size(0))).copy()
    with pytest.raises(ValueError, match="not a window boundary.*use 24 or 48"):
        b.update_until(30.0)
    assert b.get_current_time() == 24.0
    np.testing.assert_array_equal(b.get_value(T_NAME, np.empty_like(before)), before)
    b.update_until(48.0)
    assert b.get_current_time() == 48.0


def test_context_frames_set_the_time_step(bmi_config: Path) -> None:
    b = make(bmi_config, context_frames=3)
    assert b.get_time_step() == 12.0
    b.update()
    assert b.get_current_time() == 12.0


def test_observations_pull_the_analysis_towards_them_and_are_cleared(bmi_config: Path) -> None:
    free = make(bmi_config)
    guided = make(bmi_config)
    n = guided.get_grid_size(guided.get_var_grid(T_OBS))
    rng = np.random.default_rng(0)
    idx = rng.choice(n, size=n // 3, replace=False)
    truth = free.get_value(T_NAME, np.empty(n)) + 8.0  # far from what the prior would produce
    guided.set_value_at_indices(T_OBS, idx, truth[idx])
    obs_now = guided.get_value(T_OBS, np.empty(n))
    assert np.isnan(obs_now[np.setdiff1d(np.arange(n), idx)]).all()
    free.update()
    guided.update()
    g = guided.get_value(T_NAME, np.empty(n))[idx]
    f = free.get_value(T_NAME, np.empty(n))[idx]
    assert np.abs(g - truth[idx]).mean() < 0.5 * np.abs(f - truth[idx]).mean()
    assert np.isnan(guided.get_value(T_OBS, np.empty(n))).all()  # cleared after the window


def test_coarse_input_is_honoured(bmi_config: Path) -> None:
    b = make(bmi_config)
    name = "atmosphere_air__coarse_mean_of_temperature"
    n = b.get_grid_size(b.get_var_grid(name))
    shape = np.zeros(3, dtype=int)
    b.get_grid_shape(b.get_var_grid(name), shape)
    target = np.full(n, 260.0)
    b.set_value(name, target)
    b.update()
    comp = b.component
    import torch
    from wind_bmi.model.operators import AveragePoolOperator

    pooled = AveragePoolOperator(4, comp.model.lat).pool(torch.from_numpy(comp.mean_phys[comp.channel_slice("temperature")]))
    free = make(bmi_config)
    free.update()
    pooled_free = AveragePoolOperator(4, comp.model.lat).pool(
        torch.from_numpy(free.component.mean_phys[comp.channel_slice("temperature")]))
    assert (pooled - 260.0).abs().mean() < 0.5 * (pooled_free - 260.0).abs().mean()


def test_scalar_targets_and_state_replacement(bmi_config: Path) -> None:
    b = make(bmi_config)
    n = b.get_grid_size(b.get_var_grid(PS_NAME))
    b.set_value(PS_NAME, np.full(n, 95000.0))
    np.testing.assert_allclose(b.get_value(PS_NAME, np.empty(n)), 95000.0)
    assert b.get_value(derived_name(PS_NAME, "spread"), np.empty(n)).max() < 1e-3
    dam = "atmosphere_dry_air__target_value_of_mass"
    assert np.isnan(b.get_value(dam, np.empty(1)))[0]
    # 4 frames x dry mass + 1 temperature mean = 5 observations: 5 CG iterations solve them jointly
    free = make(bmi_config, guidance={"method": "mmps", "iterations": 5})
    guided = make(bmi_config, guidance={"method": "mmps", "iterations": 5})
    target = guided.component.m_ref * 1.002
    guided.set_value(dam, np.array([target]))
    guided.set_value("atmosphere_air__target_value_of_domain_mean_increment_of_temperature", np.array([1.5]))
    assert guided.get_value("atmosphere_air__target_value_of_domain_mean_increment_of_temperature", np.empty(1))[0] == 1.5
    free.update()
    guided.update()
    import torch

    def rel_error(bmi: WindBmi) -> float:
        x = torch.from_numpy(bmi.component.members_phys)[:, None]
        return float((bmi.component.model.dry_air_mass(x) / target - 1).abs().max())

    assert rel_error(guided) < 0.25 * rel_error(free)


def test_restart_continuation_is_identical(bmi_config: Path, tmp_path: Path) -> None:
    a = make(bmi_config)
    a.update()
    restart = tmp_path / "restart.safetensors"
    a.save_restart(str(restart))
    a.update()
    b = make(bmi_config, restart_file=str(restart))
    assert b.get_current_time() == 24.0
    b.update()
    n = a.get_grid_size(0)
    np.testing.assert_array_equal(a.get_value(T_NAME, np.empty(n)), b.get_value(T_NAME, np.empty(n)))


def test_every_input_variable_can_be_set(bmi_config: Path) -> None:
    import torch
    from wind_bmi.model.operators import AveragePoolOperator

    b = make(bmi_config)
    comp = b.component
    scalars = {"dry_air_mass": comp.m_ref, "warming_kelvin": 1.0, "humidity_percent": 7.0}
    for name in b.get_input_var_names():
        spec = VARIABLE_TABLE[name]
        n = b.get_grid_size(b.get_var_grid(name))
        if spec.role == "scalar":
            values = np.array([scalars[spec.variable]])
        else:
            state = comp.mean_phys[comp.channel_slice(spec.variable)].astype(np.float64) * spec.scale
            if spec.role == "coarse":
                values = AveragePoolOperator(4, comp.model.lat).pool(torch.from_numpy(state)).numpy().reshape(-1)
            elif spec.role == "observed":
                values = np.full(n, np.nan)
                values[::7] = state.reshape(-1)[::7]
            else:
                values = state.reshape(-1)
        b.set_value(name, values)
        got = b.get_value(name, np.empty(n))
        np.testing.assert_allclose(got, values, rtol=1e-6)
    b.update()
    assert np.isfinite(b.get_value(T_NAME, np.empty(b.get_grid_size(0)))).all()


def test_bad_inputs_raise_clear_errors_and_leave_state_unchanged(bmi_config: Path, tmp_path: Path) -> None:
    b = WindBmi()
    with pytest.raises(RuntimeError, match="initialize"):
        b.set_value(T_NAME, np.zeros(3))
    b = make(bmi_config)
    n = b.get_grid_size(0)
    before = b.get_value(T_NAME, np.empty(n)).copy()
    with pytest.raises(ValueError, match=f"{T_NAME}: expected {n} values"):
        b.set_value(T_NAME, np.zeros(n - 1))
    with pytest.raises(TypeError, match="numeric"):
        b.set_value(T_NAME, np.array(["a"] * n))
    bad = before.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        b.set_value(T_NAME, bad)
    with pytest.raises(ValueError, match="inf"):
        b.set_value(T_OBS, np.full(n, np.inf))
    with pytest.raises(KeyError, match="unknown variable 'atmosphere_air__colour'"):
        b.set_value("atmosphere_air__colour", before)
    with pytest.raises(IndexError, match="0..") as e:
        b.set_value_at_indices(T_OBS, np.array([-1, 2]), np.array([1.0, 2.0]))
    assert T_OBS in str(e.value)
    with pytest.raises(IndexError):
        b.set_value_at_indices(T_OBS, np.array([n]), np.array([1.0]))
    with pytest.raises(KeyError, match="output only"):
        b.set_value(derived_name(T_NAME, "spread"), before)
    np.testing.assert_array_equal(b.get_value(T_NAME, np.empty(n)), before)
    assert np.isnan(b.get_value(T_OBS, np.empty(n))).all()
    assert b.get_current_time() == 0.0
    b.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        b.get_value(T_NAME, before)
    # configs pointing at missing or corrupt files
    d = yaml.safe_load(bmi_config.read_text())
    for key, value, match in (("model", str(tmp_path / "none.json"), "model"),
                              ("initial_condition", str(tmp_path / "none.nc"), "initial_condition"),
                              ("start_time", "1999-01-01", "start_time"),
                              ("context_frames", 5, "context_frames"),
                              ("guidance", {"method": "mmps", "solver": "cg"}, "guidance.solver")):
        bad_cfg = tmp_path / f"bad_{key}.yaml"
        bad_cfg.write_text(yaml.safe_dump({**d, key: value}))
        with pytest.raises(ConfigError, match=match):
            WindBmi().initialize(str(bad_cfg))
    corrupt = tmp_path / "corrupt.nc"
    corrupt.write_bytes(b"\x89HDF garbage")
    bad_cfg = tmp_path / "bad_ic.yaml"
    bad_cfg.write_text(yaml.safe_dump({**d, "initial_condition": str(corrupt)}))
    with pytest.raises(ConfigError, match="initial_condition"):
        WindBmi().initialize(str(bad_cfg))


HOST_T = "atmosphere_air__host_grid_observed_value_of_temperature"
HOST_LAT = [67.5, 22.5, -22.5, -67.5]  # north to south, -180..180 longitudes: not WIND's conventions
HOST_LON = [-157.5 + 45.0 * i for i in range(8)]


def test_host_grid_observations_are_assimilated_through_the_weights(bmi_config: Path, tmp_path: Path) -> None:
    from wind_bmi.regrid import LatLonGrid, Regridder

    assert HOST_T not in make(bmi_config).get_input_var_names()  # only with a host grid
    host = {"lat": HOST_LAT, "lon": HOST_LON, "method": "conservative", "sigma": 0.95}
    free = make(bmi_config)
    guided = make(bmi_config, host_grid=host)
    assert HOST_T in guided.get_input_var_names()
    g = guided.get_var_grid(HOST_T)
    assert g == 7 and guided.get_grid_rank(g) == 2 and guided.get_grid_type(g) == "rectilinear"
    shape = guided.get_grid_shape(g, np.zeros(2, dtype=int))
    assert tuple(shape) == (4, 8)
    np.testing.assert_array_equal(guided.get_grid_y(g, np.empty(4)), HOST_LAT)
    np.testing.assert_array_equal(guided.get_grid_x(g, np.empty(8)), HOST_LON)
    comp = guided.component
    W = Regridder.build(LatLonGrid(comp.model.lat.numpy(), comp.model.lon.numpy()), LatLonGrid(HOST_LAT, HOST_LON))
    level = int(np.argmin(np.abs(np.asarray(comp.levels) - 0.95)))

    def host_view(b: WindBmi) -> np.ndarray:
        return W(b.component.mean_phys[comp.channel_slice("temperature")][level]).reshape(-1)

    target = host_view(free) + 6.0  # the host model says: 6 K warmer at that level
    target[::5] = np.nan  # unobserved host cells
    guided.set_value(HOST_T, target)
    np.testing.assert_array_equal(guided.get_value(HOST_T, np.empty(32)), target)
    free.update()
    guided.update()
    seen = np.isfinite(target)
    err_g = np.abs(host_view(guided) - target)[seen].mean()
    err_f = np.abs(host_view(free) - target)[seen].mean()
    assert err_g < 0.4 * err_f
    assert np.isnan(guided.get_value(HOST_T, np.empty(32))).all()  # cleared after the window

    # the same weights through an ESMF weight file give the identical run (same seed)
    wfile = W.to_esmf_weights(tmp_path / "wind_to_host.nc", LatLonGrid(comp.model.lat.numpy(), comp.model.lon.numpy()),
                              LatLonGrid(HOST_LAT, HOST_LON))
    from_file = make(bmi_config, host_grid={**host, "weights": str(wfile)})
    from_file.set_value(HOST_T, target)
    from_file.update()
    np.testing.assert_array_equal(from_file.get_value(T_NAME, np.empty(comp.K * comp.H * comp.W)),
                                  guided.get_value(T_NAME, np.empty(comp.K * comp.H * comp.W)))


def test_host_grid_config_errors_name_the_key(bmi_config: Path, tmp_path: Path) -> None:
    from wind_bmi.regrid import LatLonGrid, Regridder

    other = LatLonGrid([-45.0, 45.0], [0.0, 90.0, 180.0, 270.0])
    wfile = Regridder.build(other, other).to_esmf_weights(tmp_path / "wrong.nc", other, other)
    for host, match in (({"lat": HOST_LAT, "lon": HOST_LON, "weights": str(wfile)}, "host_grid"),
                        ({"resolution_deg": 7.0}, "resolution_deg"),
                        ({"lat": HOST_LAT, "lon": HOST_LON, "method": "nearest"}, "host_grid")):
        with pytest.raises(ConfigError, match=match):
            make(bmi_config, host_grid=host)
    b = make(bmi_config, host_grid={"resolution_deg": 45.0})
    with pytest.raises(ValueError, match=f"{HOST_T}: expected 32 values"):
        b.set_value(HOST_T, np.zeros(5))
    assert np.isnan(b.get_value(HOST_T, np.empty(32))).all()


def test_member_outputs_sit_on_a_point_set_at_their_cells(bmi_config: Path) -> None:
    """Members are an unstructured grid of nodes only whose node i is the i-th value of the flat
    (member, level, lat, lon) array: its x, y, z are that cell's longitude, latitude and sigma."""
    b = make(bmi_config)
    name = derived_name(T_NAME, "members")
    g = b.get_var_grid(name)
    assert b.get_grid_type(g) == "unstructured" and b.get_grid_rank(g) == 3
    n = b.get_grid_node_count(g)
    assert n == b.get_grid_size(g) and b.get_grid_face_count(g) == 0 and b.get_grid_edge_count(g) == 0
    x, y, z = (getter(g, np.empty(n)) for getter in (b.get_grid_x, b.get_grid_y, b.get_grid_z))
    shape = tuple(b.get_grid_shape(0, np.empty(3, dtype=int)))
    members = n // int(np.prod(shape))
    lat, lon, lev = b.get_grid_y(0, np.empty(shape[1])), b.get_grid_x(0, np.empty(shape[2])), \
        b.get_grid_z(0, np.empty(shape[0]))
    for i in (0, 1, shape[2] + 3, n - 1, n // members + 5):
        m, k, j, w = np.unravel_index(i, (members, *shape))
        assert (x[i], y[i], z[i]) == (lon[w], lat[j], lev[k])
    values = b.get_value(name, np.empty(n)).reshape(members, *shape)
    np.testing.assert_allclose(values.mean(axis=0).reshape(-1), b.get_value(T_NAME, np.empty(int(np.prod(shape)))),
                               rtol=1e-5)
    with pytest.raises(NotImplementedError, match="rectilinear"):
        b.get_grid_face_count(0)


def test_a_prior_without_the_served_variables_is_refused_by_name(bmi_config: Path, tiny_model: Path,
                                                                   tmp_path: Path) -> None:
    """An ERA5-style card (other variable names) cannot be served as the SPEEDY component: refused at
    initialize, naming what is missing and what the card has."""
    import json
    import shutil

    card = json.loads(tiny_model.read_text())
    for ch in card["channels"]:
        if ch["variable"] == "precipitation":
            ch["variable"] = "total_precipitation_6hr"
    other = tmp_path / "era5like" / tiny_model.name
    other.parent.mkdir()
    other.write_text(json.dumps(card))
    shutil.copy(tiny_model.with_suffix(".safetensors"), other.with_suffix(".safetensors"))
    with pytest.raises(ConfigError, match=r"no channels for \['precipitation'\].*total_precipitation_6hr"):
        make(bmi_config, model=str(other))


def test_variable_names_follow_the_csdms_templates() -> None:
    """State variables carry registry names; derived ones the operation template
    ``<object>__<operation>_of_<quantity>`` on the state variable's object and quantity."""
    import re

    from wind_bmi.bmi import HOST_VARIABLE_TABLE
    from wind_bmi.variables import OPERATIONS, VARIABLES

    state = {VARIABLES[s.variable].csdms for s in VARIABLE_TABLE.values() if s.role == "state"}
    assert "atmosphere_bottom_air__pressure" in state and "atmosphere_air__temperature" in state
    for name, spec in {**VARIABLE_TABLE, **HOST_VARIABLE_TABLE}.items():
        assert re.fullmatch(r"[a-z0-9~]+(_[a-z0-9~]+)*__[a-z0-9~]+(_[a-z0-9~]+)*", name), name
        if spec.role in OPERATIONS:
            base = VARIABLES[spec.variable].csdms
            obj, quantity = base.split("__")
            assert name == f"{obj}__{OPERATIONS[spec.role]}_of_{quantity}" == derived_name(base, spec.role)
        elif spec.role in ("scalar", "diagnostic"):
            assert "_of_" in name, name
