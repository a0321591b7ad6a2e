"""Zero-shot tasks over one frozen prior: every task is ``y = A(x) + eta`` solved by guided sampling.

:class:`WindModel` is the facade: physical units in and out (normalisation inside), windows
``(B, T, C, H, W)`` with ensemble members as the batch, explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from wind_bmi.model.checkpoint import Prior
from wind_bmi.model.denoiser import PriorDenoiser
from wind_bmi.model.guidance import guided
from wind_bmi.model.operators import (
    AreaMeanOperator,
    AveragePoolOperator,
    CompositeOperator,
    DryAirMassOperator,
    MaskOperator,
    Observation,
    TemporalMeanOperator,
)
from wind_bmi.model.sampler import sample_window

# A constraint builds the observation of one window from (context window in normalised units, mask).
Constraint = Callable[[Tensor, Tensor], Observation]


class WindModel:
    """The prior plus everything needed to use it in physical units.

    Args:
        prior: loaded prior (network, schedule, card).
        device: torch device for all tensors.
        bf16: autocast the network to bfloat16; None: where that is fast on ``device`` (AMX/AVX-512
            BF16 CPUs, CUDA; :func:`wind_bmi.model.denoiser.fast_bf16`), fp32 elsewhere.
        steps, eta: sampler defaults (reverse steps, DDIM 0 .. DDPM 1).
        method, iterations, solver: guidance defaults (``mmps`` | ``dps``; GMRES iterations; ``auto`` |
            ``gmres`` | ``direct``, :mod:`wind_bmi.model.solvers`).
        band_limit: project estimates onto the card's zonal band limit when it has one (False: the
            network's raw estimates, for ablations).
    """

    def __init__(self, prior: Prior, device: str | torch.device = "cpu", bf16: bool | None = False, steps: int = 32,
                 eta: float = 1.0, method: str = "mmps", iterations: int = 3, band_limit: bool = True,
                 solver: str = "auto") -> None:
        self.prior = prior
        self.device = torch.device(device)
        prior.net.to(self.device)
        card = prior.card
        self.card = card
        self.denoiser = PriorDenoiser(prior.net, prior.schedule, bf16=bf16,
                                      band_limit=prior.band_limit if band_limit else None,
                                      lower_bounds=_normalised_lower_bounds(prior))
        self.schedule = prior.schedule
        self.T = int(card["architecture"]["frames"])
        # levels as their nominal values (cards store float32-rounded sigma, 0.510000005 for 0.51)
        self.channels: list[tuple[str, float | None]] = [
            (c["variable"], None if c["level"] is None else round(float(c["level"]), 6)) for c in card["channels"]]
        self.C = len(self.channels)
        self.mean = prior.mean  # (C, H, W): a per-channel mean broadcast, or a per-gridpoint field
        self.std = prior.std  # (C,)
        self.lat = torch.tensor(card["grid"]["lat"], dtype=torch.float64)
        self.lon = torch.tensor(card["grid"]["lon"], dtype=torch.float64)
        self.H, self.W = self.lat.numel(), self.lon.numel()
        self.physical_lower_bounds = torch.tensor([0.0 if v in NON_NEGATIVE else float("-inf") for v, _ in self.channels])
        self.levels = [round(float(v), 6) for v in card.get("levels", [])]
        self.steps, self.eta, self.method, self.iterations, self.solver = steps, eta, method, iterations, solver
        self.report: list[dict[str, Any]] = []

    # -- channels and units -------------------------------------------------------
    def channel_index(self, variable: str, level: float | None = None) -> int:
        for i, (v, lv) in enumerate(self.channels):
            if v == variable and (level is None or (lv is not None and abs(lv - level) < 1e-6)):
                return i
        raise KeyError(f"no channel {variable!r} at level {level} (channels: {sorted({v for v, _ in self.channels})})")

    def channels_of(self, variable: str) -> list[int]:
        idx = [i for i, (v, _) in enumerate(self.channels) if v == variable]
        if not idx:
            raise KeyError(f"variable {variable!r} is not a channel of this model")
        return idx

    def _check(self, x: Tensor, name: str, spatial: tuple[int, int] | None = None) -> None:
        H, W = spatial or (self.H, self.W)
        if x.shape[-3:] != (self.C, H, W):
            raise ValueError(f"{name}: expected trailing shape (C={self.C}, H={H}, W={W}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or inf")

    def normalise(self, x: Tensor) -> Tensor:
        """Physical ``(..., C, H, W)`` -> normalised float32."""
        m = self.mean.to(self.device)
        s = self.std.to(self.device)[:, None, None]
        return ((x.to(self.device, torch.float64) - m) / s).float()

    def denormalise(self, x: Tensor) -> Tensor:
        """Normalised ``(..., C, H, W)`` -> physical float32; variables that cannot be negative (humidity,
        precipitation) are clipped at 0 here too, so float rounding of the normalised bound leaves no
        -1e-9 behind."""
        m = self.mean.to(x.device)
        s = self.std.to(x.device)[:, None, None]
        phys = (x.double() * s + m).float()
        lower = self.physical_lower_bounds.to(phys.device)[:, None, None]
        return torch.maximum(phys, lower)

    def normalise_pooled(self, coarse: Tensor, op: AveragePoolOperator, channels: Sequence[int] | None = None) -> Tensor:
        """Physical block means ``(..., C', H/k, W/k)`` of ``channels`` (default all) -> the normalised
        target of ``op``: ``A(m + s x) = A(m) + s A(x)``, so ``(coarse - pool(m)) / s`` (the mean may be a
        per-gridpoint field, whose block means differ from its values)."""
        ch = list(range(self.C)) if channels is None else list(channels)
        m = op.pool(self.mean[ch].to(self.device))
        s = self.std[ch].to(self.device)[:, None, None]
        return ((coarse.to(self.device, torch.float64) - m) / s).float()

    def error_variance(self, sigma_phys: Tensor | float, channels: Tensor) -> Tensor:
        """Normalised observation-error variances for physical std ``sigma_phys`` at ``channels``."""
        s = torch.as_tensor(sigma_phys, dtype=torch.float64)
        return ((s / self.std[channels]) ** 2).float().to(self.device)

    # -- the one sampling primitive ------------------------------------------------
    def sample(self, context: Tensor, context_mask: Tensor, observations: Sequence[Observation] = (),
               generator: torch.Generator | None = None, steps: int | None = None, eta: float | None = None,
               method: str | None = None, iterations: int | None = None, solver: str | None = None) -> Tensor:
        """Sample windows in *normalised* units given clean context frames and observations.

        Args:
            context: ``(B, T, C, H, W)`` normalised; non-context frames ignored.
            context_mask: bool ``(T,)``.
            observations: observations on normalised windows, stacked if several.

        Afterwards :attr:`report` says how well the result honours each observation
        (:meth:`guidance_report`).
        """
        fn = None
        if observations:
            obs = observations[0] if len(observations) == 1 else \
                CompositeOperator(observations).observation(context.shape[0], context)
            fn = guided(method or self.method, self.denoiser, obs, iterations or self.iterations,
                        solver=solver or self.solver)
        x = sample_window(self.denoiser, self.schedule, context.to(self.device), context_mask,
                          steps=steps or self.steps, eta=self.eta if eta is None else eta,
                          generator=generator, guided=fn)
        x = self.denoiser.bound(x)  # the last step's small noise must not undo the physical bounds
        projected = project_constraints(x, observations)
        self.report = self.guidance_report(projected, observations, getattr(fn, "residuals", None))
        # what MMPS alone delivered (the same numbers when no operator projects)
        before = self.guidance_report(x, observations) if projected is not x else self.report
        for r, g in zip(self.report, before, strict=True):
            r["whitened_residual_before_projection"] = g["whitened_residual"]
        return projected

    def guidance_report(self, x: Tensor, observations: Sequence[Observation],
                        solver_residuals: Tensor | None = None) -> list[dict[str, Any]]:
        """Per observation: its name, the number of entries and the whitened residual
        ``sqrt(mean((A(x) - y)^2 / sigma_y^2))`` of the windows ``x``, averaged over members in the square
        (1: fits to its error; below 2 is the target); with the solver's relative residual history of
        the last guided step when given."""
        report = []
        for i, o in enumerate(observations):
            r = o.whitened_residual(x.to(self.device))
            report.append({"name": o.name or f"operator {i}", "entries": int(o.A(x[:1]).shape[1]),
                           "whitened_residual": float(r.pow(2).mean().sqrt())})
        if report and solver_residuals is not None:
            report[0]["last_step_solver_residuals"] = [float(v) for v in solver_residuals.mean(dim=0)]
        return report

    # -- tasks -----------------------------------------------------------------
    def forecast(self, initial: Tensor, lead_hours: float, members: int, generator: torch.Generator | None = None,
                 context_frames: int = 1, constraints: Sequence[Constraint] = (), **kw: Any) -> Tensor:
        """Ensemble forecast from clean initial frames.

        Args:
            initial: physical ``(k, C, H, W)`` (k >= context_frames, newest last) or ``(C, H, W)``.
            lead_hours: forecast length; rounded up to whole 6-hourly frames.

        Returns:
            ``(members, n_frames, C, H, W)`` physical, frames at +6 h, +12 h, ... (initial excluded).
        """
        if initial.ndim == 3:
            initial = initial[None]
        self._check(initial, "initial")
        n = math.ceil(lead_hours / 6.0)
        x0 = self.normalise(initial[-context_frames:])[None].expand(members, -1, -1, -1, -1)
        frames = self.rollout_normalised(x0, n, generator, context_frames, constraints, **kw)
        return self.denormalise(frames)

    def rollout_normalised(self, context: Tensor, n_frames: int, generator: torch.Generator | None, context_frames: int,
                           constraints: Sequence[Constraint] = (), **kw: Any) -> Tensor:
        """Window after window: the newest ``context_frames`` frames stay clean; returns ``n_frames`` new frames."""
        if not 1 <= context_frames < self.T:
            raise ValueError(f"context_frames must be in 1..{self.T - 1}, got {context_frames}")
        B = context.shape[0]
        hist = context[:, -context_frames:]
        out: list[Tensor] = []
        mask = torch.zeros(self.T, dtype=torch.bool)
        mask[:context_frames] = True
        produced = 0
        while produced < n_frames:
            win = torch.zeros(B, self.T, self.C, self.H, self.W, device=self.device)
            win[:, :context_frames] = hist
            obs = [c(win, mask) for c in constraints]
            new = self.sample(win, mask, obs, generator, **kw)[:, context_frames:]  # type: ignore[arg-type]
            out.append(new)
            produced += new.shape[1]
            hist = torch.cat([hist, new], dim=1)[:, -context_frames:]
        return torch.cat(out, dim=1)[:, :n_frames]

    def rollout(self, initial: Tensor, days: float, members: int = 1, generator: torch.Generator | None = None,
                constraints: Sequence[Constraint] = (), context_frames: int = 1, **kw: Any) -> Tensor:
        """Long run (``days``) window after window with ``constraints`` applied in every window."""
        return self.forecast(initial, days * 24.0, members, generator, context_frames, constraints, **kw)

    def downscale(self, coarse: Tensor, k: int, members: int = 1, sigma_y: float | Tensor = 0.0,
                  generator: torch.Generator | None = None, **kw: Any) -> Tensor:
        """Spatial downscaling: fine windows whose ``k x k`` area-weighted means match ``coarse``.

        Args:
            coarse: physical ``(T, C, H/k, W/k)``.
            sigma_y: observation error (physical units) per channel or scalar; 0 -> 1e-2 std.
        Returns:
            ``(members, T, C, H, W)`` physical.
        """
        if coarse.ndim != 4 or coarse.shape[0] != self.T:
            raise ValueError(f"coarse: expected (T={self.T}, C, H/k, W/k), got {tuple(coarse.shape)}")
        self._check(coarse, "coarse", (self.H // k, self.W // k))
        op = AveragePoolOperator(k, self.lat)
        y = self.normalise_pooled(coarse, op).reshape(1, -1).expand(members, -1)
        var = self._channel_var(sigma_y, (self.T, self.C, (self.H // k) * (self.W // k)))
        ctx = torch.zeros(members, self.T, self.C, self.H, self.W, device=self.device)
        x = self.sample(ctx, torch.zeros(self.T, dtype=torch.bool), [Observation(op, y, var, "coarse field")],
                        generator, **kw)
        return self.denormalise(x)

    def temporal_downscale(self, means: Tensor, members: int = 1, sigma_y: float | Tensor = 0.0,
                           generator: torch.Generator | None = None, frames: Sequence[int] | None = None,
                           **kw: Any) -> Tensor:
        """Windows whose mean over ``frames`` (default all) equals ``means`` (physical ``(C, H, W)``, e.g.
        the daily mean of the four 6-hourly frames that make a day); returns ``(members, T, C, H, W)``."""
        self._check(means, "means")
        op = TemporalMeanOperator(range(self.T) if frames is None else frames)
        y = self.normalise(means).reshape(1, -1).expand(members, -1)
        var = self._channel_var(sigma_y, (self.C, self.H * self.W))
        ctx = torch.zeros(members, self.T, self.C, self.H, self.W, device=self.device)
        x = self.sample(ctx, torch.zeros(self.T, dtype=torch.bool), [Observation(op, y, var, "frame mean")],
                        generator, **kw)
        return self.denormalise(x)

    def reconstruct(self, observations: Tensor, members: int = 1, sigma_y: float | Tensor = 0.0,
                    generator: torch.Generator | None = None, **kw: Any) -> Tensor:
        """Sparse reconstruction: ``observations`` physical ``(T, C, H, W)`` with NaN where unobserved."""
        if observations.shape != (self.T, self.C, self.H, self.W):
            raise ValueError(f"observations: expected {(self.T, self.C, self.H, self.W)}, got {tuple(observations.shape)}")
        mask = torch.isfinite(observations)
        if not mask.any():
            raise ValueError("observations: every value is NaN (nothing observed)")
        filled = torch.where(mask, observations, self.mean.float().expand_as(observations))
        op = MaskOperator(mask)
        y = self.normalise(filled)[mask].reshape(1, -1).expand(members, -1)
        ch = torch.arange(self.C)[None, :, None, None].expand_as(mask)[mask]
        var = self._sigma_at(sigma_y, ch)
        ctx = torch.zeros(members, self.T, self.C, self.H, self.W, device=self.device)
        x = self.sample(ctx, torch.zeros(self.T, dtype=torch.bool), [Observation(op, y, var, "sparse observations")],
                        generator, **kw)
        return self.denormalise(x)

    # -- constraints -------------------------------------------------------------
    def dry_air_mass_operator(self, frames: Sequence[int], m_ref: float) -> DryAirMassOperator:
        bounds = self.card.get("level_bounds")
        q = self.channels_of("specific_humidity")
        if bounds:
            dsig = torch.tensor([abs(b[0] - b[1]) for b in bounds], dtype=torch.float64)
        else:
            dsig = _sigma_thickness(torch.tensor([self.channels[i][1] for i in q], dtype=torch.float64))
        return DryAirMassOperator(self.channel_index("surface_pressure"), q, dsig, self.lat, self.W, self.mean,
                                  self.std, m_ref, frames)

    def dry_air_mass(self, x_phys: Tensor) -> Tensor:
        """Dry air mass (kg) of physical frames ``(B, T, C, H, W)`` -> ``(B, T)``."""
        op = self.dry_air_mass_operator(range(x_phys.shape[1]), 1.0)
        return op.mass(self.normalise(x_phys))

    def dry_air_mass_constraint(self, m_ref: float, rel_error: float = 1e-5) -> Constraint:
        """Keep every generated frame's dry air mass at ``m_ref`` (relative error ``rel_error``)."""

        def build(window: Tensor, mask: Tensor) -> Observation:
            frames = [f for f in range(self.T) if not bool(mask[f])]
            op = self.dry_air_mass_operator(frames, m_ref)
            return Observation(op, torch.ones(1, len(frames), device=self.device), rel_error**2, "dry air mass")

        return build

    def area_mean_constraint(self, variable: str, target: float, error: float,
                             region: Tensor | None = None) -> Constraint:
        """Keep the area-weighted mean of ``variable`` (all levels, generated frames) at ``target``."""
        chans = self.channels_of(variable)

        def build(window: Tensor, mask: Tensor) -> Observation:
            frames = [f for f in range(self.T) if not bool(mask[f])]
            op = AreaMeanOperator(chans, frames, self.lat, self.W, self.mean, self.std, region,
                                  positive=variable in NON_NEGATIVE)
            return Observation(op, torch.tensor([[target]], device=self.device), error**2, f"area-mean {variable}")

        return build

    def warming_observations(self, control: Tensor, mask: Tensor, delta_t: float, humidity_percent: float,
                             region: Tensor | None = None, t_error: float = 0.002,
                             q_rel_error: float = 0.0002) -> list[Observation]:
        """Warming targets for one window, relative to a control window of the same run without them.

        Pseudo-global warming: in every generated frame, the guided window's area-mean temperature (all
        levels) must be the control's plus ``delta_t`` K, and its area-mean specific humidity the
        control's times ``1 + humidity_percent / 100`` (Clausius-Clapeyron: about 7 %/K), member by
        member and frame by frame (a target on the window's mean alone lets single frames miss it by
        0.1 K and more). Errors: ``t_error`` K and ``q_rel_error`` of the control's mean; they set the guidance's
        strength, not a tolerance: near ``t = 0`` the posterior variance of a global mean is about
        (0.01 K)^2, so a looser ``sigma_y`` delivers only part of the target (0.05 K: +1.35 K of +2 K,
        docs/findings.md). The result meets the targets exactly through :func:`project_constraints`.

        Args:
            control: normalised ``(B, T, C, H, W)``: the control window (same context, same noise, no
                warming).
            mask: bool ``(T,)``, the context frames.
        """
        frames = [f for f in range(self.T) if not bool(mask[f])]
        out = []
        for var, name in (("temperature", "warming: area-mean temperature"),
                          ("specific_humidity", "warming: area-mean humidity")):
            op = AreaMeanOperator(self.channels_of(var), frames, self.lat, self.W, self.mean, self.std, region,
                                  positive=var in NON_NEGATIVE, per_frame=True)
            ref = op(control.to(self.device)).detach()  # (B, frames)
            if var == "temperature":
                out.append(Observation(op, ref + delta_t, t_error**2, name))
            else:
                out.append(Observation(op, ref * (1 + humidity_percent / 100.0), (q_rel_error * ref) ** 2, name))
        return out

    def warming(self, initial: Tensor, days: float, members: int = 1, delta_t: float = 2.0,
                humidity_percent: float = 14.0, generator: torch.Generator | None = None,
                region: Tensor | None = None, constraints: Sequence[Constraint] = (),
                **kw: Any) -> tuple[Tensor, Tensor]:
        """Warming scenario against a control: two rollouts from ``initial`` with the same random draws,
        the second guided in every window to the control's area means plus ``delta_t`` K of temperature
        and ``humidity_percent`` % of humidity (:meth:`warming_observations`); ``constraints`` apply to
        both.

        Returns:
            ``(warm, control)``, each ``(members, frames, C, H, W)`` physical.
        """
        if initial.ndim == 3:
            initial = initial[None]
        self._check(initial, "initial")
        n = math.ceil(days * 24.0 / 6.0)
        g_control = torch.Generator(device=self.device)
        g_warm = torch.Generator(device=self.device)
        if generator is not None:
            g_control.set_state(generator.get_state())
            g_warm.set_state(generator.get_state())
        x0 = self.normalise(initial[-1:])[None].expand(members, -1, -1, -1, -1)
        mask = torch.zeros(self.T, dtype=torch.bool)
        mask[0] = True
        hist = {"control": x0[:, -1:], "warm": x0[:, -1:]}
        out: dict[str, list[Tensor]] = {"control": [], "warm": []}
        produced = 0
        while produced < n:
            wins = {}
            for name in ("control", "warm"):
                win = torch.zeros(members, self.T, self.C, self.H, self.W, device=self.device)
                win[:, :1] = hist[name]
                wins[name] = win
            control = self.sample(wins["control"], mask, [c(wins["control"], mask) for c in constraints], g_control, **kw)
            obs = [c(wins["warm"], mask) for c in constraints]
            obs += self.warming_observations(control, mask, delta_t, humidity_percent, region)
            warm = self.sample(wins["warm"], mask, obs, g_warm, **kw)
            for name, x in (("control", control), ("warm", warm)):
                out[name].append(x[:, 1:])
                hist[name] = x[:, -1:]
            produced += self.T - 1
        return (self.denormalise(torch.cat(out["warm"], dim=1)[:, :n]),
                self.denormalise(torch.cat(out["control"], dim=1)[:, :n]))

    # -- helpers -----------------------------------------------------------------
    def _channel_var(self, sigma_y: float | Tensor, shape: tuple[int, ...]) -> Tensor:
        """Variances broadcast over ``shape`` (channel axis = the one of size C), flattened."""
        ch_axis = list(shape).index(self.C)
        ch = torch.arange(self.C).reshape([-1 if i == ch_axis else 1 for i in range(len(shape))]).expand(*shape)
        return self._sigma_at(sigma_y, ch.reshape(-1))[None]

    def _sigma_at(self, sigma_y: float | Tensor, ch: Tensor) -> Tensor:
        s = torch.as_tensor(sigma_y, dtype=torch.float64)
        if s.ndim == 0:
            std_norm = torch.full((self.C,), 1e-2, dtype=torch.float64) if float(s) == 0 else s / self.std
        else:
            std_norm = s / self.std
        return (std_norm[ch] ** 2).float().to(self.device)


NON_NEGATIVE = ("specific_humidity", "precipitation", "total_precipitation_6hr")


def project_constraints(x: Tensor, observations: Sequence[Observation]) -> Tensor:
    """Meet the few-valued constraints exactly: every operator with a ``project(x, y)`` (area means,
    dry air mass) moves the sampled window onto ``A(x) = y``.

    MMPS pulls a global mean by ``A V A^T / (Sigma_y + A V A^T)`` of its residual per step, so even a
    tight ``sigma_y`` leaves ~0.01 K of a +2 K target; the projection removes that remainder with the
    smallest change of the field (a uniform shift, or a scaling for non-negative quantities and for
    surface pressure under a mass constraint), after the guidance has made the field consistent with
    the target. Area means first, dry air mass last: scaling surface pressure leaves every area mean
    of the other channels unchanged, while scaling humidity changes the dry air mass.
    """
    ordered = sorted(observations, key=lambda o: isinstance(o.A, DryAirMassOperator))
    for o in ordered:
        project = getattr(o.A, "project", None)
        if project is not None:
            with torch.no_grad():
                x = project(x, o.target(o.A(x)))
    return x


def _normalised_lower_bounds(prior: Prior) -> Tensor:
    """The normalised value of 0 for variables that cannot be negative (humidity, precipitation),
    ``-inf`` for the others: ``(C, H, W)`` (the mean may vary per gridpoint)."""
    mean, std = prior.mean, prior.std
    names = [c["variable"] for c in prior.card["channels"]]
    lower = torch.full(mean.shape, float("-inf"), dtype=torch.float64)
    for i, v in enumerate(names):
        if v in NON_NEGATIVE:
            lower[i] = -mean[i] / std[i]
    return lower.float()


def _sigma_thickness(levels: Tensor) -> Tensor:
    """Layer thicknesses from full-level sigmas (half levels midway, 0 and 1 at the ends)."""
    order = torch.argsort(levels)
    s = levels[order]
    half = torch.cat([torch.zeros(1, dtype=s.dtype), 0.5 * (s[1:] + s[:-1]), torch.ones(1, dtype=s.dtype)])
    d = half[1:] - half[:-1]
    out = torch.empty_like(d)
    out[order] = d
    return out
