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


IMPORT_CHECK = ("import wind_bmi, wind_bmi.model.tasks, wind_bmi.regrid; "
                "assert 'WindBmi' in vars(wind_bmi), 'WindBmi is not a real attribute'; "
                "m = wind_bmi.WindBmi(); m.initialize(''); print(m.get_component_name()); m.finalize()")


def test_package_imports_from_the_repository_root() -> None:
    # the source folder wind_bmi/ shadows the install here: the package must find model/ and coupling/
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "WIND" in out.stdout


def test_package_imports_from_another_folder(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_package_imports_from_a_built_wheel(tmp_path: Path) -> None:
    import shutil

    # build from a copy: an in-tree build would write build/, where the strict editable install keeps its links
    src, wheels, target = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    top = {".git", ".venv", "build", "data", "runs", "out", "logs"}

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if (Path(folder) == ROOT and n in top) or n == "__pycache__" or n.endswith("_cache")}

    shutil.copytree(ROOT, src, ignore=skip)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(wheels), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("wind_bmi-*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    assert (target / "wind_bmi" / "model" / "weights").is_dir()
    # -I: isolated mode, so neither the editable install's path hooks nor the cwd are on sys.path
    code = f"import sys; sys.path.insert(0, {str(target)!r}); import site; " \
           f"sys.path.extend(site.getsitepackages()); {IMPORT_CHECK}; " \
           f"import wind_bmi; assert wind_bmi.__file__.startswith({str(target)!r}), wind_bmi.__file__"
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_core_never_imports_the_coupling_layer() -> None:
    """Layers: ``wind_bmi.model`` <- the core (component, observations, data, evaluation, BMI) <-
    ``wind_bmi.coupling`` (coupler, DA driver) and the CLI. No core or model module imports coupling,
    and the model imports nothing of the core, so neither layer can form a cycle with the one above."""
    import ast

    def imports(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    core = [p for p in (ROOT / "wind_bmi").rglob("*.py") if "cli" not in p.relative_to(ROOT / "wind_bmi").parts]
    bad = {str(p.relative_to(ROOT)): sorted(n for n in imports(p) if n.startswith("wind_bmi.coupling"))
           for p in core}
    assert not {k: v for k, v in bad.items() if v}
    model_bad = {str(p.relative_to(ROOT)): sorted(n for n in imports(p) if n.startswith("wind_bmi.")
                                                  and not n.startswith("wind_bmi.model"))
                 for p in (ROOT / "model").rglob("*.py")}
    assert not {k: v for k, v in model_bad.items() if v}
