"""CLI and examples end to end on the shipped model: run, evaluate --quick, bench --quick, examples."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from wind_bmi.model.checkpoint import shipped_card_path

from wind_bmi.cli import main
from wind_bmi.data import shipped_sample_path

pytestmark = pytest.mark.skipif(not shipped_card_path().exists(), reason="no shipped model")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    p.write_text(yaml.safe_dump({"kind": "bmi", "members": 2, "seed": 0, "sampler": {"steps": 4, "eta": 1.0},
                                 "run_hours": 24.0}))
    return p


def test_run_writes_cf_netcdf_and_quicklook(fast_config: Path, tmp_path: Path) -> None:
    assert main(["run", str(fast_config), "--out", str(tmp_path)]) == 0
    ds = xr.open_dataset(tmp_path / "forecast.nc")
    assert ds.sizes["time"] == 5  # the initial frame and 4 new 6-hourly frames
    assert ds["temperature"].dims == ("time", "level", "lat", "lon")
    assert ds["time"].encoding["calendar"] == "proleptic_gregorian"
    assert ds["temperature"].attrs["units"] == "K" and float(ds["temperature_spread"].isel(time=-1).max()) > 0
    assert (tmp_path / "quicklook.png").stat().st_size > 10_000


def test_evaluate_all_quick_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    # a stand-in "GCM at SST + 2 K": the sample 2 K warmer with 14 % more precipitation (known answer 7 %/K)
    with xr.open_dataset(shipped_sample_path()) as ds:
        warm = ds.load()
    warm["temperature"] = warm["temperature"] + 2.0
    warm["precipitation"] = warm["precipitation"] * 1.14
    warm.to_netcdf(tmp_path / "warm.nc")
    out = tmp_path / "eval"
    assert main(["evaluate", "all", "--data", str(shipped_sample_path()), "--out", str(out), "--quick",
                 "--warm-data", str(tmp_path / "warm.nc")]) == 0
    recs = json.loads((out / "metrics.json").read_text())
    keys = {"task", "variable", "level", "lead_hours", "method", "metric", "value"}
    assert recs and all(set(r) == keys for r in recs)
    from wind_bmi.evaluation.experiments import RECORD_ID

    ids = [tuple(r[k] for k in RECORD_ID) for r in recs]
    assert len(ids) == len(set(ids)), "one record per task/variable/level/lead/method/metric"
    for task in ("forecast", "downscale", "temporal", "sparse", "mass", "warming"):
        vals = [r["value"] for r in recs if r["task"] == task and r["metric"] != "ssr"]
        assert vals and all(math.isfinite(v) for v in vals), task
    methods = {r["method"] for r in recs}
    assert {"wind", "persistence", "climatology", "bilinear", "bicubic", "kriging", "prior", "dps", "gcm_t21"} <= methods
    assert any(r["metric"] == "relative_drift" and r["method"] == "prior" for r in recs)
    assert (out / "report.md").exists() and list(out.glob("*.png"))

    def value(method: str, metric: str, variable: str | None = None, lead: float | None = None) -> float:
        (v,) = [r["value"] for r in recs if r["method"] == method and r["metric"] == metric
                and (variable is None or r["variable"] == variable) and (lead is None or r["lead_hours"] == lead)]
        return float(v)

    # every guided task reports how well it honours each of its operators
    for task in ("downscale", "temporal", "sparse_1%", "sparse_5%", "warming"):
        resid = [r["value"] for r in recs if r["task"] == task and r["metric"] == "whitened_residual"]
        assert resid and all(math.isfinite(v) and v > 0 for v in resid), task
    for task in ("sparse_1%", "sparse_5%"):  # channel by channel: they make up the operator's residual
        (whole,) = [r["value"] for r in recs if r["task"] == task and r["metric"] == "whitened_residual"]
        by_channel = [r["value"] for r in recs if r["task"] == task and r["metric"] == "whitened_residual_by_channel"]
        assert len(by_channel) == 34 and math.sqrt(np.mean(np.square(by_channel))) == pytest.approx(whole, rel=1e-3)
    assert abs(value("wind", "increment_vs_control_K_mean", "temperature") - 2.0) < 0.1  # warming as told
    assert 0.0 < value("free_run_warmed_start", "signal_kept_last_frame", "temperature") < 1.0
    assert value("gcm_sst_plus_2k", "p99_change_percent_per_K") == pytest.approx(7.0, rel=1e-3)
    assert value("gcm_sst_plus_2k", "mean_change") == pytest.approx(2.0, rel=1e-4)
    # the T21 GCM started from the truncated truth: a real forecast, better than climatology at 24 h
    t21 = value("gcm_t21", "rmse", "temperature", 24.0)
    assert t21 < value("climatology", "rmse", "temperature", 24.0)

    # re-running one task into the report replaces that task's records and keeps the others
    assert main(["evaluate", "temporal", "--data", str(shipped_sample_path()), "--out", str(out), "--quick",
                 "--seed", "5"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert [r for r in again if r["task"] != "temporal"] == [r for r in recs if r["task"] != "temporal"]
    old_t, new_t = ([r for r in rs if r["task"] == "temporal"] for rs in (recs, again))
    assert len(new_t) == len(old_t) and new_t != old_t  # another seed: new values, one record per key
    report = (out / "report.md").read_text()
    assert report.count("warming storm case:") == 1  # the other tasks' notes are kept, once
    assert report.count("| temporal |") == len(new_t)
    (out / "metrics.json").write_text("not json")
    assert main(["evaluate", "temporal", "--data", str(shipped_sample_path()), "--out", str(out), "--quick"]) == 2
    assert "metrics.json: not a wind-bmi metrics file" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "not json"  # left as it was


def test_records_of_several_windows_are_averaged_into_one() -> None:
    from wind_bmi.evaluation.experiments import merge_records

    base = {"task": "downscale", "variable": "temperature", "level": 0.51, "lead_hours": 0.0, "method": "wind",
            "metric": "rmse"}
    recs = [{**base, "value": 3.0}, {**base, "value": 2.0}, {**base, "method": "bilinear", "value": 9.0}]
    merged = merge_records(recs)
    assert [(r["method"], r["value"]) for r in merged] == [("wind", 2.5), ("bilinear", 9.0)]


def test_bench_quick_schema(tmp_path: Path) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    recs = json.loads((tmp_path / "bench.json").read_text())
    names = {r["benchmark"] for r in recs}
    assert {"window_seconds_guided_1member", "window_seconds_unguided_1member", "window_seconds_guided_8members",
            "guided_unguided_ratio", "train_samples_per_second", "bf16_matmul_tflops", "network_utilisation",
            "peak_rss_gb_8members_guided"} <= names
    assert all(set(r) == {"benchmark", "value", "unit", "config"} and math.isfinite(r["value"]) for r in recs)


# the examples run through BMI as written (downscale.py with the default GMRES iterations)
@pytest.mark.parametrize("script, over", [("host_loop.py", {}), ("assimilate_points.py", {}),
                                          ("downscale.py", {"guidance": {"iterations": 3}})])
def test_examples_run(script: str, over: dict[str, object], fast_config: Path, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "example.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(fast_config.read_text()), **over}))
    monkeypatch.setattr(sys, "argv", [script, str(cfg)])
    result = runpy.run_path(str(ROOT / "examples" / script), run_name="not_main")["main"]([str(cfg)])
    assert result
    if script == "assimilate_points.py":
        assert result["assimilated"] < result["free"]
    if script == "downscale.py":
        assert result["pool_back_rmse_K"] < 2 * 0.5  # within 2 sigma_y (temperature observation error 0.5 K)


def _independent_area_weights(lat: np.ndarray) -> np.ndarray:
    """Area weights ``|d sin lat|`` with edges midway and the poles at the ends, mean 1, written
    here independently of the package's geometry."""
    edges = np.concatenate([[-90.0], 0.5 * (lat[1:] + lat[:-1]), [90.0]])
    w = np.abs(np.diff(np.sin(np.deg2rad(edges))))
    return w / w.mean()


