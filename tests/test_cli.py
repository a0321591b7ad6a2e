"""Every command fails clearly: one line naming the argument, file or key, exit status 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wind_bmi import __version__

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "wind_bmi" / "data" / "sample_speedy_t31.nc"


def bmi_yaml(folder: Path, **over: object) -> str:
    path = folder / "user.yaml"
    path.write_text(yaml.safe_dump({"kind": "bmi", "members": 1, "sampler": {"steps": 2}, "run_hours": 24.0, **over}))
    return str(path)


def da_yaml(folder: Path) -> str:
    path = folder / "da.yaml"
    path.write_text(yaml.safe_dump({"kind": "assimilate", "truth": str(folder / "no_truth"), "cycles": 2}))
    return str(path)


def blocked(folder: Path) -> str:
    """A path below a regular file: no folder can be made there."""
    (folder / "blocker").write_text("a file, not a folder")
    return str(folder / "blocker" / "out")


# (name, argv builder, text the one-line error must contain)
CASES = [
    ("run cuda on a CPU build", lambda d: ["run", bmi_yaml(d, device="cuda"), "--out", str(d / "o")], "'device'"),
    ("run unwritable --out", lambda d: ["run", bmi_yaml(d), "--out", blocked(d)], "not a writable folder"),
    ("run negative run_hours", lambda d: ["run", bmi_yaml(d, run_hours=-5.0), "--out", str(d / "o")], "'run_hours'"),
    ("run zero sampler steps", lambda d: ["run", bmi_yaml(d, sampler={"steps": 0}), "--out", str(d / "o")],
     "'sampler.steps'"),
    ("run names the user's file", lambda d: ["run", bmi_yaml(d, members=0), "--out", str(d / "o")], "user.yaml"),
    ("subset missing source", lambda d: ["data", "subset", str(d / "nothing"), "--out", str(d / "s.nc"),
                                         "--start", "1995-06-01", "--days", "1"], "does not exist"),
    ("subset garbage start", lambda d: ["data", "subset", str(SAMPLE), "--out", str(d / "s.nc"), "--start", "junk",
                                        "--days", "1"], "YYYY-MM-DD"),
    ("subset outside the data", lambda d: ["data", "subset", str(SAMPLE), "--out", str(d / "s.nc"), "--start",
                                           "2001-01-01", "--days", "1"], "no frames"),
    ("subset negative days", lambda d: ["data", "subset", str(SAMPLE), "--out", str(d / "s.nc"), "--start",
                                        "1995-06-01", "--days", "-3"], ">= 1"),
    ("subset unwritable out", lambda d: ["data", "subset", str(SAMPLE), "--out", blocked(d) + "/s.nc", "--start",
                                         "1995-06-01", "--days", "1"], "not a writable folder"),
    ("generate garbage start", lambda d: ["data", "generate", "--out", str(d / "g"), "--start", "garbage"],
     "YYYY-MM-DD"),
    ("generate negative days", lambda d: ["data", "generate", "--out", str(d / "g"), "--days", "-1"], ">= 1"),
    ("train missing data", lambda d: ["train", "--config", str(ROOT / "config" / "prior_anomaly.yaml"), "--data",
                                      str(d / "nodata"), "--out", str(d / "t")], "does not exist"),
    ("train bad --set value", lambda d: ["train", "--config", str(ROOT / "config" / "prior_anomaly.yaml"), "--data",
                                         str(d), "--out", str(d / "t"), "--set", "normalisation=pixel"],
     "'normalisation'"),
    ("train --set without a value", lambda d: ["train", "--config", str(ROOT / "config" / "prior_anomaly.yaml"),
                                               "--data", str(d), "--set", "normalisation"], "KEY=VALUE"),
    ("train --set unknown key", lambda d: ["train", "--config", str(ROOT / "config" / "prior_anomaly.yaml"),
                                           "--data", str(d), "--set", "model.depthh=8"], "'depthh'"),
    ("train missing compact state", lambda d: ["train", "--config", str(ROOT / "config" / "prior_anomaly.yaml"),
                                               "--data", str(d), "--resume", "--resume-from", str(d / "none")],
     "--resume-from"),
    ("report-prior missing data", lambda d: ["report-prior", "--data", str(d / "nodata"), "--out", str(d / "r")],
     "does not exist"),
    ("bench missing model", lambda d: ["bench", "--out", str(d / "b"), "--model", str(d / "none.json")],
     "does not exist"),
    ("bench negative steps", lambda d: ["bench", "--out", str(d / "b"), "--steps", "-2"], ">= 1"),
    ("assimilate missing truth", lambda d: ["assimilate", da_yaml(d), "--out", str(d / "da")], "no_truth"),
]


@pytest.mark.parametrize(("name", "argv", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_command_lines_end_in_one_named_line(name: str, argv: object, needle: str, tmp_path: Path) -> None:
    args = argv(tmp_path)  # type: ignore[operator]
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([str(BIN / "wind-bmi"), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-1500:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in out.stderr, out.stderr[-1500:]
    # one error line (argparse's own usage lines may precede it), naming what was wrong
    assert lines[-1].startswith("wind-bmi") and "error:" in lines[-1] and needle in lines[-1], lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing half-written


def test_version() -> None:
    out = subprocess.run([str(BIN / "wind-bmi"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"wind-bmi {__version__}"
