"""wind-bmi: WIND (Weather Inverse Diffusion) as a BMI 2.0 component.

``from wind_bmi import WindBmi`` is the public entry point.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["WindBmi", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package does not import torch or bmipy until WindBmi is asked for.
    if name == "WindBmi":
        from wind_bmi.bmi import WindBmi

        return WindBmi
    raise AttributeError(name)
