"""Package guard rails: no top-level model/coupling imports; package data declared; no import side effects."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_no_top_level_model_or_coupling_imports() -> None:
    bad = []
    for folder in ("wind_bmi", "model", "coupling", "tests", "examples"):
        for f in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines()):
                if re.match(r"^\s*(from|import) (model|coupling)\b", line):
                    bad.append(f"{f}:{i + 1}: {line}")
    assert not bad, bad


def test_import_has_no_global_side_effects(tmp_path: Path) -> None:
    code = ("import warnings, torch; before = (len(warnings.filters), torch.get_default_dtype());"
            "import wind_bmi, wind_bmi.model.tasks, wind_bmi.coupling, wind_bmi.bmi;"
            "import sys; assert 'mpi4py.MPI' not in sys.modules, 'MPI initialised at import';"
            "assert (len(warnings.filters), torch.get_default_dtype()) == before")
    # from tmp_path: the repository root on sys.path would shadow the installed package
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_cli_help_for_every_subcommand() -> None:
    from wind_bmi.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        assert p.format_help().strip(), name
