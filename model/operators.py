"""Observation operators ``y = A(x) + eta`` for zero-shot inverse problems.

Every operator is a differentiable callable on *normalised* windows ``x: (B, T, C, H, W)`` returning
``(B, M)``. Operators that state physical quantities (dry air mass, area means) receive the
normalisation (``mean`` per channel or per gridpoint, ``std`` per channel) and denormalise inside. The observation-noise
covariance is separate: an :class:`Observation` pairs an operator with ``y`` and the diagonal
``cov_y`` (variances, in the operator's output units). Any differentiable callable with that
signature can be used as an operator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from wind_bmi.model.physics import cell_areas, dry_air_mass

Operator = Callable[[Tensor], Tensor]


@dataclasses.dataclass
class Observation:
    """``y = A(x) + eta``, ``eta ~ N(0, diag(cov_y))``.

    Attributes:
        A: operator ``(B, T, C, H, W) -> (B, M)``.
        y: observed values ``(B, M)`` or ``(M,)`` (broadcast over the batch).
        cov_y: observation-error variances ``(M,)``, ``(B, M)`` or a scalar.
        name: what it observes, for reports (e.g. ``observed temperature``).
    """

    A: Operator
    y: Tensor
    cov_y: Tensor | float
    name: str = ""
    exact: Tensor | None = None  # bool (M,): entries the solver treats exactly (a stack's few constraints)

    def whitened_residual(self, x: Tensor) -> Tensor:
        """``sqrt(mean_i ((A(x)_i - y_i)^2 / cov_y_i))`` per batch row ``(B,)``: 1 means "fits to its error"."""
        with torch.no_grad():
            out = self.A(x).double()
            r = (out - self.target(out)) ** 2 / self.variances(out)
        return r.mean(dim=1).sqrt()

    def variances(self, like: Tensor) -> Tensor:
        c = torch.as_tensor(self.cov_y, dtype=like.dtype, device=like.device)
        return c.expand_as(like)

    def target(self, like: Tensor) -> Tensor:
        return self.y.to(dtype=like.dtype, device=like.device).expand_as(like)


def _sel(x: Tensor, frames: Sequence[int] | None, channels: Sequence[int] | None) -> Tensor:
    if frames is not None:
        x = x[:, list(frames)]
    if channels is not None:
        x = x[:, :, list(channels)]
    return x


class MaskOperator:
    """Sparse reconstruction: ``A(x) = x[mask]`` for a boolean ``mask`` of shape ``(T, C, H, W)``.

    Linear; ``M = mask.sum()``; units those of ``x`` (normalised).
    """

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask.to(torch.bool)
        self.index = self.mask.flatten().nonzero().flatten()

    def __call__(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)[:, self.index.to(x.device)]


class AveragePoolOperator:
    """Spatial downscaling: area-weighted average over ``k x k`` blocks.

    ``A(x)[b, f, c, I, J] = sum_{i in I, j in J} w_i x[b, f, c, i, j] / sum w_i`` with ``w_i`` the
    latitude cell areas (``|d sin lat|``). Linear; output flattened to ``(B, F * C' * H/k * W/k)``.
    """

    def __init__(self, k: int, lat_deg: Tensor, frames: Sequence[int] | None = None,
                 channels: Sequence[int] | None = None) -> None:
        H = lat_deg.numel()
        if H % k:
            raise ValueError(f"pooling factor k={k} must divide the {H} latitudes")
        self.k, self.frames, self.channels = k, frames, channels
        w = cell_areas(lat_deg, 1)[:, 0]
        self.w = (w / w.reshape(H // k, k).sum(dim=1).repeat_interleave(k)).float()  # (H,), sums to 1 per block

    def pool(self, x: Tensor) -> Tensor:
        """``(..., H, W) -> (..., H/k, W/k)``."""
        k = self.k
        *lead, H, W = x.shape
        if W % k:
            raise ValueError(f"pooling factor k={k} must divide the {W} longitudes")
        xw = x * self.w.to(x.device, x.dtype)[:, None]
        return xw.reshape(*lead, H // k, k, W // k, k).sum(dim=(-3, -1)) / k

    def __call__(self, x: Tensor) -> Tensor:
        return self.pool(_sel(x, self.frames, self.channels)).reshape(x.shape[0], -1)


class TemporalMeanOperator:
    """Temporal downscaling: ``A(x) = (1/|F|) sum_{f in F} x_f`` (e.g. a daily mean of 6-hourly frames).

    Linear; output ``(B, C' * H * W)``.
    """

    def __init__(self, frames: Sequence[int], channels: Sequence[int] | None = None) -> None:
        self.frames, self.channels = list(frames), channels

    def __call__(self, x: Tensor) -> Tensor:
        return _sel(x, self.frames, self.channels).mean(dim=1).reshape(x.shape[0], -1)


class SparseLinearOperator:
    """``y = W x_{f,c}`` with ``W`` sparse ``(M, H*W)`` given as COO ``rows, cols, vals``.

    Used for host-grid observations through ESMF weights and for point observations.
    Linear; applies to one frame ``f`` and one channel ``c``; output ``(B, M)``.
    """

    def __init__(self, rows: Tensor, cols: Tensor, vals: Tensor, n_out: int, frame: int, channel: int) -> None:
        self.rows, self.cols, self.vals = rows.long(), cols.long(), vals.double()
        self.n_out, self.frame, self.channel = n_out, frame, channel

    def __call__(self, x: Tensor) -> Tensor:
        field = x[:, self.frame, self.channel].reshape(x.shape[0], -1)  # (B, H*W)
        contrib = field[:, self.cols.to(x.device)] * self.vals.to(x.device, x.dtype)
        out = torch.zeros(x.shape[0], self.n_out, dtype=x.dtype, device=x.device)
        return out.index_add(1, self.rows.to(x.device), contrib)


def bilinear_weights(lat_pts: Tensor, lon_pts: Tensor, lat_deg: Tensor, lon_deg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """COO ``(rows, cols, vals)`` of bilinear interpolation from a lat-lon grid to points.

    Longitude wraps (across the date line and 0/360); beyond the first/last latitude row the
    interpolation crosses the pole, to the row rolled by 180 degrees. ``lat_deg`` ascending,
    ``lon_deg`` evenly spaced from ``lon_deg[0]``.
    """
    H, W = lat_deg.numel(), lon_deg.numel()
    lat_pts, lon_pts = lat_pts.double(), lon_pts.double()
    if (lat_pts.abs() > 90).any():
        raise ValueError("point latitudes must lie in [-90, 90]")
    dlon = 360.0 / W
    xf = torch.remainder(lon_pts - float(lon_deg[0]), 360.0) / dlon
    j0 = torch.floor(xf).long() % W
    j1 = (j0 + 1) % W
    wx = xf - torch.floor(xf)
    lat = lat_deg.double()
    # extended latitude axis: a virtual row beyond each pole at the mirrored latitude
    ext = torch.cat([(-180.0 - lat[:1]), lat, (180.0 - lat[-1:])])
    i = torch.searchsorted(ext, lat_pts.contiguous(), right=True) - 1
    i = i.clamp(0, H)
    wy = (lat_pts - ext[i]) / (ext[i + 1] - ext[i])
    rows, cols, vals = [], [], []
    for corner_i, w_i in ((i, 1.0 - wy), (i + 1, wy)):
        # map extended row -> real row; the virtual rows are the edge rows rolled by W/2
        real = corner_i - 1
        beyond = (real < 0) | (real >= H)
        real = real.clamp(0, H - 1)
        for jj, w_j in ((j0, 1.0 - wx), (j1, wx)):
            col = torch.where(beyond, (jj + W // 2) % W, jj)
            rows.append(torch.arange(lat_pts.numel()))
            cols.append(real * W + col)
            vals.append(w_i * w_j)
    return torch.cat(rows), torch.cat(cols), torch.cat(vals)


class PointOperator(SparseLinearOperator):
    """Point observations at arbitrary ``(lat, lon)`` by bilinear interpolation (see :func:`bilinear_weights`)."""

    def __init__(self, lat_pts: Tensor, lon_pts: Tensor, lat_deg: Tensor, lon_deg: Tensor, frame: int,
                 channel: int) -> None:
        rows, cols, vals = bilinear_weights(lat_pts, lon_pts, lat_deg, lon_deg)
        super().__init__(rows, cols, vals, lat_pts.numel(), frame, channel)


class DryAirMassOperator:
    """Relative dry air mass of each selected frame: ``A(x)_f = M_dry(x_f) / M_ref`` (nonlinear, float64).

    ``M_dry = sum_ij dA_ij (p_s/g - (1/g) sum_k q_k dsigma_k p_s)`` with ``p_s`` (Pa) and ``q`` (kg/kg)
    denormalised from ``x``. Observing ``y = 1`` keeps the mass at ``M_ref`` (e.g. the initial state's).
    Output ``(B, F)``, dimensionless.
    """

    def __init__(self, ps_channel: int, q_channels: Sequence[int], dsigma: Tensor, lat_deg: Tensor, nlon: int,
                 mean: Tensor, std: Tensor, m_ref: float, frames: Sequence[int]) -> None:
        self.ps_channel, self.q_channels = ps_channel, list(q_channels)
        self.dsigma = dsigma.double()
        self.areas = cell_areas(lat_deg, nlon)
        self.mean, self.std = _mean_field(mean, std).double(), std.double()
        self.m_ref, self.frames = float(m_ref), list(frames)

    def mass(self, x: Tensor) -> Tensor:
        """Absolute dry air mass (kg) ``(B, F)`` of the selected frames of normalised ``x``."""
        xf = x[:, self.frames].double()
        ps = xf[:, :, self.ps_channel] * self.std[self.ps_channel] + self.mean[self.ps_channel]
        qc = self.q_channels
        q = xf[:, :, qc] * self.std[qc, None, None] + self.mean[qc]
        return dry_air_mass(ps, q, self.dsigma, self.areas)

    def __call__(self, x: Tensor) -> Tensor:
        return (self.mass(x) / self.m_ref).to(x.dtype)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """The window meeting ``y`` exactly with the smallest relative change of surface pressure: each
        selected frame's surface pressure scaled by ``y / A(x)``. ``M_dry`` is linear in ``p_s`` given ``q``, so one
        scaling is exact; humidity and every other channel are kept."""
        if not self.frames:
            return x
        factor = (y.double() / (self.mass(x) / self.m_ref)).to(x.dtype)  # (B, F)
        c = self.ps_channel
        fi = torch.tensor(self.frames, device=x.device)
        ps = x[:, fi, c] * self.std[c].to(x) + self.mean[c].to(x)
        out = x.clone()
        out[:, fi, c] = (ps * factor[:, :, None, None] - self.mean[c].to(x)) / self.std[c].to(x)
        return out


class AreaMeanOperator:
    """Area-weighted mean of channels over a region and the selected frames, in physical units.

    ``A(x) = sum_{f,c,i,j} r_ij dA_i x_phys[f,c,i,j] / (|F||C| sum_ij r_ij dA_i)`` with region mask ``r``.
    Linear in ``x``; output ``(B, 1)``, or ``(B, |F|)`` with ``per_frame`` (one mean per selected frame,
    the sum over ``f`` dropped). Used for warming scenarios (+2 K on temperature means, +14 % on
    humidity means, per frame). ``positive``: the quantity is non-negative (humidity), so
    :meth:`project` scales it instead of shifting it.
    """

    def __init__(self, channels: Sequence[int], frames: Sequence[int], lat_deg: Tensor, nlon: int, mean: Tensor,
                 std: Tensor, region: Tensor | None = None, positive: bool = False, per_frame: bool = False) -> None:
        self.channels, self.frames = list(channels), list(frames)
        self.per_frame = per_frame
        a = cell_areas(lat_deg, nlon)
        if region is not None:
            a = a * region.double()
        self.weights = (a / a.sum()).float()
        self.inside = a > 0
        self.mean, self.std = _mean_field(mean, std).float(), std.float()
        self.positive = positive

    def __call__(self, x: Tensor) -> Tensor:
        c = self.channels
        xs = x[:, self.frames][:, :, c]
        phys = xs * self.std[c, None, None].to(x) + self.mean[c].to(x)
        means = (phys * self.weights.to(x)).sum(dim=(-2, -1)).mean(dim=2)  # (B, F)
        return means if self.per_frame else means.mean(dim=1, keepdim=True)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """A window meeting ``y`` exactly: inside the region, the selected channels and frames shifted by
        ``y - A(x)`` (physical units, uniformly, frame by frame with ``per_frame``: the least-squares
        correction in the area-weighted norm), or, when ``positive``, scaled by ``y / A(x)`` (the
        smallest relative change; keeps the sign of every value).
        Cells outside the region are kept."""
        if not self.frames:
            return x
        fi = torch.tensor(self.frames, device=x.device)[:, None]
        ci = torch.tensor(self.channels, device=x.device)[None, :]
        std = self.std[self.channels, None, None].to(x)
        mean = self.mean[self.channels].to(x)
        phys = x[:, fi, ci] * std + mean  # (B, F, C, H, W)
        now = self(x)[:, :, None, None, None]
        want = y.to(x)[:, :, None, None, None]
        moved = phys * (want / now) if self.positive else phys + (want - now)
        out = x.clone()
        out[:, fi, ci] = torch.where(self.inside.to(x.device), (moved - mean) / std, x[:, fi, ci])
        return out


class CompositeOperator:
    """Several observations stacked: ``A(x) = [A_1(x), ..., A_n(x)]`` with block-diagonal ``Sigma_y``."""

    def __init__(self, observations: Sequence[Observation]) -> None:
        self.observations = list(observations)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([o.A(x) for o in self.observations], dim=1)

    def observation(self, batch: int, like: Tensor, exact_max: int = 16) -> Observation:
        """The stacked :class:`Observation` for a batch of ``batch`` members. Entries of observations with
        at most ``exact_max`` entries (constraints: area means, dry air mass) are marked ``exact``."""
        ys, covs, exact = [], [], []
        for o in self.observations:
            out = o.A(like)
            ys.append(o.target(out))
            covs.append(o.variances(out))
            exact.append(torch.full((out.shape[1],), out.shape[1] <= exact_max, dtype=torch.bool))
        names = ", ".join(o.name or "operator" for o in self.observations)
        return Observation(self, torch.cat(ys, dim=1).expand(batch, -1), torch.cat(covs, dim=1).expand(batch, -1),
                           names, torch.cat(exact))


def _mean_field(mean: Tensor, std: Tensor) -> Tensor:
    """A normalisation mean as ``(C, H, W)`` or ``(C, 1, 1)`` (per-channel means), so ``mean[c]``
    broadcasts over the grid either way."""
    return mean if mean.ndim == 3 else mean.reshape(len(std), 1, 1)
