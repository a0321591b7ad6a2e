"""Initial conditions: the newest ``frames`` states up to a start time, read from any recognised layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import cftime
import numpy as np

from wind_bmi.data.layouts import LayoutError, open_any
from wind_bmi.data.windows import Channel, stack_channels


class InitialConditionError(ValueError):
    """A bad initial condition; ``key`` names the config key it comes from (``initial_condition`` or
    ``start_time``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class InitialCondition:
    """``frames`` physical ``(k, C, H, W)`` float32 ending at ``time`` (a cftime datetime) of ``path``."""

    frames: np.ndarray
    time: Any
    calendar: str
    path: str


def _parse_start(text: str, calendar: str) -> Any:
    try:
        if ":" in text:
            return cftime.datetime.strptime(text.replace("T", " "), "%Y-%m-%d %H:%M:%S", calendar=calendar)
        return cftime.datetime.strptime(text, "%Y-%m-%d", calendar=calendar)
    except ValueError as exc:
        raise InitialConditionError("start_time", f"expected 'YYYY-MM-DD[ HH:MM:SS]', got {text!r}") from exc


def read_initial_condition(path: str, channels: Sequence[Channel], grid: tuple[int, int], frames: int,
                           start_time: str = "") -> InitialCondition:
    """The ``frames`` states ending at ``start_time`` (default: the ``frames``-th of the file).

    Raises:
        InitialConditionError: unreadable file, start time absent or too early, a missing channel,
            another grid, NaN/inf in the frames.
    """
    try:
        ds = open_any(path)
    except LayoutError as exc:
        raise InitialConditionError("initial_condition", str(exc)) from exc
    times = ds["time"].values
    calendar = getattr(times[0], "calendar", "proleptic_gregorian")
    if start_time:
        start = _parse_start(start_time, calendar)
        matches = [i for i, t in enumerate(times) if t == start]
        if not matches:
            raise InitialConditionError("start_time", f"{start_time} is not a time of {path} ({times[0]} .. {times[-1]})")
        idx = matches[0]
    else:
        idx = frames - 1
    if idx + 1 < frames:
        raise InitialConditionError("start_time", f"need {frames} frames up to it in {path}")
    try:
        x = stack_channels(ds.isel(time=slice(idx + 1 - frames, idx + 1)), list(channels))
    except KeyError as exc:
        raise InitialConditionError("initial_condition", f"{path} lacks a model channel: {exc}") from exc
    if x.shape[-2:] != tuple(grid):
        raise InitialConditionError("initial_condition", f"grid {x.shape[-2:]} of {path} differs from the model's "
                                    f"{tuple(grid)} (regrid it first)")
    if not np.isfinite(x).all():
        raise InitialConditionError("initial_condition", f"{path} has NaN/inf in the initial frames")
    return InitialCondition(x, times[idx], calendar, str(path))
