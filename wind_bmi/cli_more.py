"""Subcommands that arrive with later parts of the project (run, evaluate, bench, assimilate)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Register the remaining subcommands on the ``wind-bmi`` parser."""
    del sub


def _unused(args: argparse.Namespace) -> int:  # pragma: no cover
    return 0
