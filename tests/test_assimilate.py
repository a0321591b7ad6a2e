"""Cycled DA: observation merging, and the 2-rank MPI cycle (mpiexec -n 2) with its faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from wind_bmi.coupling.assimilate import merge_observations
from wind_bmi.model.checkpoint import shipped_card_path

BIN = Path(sys.executable).parent


def test_merge_drops_outside_and_merges_duplicates() -> None:
    a = (np.array([0, 5, 99]), np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0]))
    b = (np.array([5, -1]), np.array([4.0, 0.0]), np.array([1.0, 1.0]))
    empty = (np.zeros(0, int), np.zeros(0), np.zeros(0))
    idx, val, err, n_dup, n_out = merge_observations([a, b, empty], size=10)
    assert idx.tolist() == [0, 5] and n_out == 2 and n_dup == 1
    assert val.tolist() == [1.0, 3.0]  # equal errors: the mean
    assert err[1] == pytest.approx(1 / np.sqrt(2))


def _run(tmp_path: Path, name: str, faults: dict[str, int] | None = None,
         **over: object) -> subprocess.CompletedProcess[str]:
    """``wind-bmi assimilate --quick`` on two ranks; with ``faults``, the same driver through the
    fault-injecting communicator of ``tests/mpi_faults.py``."""
    cfg = {"kind": "assimilate", "truth": "", "members": 2, "cycles": 2, "obs_fraction": 0.05, "obs_error": 0.5,
           "steps": 4, **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    if faults is None:
        cmd = [str(BIN / "wind-bmi"), "assimilate", str(path), "--quick", "--out", str(tmp_path / name)]
    else:
        flags = [a for k, v in faults.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        cmd = [sys.executable, str(Path(__file__).parent / "mpi_faults.py"), str(path), str(tmp_path / name), *flags]
    return subprocess.run([str(BIN / "mpiexec"), "-n", "2", *cmd], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)


@pytest.mark.skipif(not shipped_card_path().exists(), reason="no shipped model")
@pytest.mark.mpi
def test_two_rank_cycle_and_faults(tmp_path: Path) -> None:
    ok = _run(tmp_path, "ok", {"duplicates": 5, "outside_grid": 3, "silent_rank": 1})
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["members"] == 2
    assert summary["model_sha256"] == json.loads(shipped_card_path().read_text())["weights"]["sha256"]  # the default
    assert summary["history"]["outside_grid_dropped"] == [3] and summary["history"]["duplicates_merged"] == [5]
    assert all(n > 0 for n in summary["history"]["n_obs"])  # rank 0's stream still reaches rank 1's member
    assert summary["rmse_analysis_K"] < summary["rmse_free_K"]
    assert summary["observed_variables"] == {"temperature": 0.5}  # scored, not observed:
    assert set(summary["other_variables_rmse"]) == {"u_wind", "v_wind", "surface_pressure"}
    # MMPS fits the analysis to the data where they are: closer to the truth there than away from them
    assert summary["rmse_analysis_observed_K"] < summary["rmse_analysis_unobserved_K"]
    assert (tmp_path / "ok" / "analysis.nc").exists() and (tmp_path / "ok" / "osse.png").exists()
    bad = _run(tmp_path, "bad", {"fail_rank": 1})
    assert bad.returncode != 0
    assert "injected failure on rank 1" in bad.stderr
    assert not (tmp_path / "bad" / "analysis.nc").exists() and not list((tmp_path / "bad").glob("*.tmp"))
    # a rank whose window fails (as a NaN window does) stops both ranks with its message: the other rank
    # does not wait forever in the next collective (the timeout would fail this test), nothing is left
    t0 = time.perf_counter()
    bad = _run(tmp_path, "bad_update", {"fail_update_rank": 0})
    assert bad.returncode != 0 and time.perf_counter() - t0 < 300
    assert "injected update failure on rank 0" in bad.stderr and "window update" in bad.stderr
    assert sorted(p.name for p in (tmp_path / "bad_update").iterdir()) == []
    # the prior is the config's `model`: a card that is not there stops the run, named, before any cycle
    bad = _run(tmp_path, "bad_model", model=str(tmp_path / "no_such_card.json"))
    assert bad.returncode != 0 and "no_such_card.json" in bad.stderr
    assert not (tmp_path / "bad_model" / "analysis.nc").exists()


def test_extra_observations_are_checked_by_name(tmp_path: Path) -> None:
    from wind_bmi.coupling.assimilate import observed_variables, run_assimilation

    from wind_bmi.config import AssimilationConfig, ConfigError

    cfg = AssimilationConfig(obs_error=0.5, extra_observations={"u_wind": 1.0, "surface_pressure": 100.0})
    assert observed_variables(cfg) == {"temperature": 0.5, "u_wind": 1.0, "surface_pressure": 100.0}
    with pytest.raises(ConfigError, match="extra_observations.wind_speed"):
        observed_variables(AssimilationConfig(extra_observations={"wind_speed": 1.0}))
    with pytest.raises(ConfigError, match=r"extra_observations.v_wind: .* > 0"):
        observed_variables(AssimilationConfig(extra_observations={"v_wind": 0.0}))
    with pytest.raises(ConfigError, match="extra_observations.wind_speed"):  # before anything is written
        run_assimilation(AssimilationConfig(extra_observations={"wind_speed": 1.0}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_inflation_tells_the_component_smaller_errors_and_is_checked(tmp_path: Path) -> None:
    """Covariance inflation by 4 is the MMPS update with the errors halved: the component is told 0.25 K
    for 0.5 K stations (the draws keep 0.5 K); a factor below 1 is refused before anything is written."""
    from wind_bmi.coupling.assimilate import _bmi_config, run_assimilation

    from wind_bmi.config import AssimilationConfig, ConfigError

    cfg = AssimilationConfig(obs_error=0.5, extra_observations={"u_wind": 1.0}, inflation=4.0)
    told = _bmi_config(cfg, 2, 0, "truth.nc", "1995-01-01 18:00:00").observation_error
    assert told == {"temperature": 0.25, "u_wind": 0.5}
    assert _bmi_config(AssimilationConfig(obs_error=0.5), 2, 0, "t", "1995-01-01 18:00:00").observation_error == {
        "temperature": 0.5}
    with pytest.raises(ConfigError, match="inflation: expected a factor >= 1"):
        run_assimilation(AssimilationConfig(inflation=0.5), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not shipped_card_path().exists(), reason="no shipped model")
@pytest.mark.mpi
def test_two_rank_cycle_assimilates_radiosonde_winds(tmp_path: Path) -> None:
    """Winds and surface pressure observed beside temperature reach the members: the same run with
    their errors at 1 m/s / 100 Pa analyses them far better than with errors so large (1000 m/s,
    1e6 Pa) that they carry nothing (same stations, same random draws, same code path)."""
    runs = {}
    for name, (eu, ep) in {"sonde": (1.0, 100.0), "blind": (1000.0, 1e6)}.items():
        r = _run(tmp_path, name, obs_fraction=0.1, iterations=3, extra_observations={"u_wind": eu, "v_wind": eu,
                                                                        "surface_pressure": ep})
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    s, b = runs["sonde"], runs["blind"]
    assert s["observed_variables"] == {"temperature": 0.5, "u_wind": 1.0, "v_wind": 1.0, "surface_pressure": 100.0}
    for var in ("u_wind", "v_wind", "surface_pressure"):
        so, bo = s["other_variables_rmse"][var], b["other_variables_rmse"][var]
        assert so["free"] == pytest.approx(bo["free"])  # the same free run: a controlled comparison
        assert so["analysis"] < bo["analysis"], var  # better over all cells
    for var in ("u_wind", "v_wind"):  # and pulled to the data where observed (surface pressure, whose
        # whitened system is the stiffest, is fitted far more slowly: docs/results.md)
        assert s["other_variables_rmse"][var]["observed"] < 0.9 * b["other_variables_rmse"][var]["observed"], var
