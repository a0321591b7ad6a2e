"""The one table of physical variables: project names, units, long names and CSDMS names.

CSDMS names appear only at the BMI boundary; everything inside uses the short project
names (``temperature``, ``surface_pressure``...).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variable:
    """One physical field of the SPEEDY world.

    Attributes:
        name: project (and netCDF) name.
        units: UDUNITS string.
        long_name: CF long name.
        standard_name: CF standard name.
        csdms: CSDMS standard name (BMI output).
        levels: True for fields on the 8 sigma levels, False for surface fields.
        jcm: name in jcm's output dataset.
        scale: factor from jcm's units to ``units``.
    """

    name: str
    units: str
    long_name: str
    standard_name: str
    csdms: str
    levels: bool
    jcm: str
    scale: float = 1.0


VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable("u_wind", "m s-1", "eastward wind", "eastward_wind",
                 "atmosphere_air_flowing__east_component_of_velocity", True, "u_wind"),
        Variable("v_wind", "m s-1", "northward wind", "northward_wind",
                 "atmosphere_air_flowing__north_component_of_velocity", True, "v_wind"),
        Variable("temperature", "K", "air temperature", "air_temperature",
                 "atmosphere_air__temperature", True, "temperature"),
        Variable("specific_humidity", "kg kg-1", "specific humidity", "specific_humidity",
                 "atmosphere_air_water~vapor__specific_saturation", True, "specific_humidity"),
        Variable("geopotential", "m2 s-2", "geopotential on sigma levels", "geopotential",
                 "atmosphere_air__geopotential", True, "geopotential"),
        Variable("surface_pressure", "Pa", "surface air pressure", "surface_air_pressure",
                 "atmosphere_bottom_air__pressure", False, "normalized_surface_pressure", 1e5),
        Variable("precipitation", "kg m-2 s-1", "total precipitation flux (instantaneous)",
                 "precipitation_flux", "atmosphere_water_precipitation__leq_volume_flux", False,
                 "surface_exchange.precipitation"),
    )
}

#: Eastward/northward vector components, in project names (SPEEDY and the ERA5 layouts' 10-m winds):
#: their local axes reverse across a pole, so the network's pole-crossing halo negates them.
VECTOR_VARIABLES = ("u_wind", "v_wind", "10m_u_wind", "10m_v_wind")


#: The variables the BMI component serves (state, spread, members, observed and coarse inputs).
STATE_VARIABLES = ("temperature", "u_wind", "v_wind", "specific_humidity", "surface_pressure", "precipitation")


#: The CSDMS operation (``<object>__<operation>_of_<quantity>``) of each derived BMI variable role.
OPERATIONS = {
    "spread": "ensemble_standard_deviation",
    "members": "ensemble_members",
    "observed": "observed_value",
    "coarse": "coarse_mean",
    "host_observed": "host_grid_observed_value",
}


def derived_name(csdms: str, role: str) -> str:
    """The CSDMS name of a derived quantity, the operation template ``<object>__<operation>_of_<quantity>``
    (``atmosphere_air__temperature``, role ``observed`` -> ``atmosphere_air__observed_value_of_temperature``)."""
    if role not in OPERATIONS:
        raise KeyError(f"no CSDMS operation for role {role!r} (roles: {sorted(OPERATIONS)})")
    obj, quantity = csdms.split("__", 1)
    return f"{obj}__{OPERATIONS[role]}_of_{quantity}"