def test_forecast_skill_example_scores_against_an_independent_persistence() -> None:
    from wind_bmi.data.layouts import open_any

    run = runpy.run_path(str(ROOT / "examples" / "forecast_skill.py"), run_name="not_main")["main"]
    out = run(["--starts", "3", "4", "--members", "2", "--steps", "2"])
    ds = open_any(shipped_sample_path())
    t = ds["temperature"].transpose("time", "level", "lat", "lon").values.astype(np.float64)
    w = _independent_area_weights(ds["lat"].values)
    d = np.stack([t[4] - t[3], t[5] - t[4]])
    assert out["persistence_6h"] == pytest.approx(float(np.sqrt((d**2 * w[:, None]).mean())), rel=1e-5)
    assert 0 < out["forecast_6h"] < 20 and set(out["bands"]) == {"-90..-60", "-60..-30", "-30..30", "30..60", "60..90"}
    tropics = np.abs(ds["lat"].values) < 30
    wt = w[tropics] / w[tropics].mean()
    assert out["bands"]["-30..30"]["persistence_6h"] == pytest.approx(
        float(np.sqrt((d[:, :, tropics] ** 2 * wt[:, None]).mean())), rel=1e-5)
    # another variable and one level, in its own units
    ps = run(["--starts", "3", "4", "--members", "1", "--steps", "1", "--denoise-levels", "1",
              "--variable", "surface_pressure"])
    p = ds["surface_pressure"].transpose("time", "lat", "lon").values.astype(np.float64)
    dp = np.stack([p[4] - p[3], p[5] - p[4]])
    assert ps["units"] == "Pa" and ps["levels"]["1"]["persistence"] == pytest.approx(
        float(np.sqrt((dp**2 * w[:, None]).mean())), rel=1e-5)
    t51 = run(["--starts", "3", "4", "--denoise-levels", "1", "--variable", "temperature", "--level", "0.51"])
    k = int(np.argmin(np.abs(ds["level"].values - 0.51)))
    dk = np.stack([t[4, k] - t[3, k], t[5, k] - t[4, k]])
    assert t51["levels"]["1"]["persistence"] == pytest.approx(float(np.sqrt((dk**2 * w[:, None]).mean())), rel=1e-5)


