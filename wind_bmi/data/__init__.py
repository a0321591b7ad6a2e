"""Data layer: the SPEEDY generator, ERA5/WeatherBench2 layouts, windows and normalisation, and the
shipped held-out sample (5 days of the test year, 6-hourly, every state variable)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_NAME = "sample_speedy_t31.nc"


def shipped_sample_path() -> Path:
    """Path of the shipped sample (package data): 1995-06-01 06 UTC to 06-06 00 UTC, 20 frames."""
    return Path(str(resources.files("wind_bmi") / "data" / SAMPLE_NAME))
