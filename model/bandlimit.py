"""The zonal band limit of the data: per channel and latitude row, the zonal wavenumbers it occupies.

A spectral GCM such as SPEEDY (T30) holds its fields as spherical harmonics; on the Gaussian grid a
row at latitude ``phi`` carries zonal wavenumber ``m`` only through ``P_n^m(sin phi)``, which
vanishes like ``cos^m phi`` towards the poles. The 96 cells of a row next to a pole therefore hold
about five independent zonal numbers, and everything above is zero to 1e-10 in the data, while the
network sees noise there that it never learnt to remove. :class:`ZonalBandLimit` is that fact as a
fixed linear map: per ``(channel, row)`` keep the zonal Fourier wavenumbers ``k < cutoff`` and zero
the rest. It is an orthogonal projection (per row, in any row-diagonal inner product), so applied to
a denoiser's estimate of a field that lies in its range it can only reduce the error: by Pythagoras
``|P x_hat - x| <= |x_hat - x|`` when ``P x = x``.

The cutoff is fitted from the training data (:meth:`ZonalBandLimit.fit`): the smallest ``K`` whose
mean zonal variance at ``k >= K`` is below ``eps`` (normalised units, so ``eps = 1e-5`` removes at
most ~0.003 std RMS of the data on average). It lives in the model card as ``band_limit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor


class ZonalBandLimit:
    """Projection onto the zonal wavenumbers ``k < cutoff[c, h]`` of every channel ``c`` and row ``h``.

    Args:
        cutoff: ``(C, H)`` integers in ``1 .. W // 2 + 1`` (``W // 2 + 1`` keeps the whole row).
        width: number of longitudes ``W``.
        eps: the tail-variance threshold the cutoff was fitted with (recorded in the card).
    """

    def __init__(self, cutoff: np.ndarray, width: int, eps: float | None = None) -> None:
        cutoff = np.asarray(cutoff)
        nk = width // 2 + 1
        if cutoff.ndim != 2:
            raise ValueError(f"band_limit 'cutoff': expected (channels, latitudes) integers, got shape {cutoff.shape}")
        if not np.issubdtype(cutoff.dtype, np.integer):
            if not np.all(np.equal(np.mod(cutoff, 1), 0)):
                raise ValueError("band_limit 'cutoff': expected integers (zonal wavenumbers)")
            cutoff = cutoff.astype(np.int64)
        if cutoff.size and (cutoff.min() < 1 or cutoff.max() > nk):
            raise ValueError(f"band_limit 'cutoff': wavenumbers must lie in 1..{nk} for {width} longitudes, "
                             f"got {int(cutoff.min())}..{int(cutoff.max())}")
        self.cutoff = cutoff.astype(np.int64)
        self.width = int(width)
        self.eps = eps
        k = torch.arange(nk)
        self._mask = (k[None, None, :] < torch.from_numpy(self.cutoff)[:, :, None]).float()  # (C, H, K)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.cutoff.shape[0]), int(self.cutoff.shape[1]))

    def kept_fraction(self) -> float:
        """Fraction of the real degrees of freedom per row the projection keeps (1 = identity)."""
        kept = np.minimum(2 * self.cutoff - 1, self.width)
        return float(kept.mean() / self.width)

    def __call__(self, x: Tensor) -> Tensor:
        """``P x`` for ``x: (..., C, H, W)`` (differentiable; float32 or float64 in, same dtype out)."""
        if tuple(x.shape[-3:]) != (*self.shape, self.width):
            raise ValueError(f"band limit is for (C, H, W) = {(*self.shape, self.width)}, got {tuple(x.shape)}")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        spec = torch.fft.rfft(x.to(dtype), dim=-1)
        spec = spec * self._mask.to(device=x.device, dtype=dtype)
        return torch.fft.irfft(spec, n=self.width, dim=-1).to(x.dtype)

    # -- card ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.tolist(), "width": self.width, "eps": self.eps,
                "kept_fraction": round(self.kept_fraction(), 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], shape: tuple[int, int, int] | None = None) -> ZonalBandLimit:
        """From a card's ``band_limit``; ``shape`` ``(C, H, W)`` of the model is checked when given."""
        if not isinstance(d, dict) or "cutoff" not in d or "width" not in d:
            raise ValueError("band_limit: expected a mapping with 'cutoff' (channels x latitudes) and 'width'")
        bl = cls(np.asarray(d["cutoff"]), int(d["width"]), d.get("eps"))
        if shape is not None and (*bl.shape, bl.width) != tuple(shape):
            raise ValueError(f"band_limit is for (C, H, W) = {(*bl.shape, bl.width)}, the model is {tuple(shape)}")
        return bl

    # -- fitting ---------------------------------------------------------------------
    @classmethod
    def fit(cls, frames: np.ndarray | Iterable[np.ndarray], eps: float = 1e-5) -> ZonalBandLimit:
        """Fit the cutoff from normalised frames ``(N, C, H, W)`` (or an iterable of such chunks).

        ``cutoff[c, h]`` is the smallest ``K`` with mean over frames of the zonal variance at
        wavenumbers ``k >= K`` below ``eps`` (per cell, normalised units).
        """
        if eps <= 0:
            raise ValueError(f"band limit eps must be > 0, got {eps}")
        chunks = [frames] if isinstance(frames, np.ndarray) else frames
        power: np.ndarray | None = None
        n = 0
        width = 0
        for chunk in chunks:
            for i in range(0, len(chunk), 256):
                x = np.asarray(chunk[i:i + 256], dtype=np.float64)
                if x.ndim != 4:
                    raise ValueError(f"band limit fit: expected frames (N, C, H, W), got shape {x.shape}")
                width = x.shape[-1]
                spec = np.abs(np.fft.rfft(x, axis=-1) / width) ** 2
                spec[..., 1:] *= 2.0  # one-sided spectrum: variance per cell
                if width % 2 == 0:
                    spec[..., -1] /= 2.0  # the Nyquist term appears once
                p = spec.sum(axis=0)
                power = p if power is None else power + p
                n += x.shape[0]
        if power is None or n == 0:
            raise ValueError("band limit fit: no frames")
        tail = np.cumsum((power / n)[..., ::-1], axis=-1)[..., ::-1]  # (C, H, K): variance at k >= K
        below = tail < eps
        nk = tail.shape[-1]
        cutoff = np.where(below.any(axis=-1), below.argmax(axis=-1), nk)
        return cls(np.maximum(cutoff, 1), width, eps)
