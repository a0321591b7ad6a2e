"""From pending inputs to MMPS observations: one normalisation, one place.

:class:`ObservationAssembler` turns what a host set since the last window (sparse observations,
coarse fields, host-grid fields) into :class:`~wind_bmi.model.operators.Observation` s on the window's
last generated frame, in the model's normalised units with its per-channel errors. It also owns
the host-grid regridding (``y = W x``, ``W`` WIND grid -> host grid). The component calls it; the
BMI adapter never sees it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from wind_bmi.config import ComponentError, HostGridConfig
from wind_bmi.model.operators import AveragePoolOperator, MaskOperator, Observation, SparseLinearOperator
from wind_bmi.model.tasks import WindModel

if TYPE_CHECKING:  # scipy (via the regridder) registers a warnings filter on import: load it only when used
    from wind_bmi.regrid import LatLonGrid, Regridder


@dataclasses.dataclass
class PendingInputs:
    """Inputs set since the last window: sparse observations, coarse fields, host-grid fields."""

    observed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # variable -> (K,H,W)|(H,W), NaN = none
    coarse: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    host_grid: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # variable -> host (nlat, nlon)


class ObservationAssembler:
    """Observations of one window from pending inputs.

    Args:
        model: the model facade (channels, normalisation, grid).
        obs_error: observation error per variable, physical units.
        host_grid: the host grid config (``enabled`` false: no host-grid inputs).
        members: ensemble size (observations are broadcast over members).
        downscale_factor: coarsening of the ``coarse`` inputs.
    """

    def __init__(self, model: WindModel, obs_error: dict[str, float], host_grid: HostGridConfig, members: int,
                 downscale_factor: int = 4) -> None:
        self.model, self.obs_error, self.members, self.downscale_factor = model, obs_error, members, downscale_factor
        self.H, self.W = model.H, model.W
        self.levels = [lv for v, lv in model.channels if v == "temperature"]
        self.host: Regridder | None = None
        self.host_grid: LatLonGrid | None = None
        self.host_level = 0
        self.cfg_host = host_grid
        if host_grid.enabled:
            self._setup_host_grid()

    def channel_slice(self, variable: str) -> list[int]:
        return self.model.channels_of(variable)

    def _setup_host_grid(self) -> None:
        """Build (or read) ``W``: WIND grid -> host grid, for host-grid observations ``y = W x``."""
        from wind_bmi.regrid import LatLonGrid, Regridder, RegridError

        hg = self.cfg_host
        if hg.resolution_deg:
            if hg.lat or hg.lon:
                raise ComponentError("config key 'host_grid': give either lat/lon or resolution_deg, not both")
            r = hg.resolution_deg
            if not 0 < r <= 90 or abs(180 / r - round(180 / r)) > 1e-9:
                raise ComponentError(f"config key 'host_grid.resolution_deg': expected a divisor of 180, got {r}")
            lat = np.asarray(-90 + r * (np.arange(round(180 / r)) + 0.5), dtype=np.float64)
            lon = np.asarray(-180 + r * (np.arange(round(360 / r)) + 0.5), dtype=np.float64)
        else:
            lat, lon = np.asarray(hg.lat, dtype=np.float64), np.asarray(hg.lon, dtype=np.float64)
        try:
            self.host_grid = LatLonGrid(lat, lon)
            wind = LatLonGrid(self.model.lat.numpy(), self.model.lon.numpy())
            if hg.weights:
                self.host = Regridder.from_esmf_weights(hg.weights, (self.H, self.W), self.host_grid.shape)
            else:
                self.host = Regridder.build(wind, self.host_grid, hg.method)
        except RegridError as exc:
            raise ComponentError(f"config key 'host_grid': {exc}") from exc
        self.host_covered = (self.host.weights.getnnz(axis=1) > 0).reshape(self.host_grid.shape)
        levels = np.asarray(self.levels, dtype=np.float64)
        self.host_level = int(np.argmin(np.abs(levels - hg.sigma)))

    def host_channel(self, variable: str) -> int:
        """The channel a host-grid field of ``variable`` observes (3-D: the level nearest ``host_grid.sigma``)."""
        chans = self.channel_slice(variable)
        return chans[self.host_level] if len(chans) > 1 else chans[0]

    def check_host_field(self, variable: str, values: np.ndarray) -> np.ndarray:
        """A host-grid field (NaN = unobserved cell) as a copy, checked against the mapping."""
        if self.host is None or self.host_grid is None:
            raise ComponentError("host-grid observations need 'host_grid' in the config")
        values = np.asarray(values, dtype=np.float64).reshape(self.host_grid.shape)
        bad = np.isfinite(values) & ~self.host_covered
        if bad.any():
            raise ComponentError(f"{variable}: {int(bad.sum())} host cell(s) have values but no WIND cells map to "
                                 "them (weights rows are empty); set them to NaN")
        return values.copy()

    def _host_grid_observations(self, pending: PendingInputs, last: int) -> list[Observation]:
        obs: list[Observation] = []
        if self.host is None:
            return obs
        Wm = self.host.weights
        for var, values in pending.host_grid.items():
            flat = values.reshape(-1)
            rows = np.flatnonzero(np.isfinite(flat))
            if rows.size == 0:
                continue
            sub = Wm[rows].tocoo()
            chan = self.host_channel(var)
            op = SparseLinearOperator(torch.from_numpy(sub.row.astype(np.int64)), torch.from_numpy(sub.col.astype(np.int64)),
                                      torch.from_numpy(sub.data), rows.size, last, chan)
            # the host value of a mapped cell is a weighted sum of model values: W (m + s x) = W m + s W x
            wm = np.asarray(sub.tocsr() @ self.model.mean[chan].numpy().reshape(-1)).reshape(-1)
            yn = torch.from_numpy((flat[rows] - wm) / float(self.model.std[chan])).float()
            vn = self.model.error_variance(torch.full((rows.size,), self.obs_error[var], dtype=torch.float64),
                                           torch.full((rows.size,), chan, dtype=torch.long))
            obs.append(Observation(op, yn[None].expand(self.members, -1), vn.float()[None], f"host-grid {var}"))
        return obs


    def observations(self, pending: PendingInputs) -> list[Observation]:
        """Pending inputs of this window as observations on the last generated frame."""
        T, C, H, W = self.model.T, self.model.C, self.H, self.W
        M = self.members
        obs: list[Observation] = []
        last = T - 1
        if pending.observed:
            values = torch.full((T, C, H, W), float("nan"), dtype=torch.float32)
            for var, arr in pending.observed.items():
                chans = self.channel_slice(var)
                values[last, chans] = torch.from_numpy(arr.reshape(len(chans), H, W).astype(np.float32))
            mask = torch.isfinite(values)
            if mask.any():
                filled = torch.where(mask, values, torch.zeros(()))
                norm = self.model.normalise(filled)
                ch = torch.arange(C)[None, :, None, None].expand_as(mask)[mask]
                sig = torch.tensor([self.obs_error[self.model.channels[int(c)][0]] for c in range(C)],
                                   dtype=torch.float64)
                names = ", ".join(sorted(pending.observed))
                obs.append(Observation(MaskOperator(mask), norm[mask][None].expand(M, -1),
                                       self.model.error_variance(sig[ch], ch), f"observed {names}"))
        for var, arr in pending.coarse.items():
            chans = self.channel_slice(var)
            k = self.downscale_factor
            op = AveragePoolOperator(k, self.model.lat, frames=[last], channels=chans)
            coarse = torch.from_numpy(arr.reshape(len(chans), H // k, W // k).astype(np.float64))
            ynorm = self.model.normalise_pooled(coarse, op, chans)
            var_n = self.model.error_variance(torch.full((len(chans),), self.obs_error[var], dtype=torch.float64),
                                              torch.tensor(chans))
            obs.append(Observation(op, ynorm.reshape(1, -1).expand(M, -1),
                                   var_n[:, None].expand(-1, (H // k) * (W // k)).reshape(1, -1), f"coarse {var}"))
        obs += self._host_grid_observations(pending, last)
        return obs