def test_forecast_skill_denoise_levels_scores_the_noise_it_added() -> None:
    """``--denoise-levels``: the rescaled noisy input is off by exactly the noise drawn (sigma/alpha
    times each channel's std), persistence is the independent difference of frames, and the
    network's estimate is far better at a low level than at full noise."""
    import torch
    from wind_bmi.model.checkpoint import load_prior
    from wind_bmi.model.schedule import CosineVPSchedule

    from wind_bmi.data.layouts import open_any

    run = runpy.run_path(str(ROOT / "examples" / "forecast_skill.py"), run_name="not_main")["main"]
    out = run(["--starts", "3", "4", "--denoise-levels", "0.02", "0.3", "1"])
    card = load_prior(shipped_card_path()).card
    ds = open_any(shipped_sample_path())
    lev = [float(v) for v in card["levels"]]
    std = np.array([card["normalisation"]["std"][i] for i, ch in enumerate(card["channels"])
                    if ch["variable"] == "temperature"])
    assert std.size == len(lev)
    sched = CosineVPSchedule()
    for key in ("0.02", "0.3"):
        a = float(sched.alpha(torch.tensor(float(key))))
        s = float(sched.sigma(torch.tensor(float(key))))
        expected = s / a * float(np.sqrt(np.mean(std**2)))
        assert out["levels"][key]["noisy_input"] == pytest.approx(expected, rel=0.03)
    t = ds["temperature"].transpose("time", "level", "lat", "lon").values.astype(np.float64)
    w = _independent_area_weights(ds["lat"].values)
    d = np.stack([t[4] - t[3], t[5] - t[4]])
    assert out["levels"]["1"]["persistence"] == pytest.approx(float(np.sqrt((d**2 * w[:, None]).mean())), rel=1e-5)
    assert out["levels"]["0.02"]["network"] < 0.5 * out["levels"]["1"]["network"]
    assert 0.0 <= out["levels"]["1"]["lambda_star"] <= 1.0


def test_evaluate_forecast_scores_an_autoregressive_baseline_side_by_side(tmp_path: Path) -> None:
    """``--ar-model``: a second prior forecast by the same sampler with the same seeds; given the shipped
    prior itself, every score equals the diffusion-forcing model's (the wiring adds nothing of its own)."""
    from wind_bmi.model.checkpoint import shipped_card_path

    out = tmp_path / "eval"
    assert main(["evaluate", "forecast", "--data", str(shipped_sample_path()), "--out", str(out), "--quick",
                 "--ar-model", str(shipped_card_path())]) == 0
    recs = json.loads((out / "metrics.json").read_text())
    by = {(r["variable"], r["level"], r["lead_hours"], r["metric"]): r["value"] for r in recs if r["method"] == "wind"}
    ar = {(r["variable"], r["level"], r["lead_hours"], r["metric"]): r["value"] for r in recs if r["method"] == "ar_uvit"}
    assert set(ar) == set(by) and {"rmse", "crps", "ssr", "overshoot_percent"} <= {k[3] for k in ar}
    assert all(ar[k] == pytest.approx(by[k], rel=1e-6) or (math.isnan(ar[k]) and math.isnan(by[k])) for k in ar)
    assert {k[0] for k in ar if k[3] == "overshoot_percent"} == {"specific_humidity", "precipitation"}
    assert all(math.isfinite(by[k]) for k in by if k[3] == "overshoot_percent")  # a dry level divides nothing
