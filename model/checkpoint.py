"""Model checkpoints: ``safetensors`` weights plus a JSON card; loading never unpickles.

The card holds everything needed to rebuild and use the prior: architecture and schedule,
channels (variable, level), grid, normalisation statistics, data provenance, training record,
validation losses, git commit, and the name/shape of every tensor (checked on load) together
with the SHA-256 of the weights file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from wind_bmi.model.bandlimit import ZonalBandLimit
from wind_bmi.model.network import UViT
from wind_bmi.model.schedule import CosineVPSchedule

CARD_VERSION = 1
SHIPPED_NAME = "wind_speedy_t31"


class CheckpointError(ValueError):
    """A model card or weights file is missing, corrupt or inconsistent."""


@dataclasses.dataclass
class Prior:
    """A loaded prior: the network, its schedule and its card."""

    net: UViT
    schedule: CosineVPSchedule
    card: dict[str, Any]
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Arrays stored beside the weights that are not network parameters (``normalisation.*``)."""

    @property
    def mean(self) -> torch.Tensor:
        """The normalisation mean as a ``(C, H, W)`` float64 field (a per-channel mean is broadcast)."""
        norm = self.card["normalisation"]
        if norm.get("kind", "channel") == "gridpoint":
            return self.tensors[norm.get("mean_field", "normalisation.mean")].double()
        mean = torch.tensor(norm["mean"], dtype=torch.float64)
        return mean[:, None, None].expand(-1, *self.grid).contiguous()

    @property
    def std(self) -> torch.Tensor:
        """The per-channel normalisation scale ``(C,)`` float64."""
        return torch.tensor(self.card["normalisation"]["std"], dtype=torch.float64)

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.card["grid"]["lat"]), len(self.card["grid"]["lon"]))

    @property
    def band_limit(self) -> ZonalBandLimit | None:
        """The data's zonal band limit from the card (``band_limit``), or None (cards without one)."""
        d = self.card.get("band_limit")
        return None if d is None else ZonalBandLimit.from_dict(d, (len(self.card["channels"]), *self.grid))


def shipped_card_path() -> Path:
    """Path of the shipped default model card (package data)."""
    return Path(__file__).parent / "weights" / f"{SHIPPED_NAME}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_network(card: dict[str, Any]) -> UViT:
    arch = dict(card["architecture"])
    return UViT(
        in_channels=int(arch["in_channels"]), frames=int(arch["frames"]),
        grid=(len(card["grid"]["lat"]), len(card["grid"]["lon"])),
        channels=tuple(arch["channels"]), blocks_per_stage=int(arch["blocks_per_stage"]),
        dim=int(arch["dim"]), depth=int(arch["depth"]), heads=int(arch["heads"]),
        patch=int(arch["patch"]), in_patch=int(arch.get("in_patch", 1)),
        vector_channels=tuple(int(c) for c in arch.get("vector_channels", ())),
        temporal_mix=bool(arch.get("temporal_mix", False)),
    )


def write_card(card: dict[str, Any], card_path: Path) -> None:
    """Write a model card atomically (a temporary file, then rename)."""
    _atomic_write_text(card_path, json.dumps(card, indent=1))


def _atomic_write_text(path: Path, text: str) -> None:
    path = path.resolve()  # a link (e.g. an editable install's) is written through, not replaced
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


EXTRA_PREFIX = "normalisation."


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``safetensors`` file at ``path`` (a temporary name the caller renames), readable by all like any
    other written file: safetensors itself creates it owner-only (0600)."""
    save_file(tensors, str(path))
    os.chmod(path, 0o644)


def save_prior(net: torch.nn.Module, card: dict[str, Any], card_path: str | Path,
               tensors: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` and the card ``<name>.json`` atomically; returns the card path.

    ``tensors``: arrays stored beside the weights (names start with ``normalisation.``, e.g. a
    gridpoint normalisation's mean field), listed in the card like the weights.
    """
    card_path = Path(card_path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    weights_path = card_path.with_suffix(".safetensors")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    for k, v in (tensors or {}).items():
        if not k.startswith(EXTRA_PREFIX):
            raise ValueError(f"extra tensor {k!r}: names must start with {EXTRA_PREFIX!r}")
        state[k] = torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous()
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    save_tensors(state, tmp)
    os.replace(tmp, weights_path)
    card = dict(card)
    card["card_version"] = CARD_VERSION
    card["weights"] = {"file": weights_path.name, "sha256": _sha256(weights_path),
                       "tensors": {k: list(v.shape) for k, v in state.items()}}
    write_card(card, card_path)
    return card_path


def load_prior(card_path: str | Path | None = None, device: str | torch.device = "cpu") -> Prior:
    """Load a prior from its card (default: the shipped model), checking card against weights.

    Raises:
        CheckpointError: missing/corrupt card or weights, checksum or tensor-shape mismatch.
    """
    card_path = Path(card_path) if card_path else shipped_card_path()
    if not card_path.is_file():
        raise CheckpointError(f"model card {str(card_path)!r} does not exist")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"model card {card_path}: not valid JSON ({exc})") from exc
    for key in ("architecture", "schedule", "grid", "channels", "normalisation", "weights"):
        if key not in card:
            raise CheckpointError(f"model card {card_path}: missing key {key!r}")
    weights_path = card_path.parent / card["weights"]["file"]
    if not weights_path.is_file():
        raise CheckpointError(f"weights file {str(weights_path)!r} named by {card_path} does not exist")
    digest = _sha256(weights_path)
    if digest != card["weights"]["sha256"]:
        raise CheckpointError(f"weights file {weights_path}: SHA-256 {digest[:12]} does not match the card's "
                              f"{card['weights']['sha256'][:12]} (corrupt or replaced)")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"weights file {weights_path}: not a safetensors file ({exc})") from exc
    expected = card["weights"]["tensors"]
    if set(state) != set(expected):
        raise CheckpointError(f"{weights_path}: tensors {sorted(set(state) ^ set(expected))[:5]} differ from the card")
    for k, shape in expected.items():
        if list(state[k].shape) != list(shape):
            raise CheckpointError(f"{weights_path}: tensor {k!r} has shape {list(state[k].shape)}, card says {shape}")
    extras = {k: state.pop(k) for k in [k for k in state if k.startswith(EXTRA_PREFIX)]}
    try:
        net = build_network(card)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{weights_path}: does not fit the card's architecture: {str(exc)[:300]}") from exc
    net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    sched = CosineVPSchedule(float(card["schedule"]["a_min"]), float(card["schedule"]["s_min"]))
    prior = Prior(net=net, schedule=sched, card=card, tensors=extras)
    try:
        prior.band_limit  # noqa: B018 -- checked here, where the card enters
        if tuple(prior.mean.shape) != (len(card["channels"]), *prior.grid):
            raise ValueError(f"normalisation mean of shape {tuple(prior.mean.shape)}, expected (C, H, W)")
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"model card {card_path}: {exc}") from exc
    return prior
