"""Frozen configuration dataclasses and one validating YAML loader.

Every preset in ``config/`` is a YAML mapping whose ``kind`` key names the schema
(``generate``, ``train``, ``bmi``). :func:`load_config` turns it into the matching
frozen dataclass, checking every key and type; errors name the file, the dotted key
and what was expected, so a typo in a preset never passes silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from wind_bmi.model.train import TrainSettings

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or mapping is missing, malformed or has a bad key/value."""


class ComponentError(ValueError):
    """Bad configuration or input for the component; its state is unchanged."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Options of the SPEEDY-world data generator (``wind-bmi data generate``).

    Attributes:
        start: first saved calendar date, ISO ``YYYY-MM-DD`` (spin-up runs before it).
        days: number of simulated days to save after the spin-up.
        spinup_days: days simulated and discarded before ``start``. jcm starts from a state
            whose upper levels are far too warm; they relax over about a year (sigma 0.095 is
            still 2.4 K warm 120 days in), so the default discards a whole year.
        seed: random seed of jcm's initial-state perturbation (independent members).
        sst_offset: uniform sea-surface temperature offset in kelvin (warming runs).
        sst_anomaly: add the packaged monthly interannual SST anomalies (1979-2013).
        save_hours: output interval in hours.
    """

    start: str = "1981-01-01"
    days: int = 365
    spinup_days: int = 365
    seed: int = 0
    sst_offset: float = 0.0
    sst_anomaly: bool = False
    save_hours: int = 6
    kind: str = "generate"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the UViT prior (noise-blind, x-prediction).

    Attributes:
        channels: conv widths per resolution stage (first is the full grid).
        blocks_per_stage: ResBlocks per stage on the down and the up path.
        dim: transformer width at the coarsest level.
        depth: transformer blocks over space-time tokens.
        heads: attention heads.
        patch: spatial patch size of the tokens at the coarsest conv level.
        in_patch: pixel-unshuffle factor before the first conv (2 halves the conv grid).
        frames: window length T.
        pole_flip_winds: negate the wind components (``variables.VECTOR_VARIABLES``) in the first conv's
            pole-crossing halo, where their local axes reverse (needs ``in_patch: 1``).
        temporal_mix: mix the frames at every pixel after each conv stage (``network.FrameMix``), so
            a clean context frame's detail reaches the generated frames at full resolution, not only
            through the coarse transformer.
    """

    channels: tuple[int, ...] = (64, 128, 256)
    blocks_per_stage: int = 1
    dim: int = 256
    depth: int = 4
    heads: int = 4
    patch: int = 1
    in_patch: int = 2
    frames: int = 5
    pole_flip_winds: bool = False
    temporal_mix: bool = False


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """VP cosine schedule ``alpha = cos(t arccos(a_min))``, ``sigma = sqrt(1 - alpha^2 + s_min^2)``."""

    a_min: float = 1e-3
    s_min: float = 1e-3


@dataclasses.dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """Diffusion-forcing training run: the optimiser settings of ``TrainSettings`` and the run's data,
    network and schedule.

    Attributes:
        data: folder of generated netCDF files (split by year below).
        train_years / val_years / test_years: calendar years of each split.
        variables: data variables used as channels (3-D ones expand over levels).
        band_limit_eps: fit the data's zonal band limit (per channel and row, the zonal wavenumbers whose
            mean variance exceeds this, normalised units; see ``wind_bmi.model.bandlimit``) on the
            training years, store it in the card and train the projected estimate; None = no band
            limit in training (one can still be fitted into a card with ``wind-bmi band-limit``).
        normalisation: ``channel`` (one mean and scale per channel) or ``gridpoint`` (the training
            years' time-mean field per channel and an anomaly scale; see
            ``wind_bmi.data.windows.Normalisation``). A fine-tune keeps its prior's.
        init_from: card (JSON) of a trained prior to start from (fine-tuning): its weights and
            normalisation, a fresh optimiser and LR schedule; architecture, channels and grid must
            match. Ignored by ``--resume`` once a training state exists.
    """

    data: str = "data/speedy"
    out: str = "runs/default"
    train_years: tuple[int, ...] = (1981, 1982, 1983, 1984, 1985)
    val_years: tuple[int, ...] = (1990,)
    test_years: tuple[int, ...] = (1995,)
    variables: tuple[str, ...] = (
        "u_wind", "v_wind", "temperature", "specific_humidity", "surface_pressure", "precipitation"
    )
    band_limit_eps: float | None = None
    normalisation: str = "channel"
    init_from: str | None = None
    model: ModelConfig = ModelConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    kind: str = "train"


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Reverse diffusion: number of steps and DDIM/DDPM stochasticity ``eta``."""

    steps: int = 8
    eta: float = 0.0


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Posterior guidance.

    Attributes:
        method: ``mmps`` (moment matching, the default) or ``dps`` (point estimate, a baseline).
        iterations: GMRES iterations of the MMPS solve per reverse step (each costs one backward pass).
        solver: ``auto`` (an exact solve when the window's observations have at most 16 entries, e.g.
            constraints alone; GMRES otherwise), ``gmres`` or ``direct`` (``wind_bmi.model.solvers``).
    """

    method: str = "mmps"
    iterations: int = 3
    solver: str = "auto"


@dataclasses.dataclass(frozen=True)
class ConstraintsConfig:
    """Physical constraints applied in every window.

    Attributes:
        dry_air_mass: keep the global dry air mass at the initial state's value.
        dry_air_mass_rel_error: relative observation error of that constraint.
        warming_kelvin: target offset of area-mean temperature (0 = off).
        humidity_percent: target change of area-mean specific humidity (0 = off).
    """

    dry_air_mass: bool = False
    dry_air_mass_rel_error: float = 1e-5
    warming_kelvin: float = 0.0
    humidity_percent: float = 0.0


@dataclasses.dataclass(frozen=True)
class HostGridConfig:
    """A host model's lat-lon grid whose fields WindBmi takes as observations ``y = W x``.

    Give the cell centres (``lat``, ``lon``, degrees, any order and longitude origin) or
    ``resolution_deg`` for a regular cell-centred global grid (-90..90, -180..180). ``W`` maps the
    WIND grid to the host grid: read from ``weights`` (an ESMF offline weight file, e.g. from
    ESMF_RegridWeightGen or xESMF) or built here with ``method`` (``conservative`` or ``bilinear``).
    3-D variables are observed on the sigma level nearest ``sigma``.
    """

    lat: tuple[float, ...] = ()
    lon: tuple[float, ...] = ()
    resolution_deg: float = 0.0
    weights: str = ""
    method: str = "conservative"
    sigma: float = 0.95

    @property
    def enabled(self) -> bool:
        return bool(self.lat or self.lon or self.resolution_deg)


@dataclasses.dataclass(frozen=True)
class BmiConfig:
    """Configuration of :class:`wind_bmi.WindBmi` (``initialize(path)``).

    Empty strings mean "the shipped default" (model card, sample initial condition).
    """

    model: str = ""
    initial_condition: str = ""
    start_time: str = ""
    members: int = 4
    seed: int = 0
    context_frames: int = 1
    sampler: SamplerConfig = SamplerConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    constraints: ConstraintsConfig = ConstraintsConfig()
    observation_error: dict[str, float] = dataclasses.field(default_factory=dict)
    host_grid: HostGridConfig = HostGridConfig()
    output: str = ""
    output_members: bool = True
    restart_file: str = ""
    run_hours: float = 120.0
    device: str = "cpu"
    kind: str = "bmi"


@dataclasses.dataclass(frozen=True)
class AssimilationConfig:
    """Options of an observing-system simulation (``config/assimilate.yaml``)."""

    truth: str = ""  # data of the truth run (default: the shipped sample)
    model: str = ""  # model card of the prior (default: the shipped prior)
    members: int = 4  # total over all ranks
    cycles: int = 40  # 6-hourly cycles (40 = 10 days)
    obs_fraction: float = 0.03  # fraction of grid cells observed per stream
    obs_error: float = 0.5  # K, temperature observation error
    # radiosonde-like: other variables observed at the same station cells, name -> error (physical units),
    # e.g. {u_wind: 1.0, v_wind: 1.0, surface_pressure: 100.0}; scores stay on temperature
    extra_observations: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 16
    iterations: int = 3
    seed: int = 0
    moving: bool = False  # stations move every cycle
    level_index: int = -1  # -1: all levels observed at the station cells
    # multiplicative inflation of the prior's covariance in the guidance (1 = none): the component is told
    # the observation errors divided by sqrt(inflation), the same MMPS update as the covariance times it
    inflation: float = 1.0
    kind: str = "assimilate"


SCHEMAS: dict[str, type] = {"generate": GenerateConfig, "train": TrainConfig, "bmi": BmiConfig,
                            "assimilate": AssimilationConfig}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert lists to tuples, mappings to dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {type(value).__name__}")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = typing.get_args(tp)
        return {_convert(k, key_tp, f"{where}.<key>"): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type[T], mapping: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(u) for u in unknown)}; expected one of {sorted(fields)}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own range checks (``__post_init__``)
        raise ConfigError(f"{where}: {e}") from None


def from_dict(cls: type[T], mapping: dict[str, Any], source: str = "<dict>") -> T:
    """Build the frozen dataclass ``cls`` from a plain mapping, validating every key."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping at top level, got {type(mapping).__name__}")
    mapping = dict(mapping)
    expected_kind = getattr(cls, "kind", None)
    if "kind" in mapping and expected_kind is not None and mapping["kind"] != expected_kind:
        raise ConfigError(f"{source}: key 'kind' is {mapping['kind']!r}, expected {expected_kind!r}")
    return _build(cls, mapping, source)


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML/JSON-ready) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(path: str | Path, schema: type[T] | None = None, overrides: Sequence[str] = ()) -> T:
    """Load and validate a YAML preset.

    Args:
        path: YAML file. Its ``kind`` key selects the schema unless ``schema`` is given.
        schema: dataclass to build (``GenerateConfig``, ``TrainConfig``, ``BmiConfig``).
        overrides: ``KEY=VALUE`` settings applied over the file (dotted keys for nested sections,
            values in YAML syntax), e.g. ``normalisation=channel`` or ``model.dim=384``.

    Raises:
        ConfigError: missing/unreadable file, bad YAML, unknown key, wrong type or kind;
            the message names the file and the dotted key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at top level, got {type(raw).__name__}")
    if schema is None:
        kind = raw.get("kind")
        if kind not in SCHEMAS:
            raise ConfigError(f"{p}: key 'kind' must be one of {sorted(SCHEMAS)}, got {kind!r}")
        schema = SCHEMAS[kind]  # type: ignore[assignment]
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = value
    assert schema is not None
    return from_dict(schema, raw, str(p) + (f" (with --set {', '.join(overrides)})" if overrides else ""))
