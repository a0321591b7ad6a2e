"""wind-bmi: WIND (Weather Inverse Diffusion) as a BMI 2.0 component.

``from wind_bmi import WindBmi`` is the public entry point (a real attribute of the package, so
tools that look it up in ``module.__dict__``, such as ``bmi-test wind_bmi:WindBmi``, find it).
"""

from __future__ import annotations

from pathlib import Path

# Where the subpackages come from. The repository keeps `model/` and `coupling/` beside `wind_bmi/`;
# installs (editable or wheel) map them in as `wind_bmi.model` and `wind_bmi.coupling`
# (pyproject `package-dir`). Python started in the repository root imports this source folder instead
# of the install, and there the two folders are not inside it. So, only when this package runs from
# the source tree, the repository root joins the package's search path (the standard `__path__`
# extension that `pkgutil.extend_path` performs): `wind_bmi.model` then resolves to `<root>/model`,
# the same files the install maps in. In an install the folders are inside the package and nothing
# is added. Chosen over symlinks (not portable, doubled in wheels) and over moving the folders (the
# design card fixes the layout).
_here = Path(__file__).resolve().parent
_root = _here.parent
if not (_here / "model").is_dir() and all((_root / sub / "__init__.py").is_file() for sub in ("model", "coupling")):
    __path__.append(str(_root))

from wind_bmi.bmi import WindBmi  # noqa: E402  (needs the search path above)

__version__ = "0.1.0"
__all__ = ["WindBmi", "__version__"]
