"""Diffusion-forcing training of the noise-blind prior (single process or ``torchrun`` DDP).

Each sample gets an independent ``t ~ U(0, 1)`` per frame; a fraction of samples gets a clean
prefix of 1-4 frames (t = 0) so the network learns to carry clean context. Loss per frame
``min(1 + SNR, w_max) * mean_{c,h,w}(latw_h (x_hat - x)^2)``, summed over frames, mean over batch.
AdamW, linear warm-up then cosine decay, gradient clipping, EMA weights, bf16 autocast with
fp32 master weights.

Determinism and resume: the data order is a fixed function of ``(seed, epoch)`` and the noise of
``(seed, step, rank)``, so a run resumed from a checkpoint continues bit-for-bit. Training state
(model, EMA, optimiser tensors) is stored as safetensors plus JSON, written atomically. A compact
state (EMA weights in float16) carries a long run between machines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from wind_bmi.model.bandlimit import ZonalBandLimit
from wind_bmi.model.checkpoint import save_tensors
from wind_bmi.model.denoiser import network_estimate
from wind_bmi.model.schedule import CosineVPSchedule

BatchFn = Callable[[Sequence[int]], Tensor]  # window indices -> (B, T, C, H, W) float32


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimiser and diffusion-forcing settings of a training run (the ``train`` preset's own keys).

    Attributes:
        batch_size, lr, weight_decay, warmup_steps, steps, grad_clip, ema_decay: optimiser.
        w_max: clip of the loss weight ``min(1 + SNR, w_max)``.
        clean_prefix_prob: fraction of samples given a clean prefix of 1-4 frames.
        shared_level_prob: fraction of samples whose noisy frames share one level (as when the
            sampler generates frames together, e.g. a forecast after a clean prefix); 0 = every
            frame's level independent.
        checkpoint_minutes: wall time between checkpoints.
        bf16: bf16 autocast (AMX on CPU), fp32 master weights.
        val_windows: validation windows evaluated per noise band.
        seed: base seed of data order, noise and initialisation.
    """

    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    steps: int = 6000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    w_max: float = 5.0
    clean_prefix_prob: float = 0.5
    shared_level_prob: float = 0.0
    checkpoint_minutes: float = 5.0
    bf16: bool = True
    val_windows: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("clean_prefix_prob", "shared_level_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")


NOISE_BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``0.1 lr`` at ``steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    frac = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Global batch of window indices at ``step``: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


def sample_levels(B: int, T: int, clean_prefix_prob: float, g: torch.Generator,
                  shared_level_prob: float = 0.0) -> Tensor:
    """Per-frame levels ``(B, T)``: uniform, with a clean prefix of 1..T-1 frames in part of the batch.

    ``shared_level_prob``: fraction of samples whose frames all get one level (the prefix still
    clean): the states the sampler visits when it generates frames together. 0 draws no extra
    random numbers, so runs without it keep their exact levels.
    """
    t = torch.rand(B, T, generator=g, dtype=torch.float64).clamp_min(1e-4)
    if shared_level_prob > 0.0:
        shared = torch.rand(B, generator=g) < shared_level_prob
        level = torch.rand(B, 1, generator=g, dtype=torch.float64).clamp_min(1e-4)
        t = torch.where(shared[:, None], level.expand(B, T), t)
    has_prefix = torch.rand(B, generator=g) < clean_prefix_prob
    k = torch.randint(1, T, (B,), generator=g)
    frame = torch.arange(T)[None, :]
    t = torch.where(has_prefix[:, None] & (frame < k[:, None]), torch.zeros_like(t), t)
    return t.float()


def diffusion_loss(net: nn.Module, x: Tensor, t: Tensor, schedule: CosineVPSchedule, latw: Tensor, w_max: float,
                   g: torch.Generator, bf16: bool, band_limit: ZonalBandLimit | None = None) -> Tensor:
    """Weighted x-prediction loss of one batch ``x: (B, T, C, H, W)`` at levels ``t: (B, T)``.

    ``band_limit``: the data's zonal band limit the estimate is projected onto, or None.
    """
    z = schedule.noise(x, t, generator=g)
    x_hat = network_estimate(net, z, bf16, band_limit)
    err = (x_hat - x) ** 2 * latw[None, None, None, :, None]
    per_frame = err.mean(dim=(2, 3, 4))  # (B, T)
    w = schedule.loss_weight(t, w_max)
    return (w * per_frame).sum(dim=1).mean()


@torch.no_grad()
def validation_losses(net: nn.Module, val_batch: BatchFn, n_val: int, schedule: CosineVPSchedule, latw: Tensor,
                      windows: int, bf16: bool, seed: int = 12345, batch: int = 8,
                      band_limit: ZonalBandLimit | None = None) -> dict[str, float]:
    """Latitude-weighted MSE of ``x_hat`` per noise band (all frames at one level per sample), with the
    estimate projected onto ``band_limit`` when given (as the denoiser does).

    Also ``forecast_t1``: the MSE of the last frame's estimate at ``t = 1`` with all earlier frames clean
    (the first step of a 6-h forecast), next to ``forecast_persistence``, that of persisting the frame
    before it (the score to beat).
    """
    idx = torch.linspace(0, n_val - 1, min(windows, n_val)).round().long().tolist()
    out = {}
    fc, pers, n_fc = 0.0, 0.0, 0
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(idx), batch):
        x = val_batch(idx[i:i + batch])
        B, T = x.shape[:2]
        t = torch.zeros(B, T)
        t[:, -1] = 1.0
        z = schedule.noise(x, t, generator=g)
        x_hat = network_estimate(net, z, bf16, band_limit)
        w = latw[None, None, :, None]
        fc += float(((x_hat[:, -1] - x[:, -1]) ** 2 * w).mean(dim=(1, 2, 3)).sum())
        pers += float(((x[:, -2] - x[:, -1]) ** 2 * w).mean(dim=(1, 2, 3)).sum())
        n_fc += B
    for lo, hi in NOISE_BANDS:
        g = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        for i in range(0, len(idx), batch):
            x = val_batch(idx[i:i + batch])
            B, T = x.shape[:2]
            t = (lo + (hi - lo) * torch.rand(B, 1, generator=g)).clamp_min(1e-4).expand(B, T).contiguous()
            z = schedule.noise(x, t, generator=g)
            x_hat = network_estimate(net, z, bf16, band_limit)
            err = ((x_hat - x) ** 2 * latw[None, None, None, :, None]).mean(dim=(1, 2, 3, 4))
            total += float(err.sum())
            count += B
        out[f"t_{lo:.2f}_{hi:.2f}"] = total / max(count, 1)
    out["forecast_t1"] = fc / max(n_fc, 1)
    out["forecast_persistence"] = pers / max(n_fc, 1)
    return out


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{k}"] = v.contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[k] = v
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in scalars["state"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": scalars["param_groups"]}


class Trainer:
    """Owns the network, EMA, optimiser and the resumable training state.

    Args:
        net: the UViT (fp32 master weights).
        schedule: noise schedule.
        settings: optimiser/diffusion settings.
        train_batch, n_train: training windows by index.
        val_batch, n_val: validation windows by index.
        latw: latitude weights ``(H,)`` (mean 1).
        out: folder for ``train_state.*``, ``history.json``.
        device: torch device.
        band_limit: the data's zonal band limit the estimates are projected onto, or None.
    """

    def __init__(self, net: nn.Module, schedule: CosineVPSchedule, settings: TrainSettings, train_batch: BatchFn,
                 n_train: int, val_batch: BatchFn, n_val: int, latw: Tensor, out: str | Path,
                 device: str | torch.device = "cpu", band_limit: ZonalBandLimit | None = None) -> None:
        self.device = torch.device(device)
        self.band_limit = band_limit
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        if settings.batch_size % self.world:
            raise ValueError(f"batch_size {settings.batch_size} must be divisible by the world size {self.world}")
        self.net = net.to(self.device)
        self.ema = _copy_module(net).to(self.device)
        self.model: nn.Module = self.net
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.schedule, self.s = schedule, settings
        self.train_batch, self.n_train = train_batch, n_train
        self.val_batch, self.n_val = val_batch, n_val
        self.latw = latw.to(self.device, torch.float32)
        self.out = Path(out)
        self.step = 0
        self.wall = 0.0  # seconds inside train_step (the throughput figure)
        self.elapsed = 0.0  # seconds inside fit(): steps, checkpoints and validation (the budget figure)
        self._fit_start: float | None = None  # a checkpoint inside fit() counts the running call's time too
        self.history: list[dict[str, Any]] = []
        self.rewarm_from: int | None = None  # step a compact state was loaded at (fresh optimiser)

    def lr(self, step: int) -> float:
        """The schedule's LR, ramped up again over ``warmup_steps`` after a compact resume (whose
        optimiser moments start from zero)."""
        lr = lr_at(step, self.s)
        if self.rewarm_from is not None and self.s.warmup_steps > 0:
            lr *= min(1.0, (step - self.rewarm_from + 1) / self.s.warmup_steps)
        return lr

    # -- state ----------------------------------------------------------------
    def save_state(self) -> None:
        """Write ``train_state.safetensors`` + ``train_state.json`` (rank 0, atomically)."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()})
        opt_t, opt_s = _flatten_optimizer(self.opt)
        tensors.update({k: v.cpu() for k, v in opt_t.items()})
        tmp = self.out / "train_state.safetensors.tmp"
        save_tensors(tensors, tmp)
        running = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        meta = {"step": self.step, "wall_seconds": self.wall, "elapsed_seconds": self.elapsed + running,
                "optimizer": opt_s, "rewarm_from": self.rewarm_from,
                "settings": dataclasses.asdict(self.s),
                "history": self.history}
        tmpj = self.out / "train_state.json.tmp"
        tmpj.write_text(json.dumps(meta))
        os.replace(tmp, self.out / "train_state.safetensors")
        os.replace(tmpj, self.out / "train_state.json")

    def load_state(self) -> None:
        """Restore from ``train_state.*`` in ``out``."""
        meta = json.loads((self.out / "train_state.json").read_text())
        tensors = load_file(str(self.out / "train_state.safetensors"))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        self.step = int(meta["step"])
        self.wall = float(meta["wall_seconds"])
        self.elapsed = float(meta.get("elapsed_seconds", 0.0))
        self.history = list(meta["history"])
        self.rewarm_from = meta.get("rewarm_from")

    def export_compact(self, path: str | Path) -> Path:
        """Write a compact resumable state: the EMA weights in float16 (``<path>.safetensors``, an
        eighth of ``train_state.*``) plus the step, times, settings and history (``<path>.json``),
        atomically; rank 0 only.

        What a training campaign commits between machines, so it stays small: the raw weights and the
        optimiser moments are left out. :meth:`load_compact` restarts the raw weights from the EMA
        weights (the better of the two at any point), restarts the moments and ramps the LR up again
        over ``warmup_steps``. ``train_state.*`` stays the bit-exact local checkpoint.
        """
        path = Path(path).with_suffix("")
        if self.rank != 0:
            return path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"ema.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in self.ema.state_dict().items()}
        weights, meta_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
        tmp = weights.with_name(weights.name + ".tmp")
        save_tensors(tensors, tmp)
        meta = {"step": self.step, "wall_seconds": self.wall, "elapsed_seconds": self.elapsed,
                "settings": dataclasses.asdict(self.s), "history": self.history, "dtype": "float16",
                "stored": "EMA weights; the raw weights restart from them, the optimiser moments from zero"}
        tmpj = meta_path.with_name(meta_path.name + ".tmp")
        tmpj.write_text(json.dumps(meta))
        os.replace(tmp, weights)
        os.replace(tmpj, meta_path)
        return meta_path

    def load_compact(self, path: str | Path) -> None:
        """Continue from :meth:`export_compact`'s files: the EMA weights (the raw weights start from
        them), step and history; a fresh optimiser whose LR is re-warmed from this step."""
        path = Path(path).with_suffix("")
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        ema = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")}
        self.ema.load_state_dict(ema)
        self.net.load_state_dict(ema)
        self.step = int(meta["step"])
        self.wall = float(meta["wall_seconds"])
        self.elapsed = float(meta.get("elapsed_seconds", 0.0))
        self.history = list(meta["history"]) + [{"step": self.step, "event": "compact resume"}]
        self.rewarm_from = self.step

    # -- loop -----------------------------------------------------------------
    def train_step(self) -> float:
        s = self.s
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.step)
        idx = batch_indices(self.step, self.n_train, s.batch_size, s.seed)
        local = idx[self.rank::self.world]
        g = torch.Generator().manual_seed(s.seed * 7_919 + self.step * 104_729 + self.rank)
        x = self.train_batch(local).to(self.device)
        t = sample_levels(x.shape[0], x.shape[1], s.clean_prefix_prob, g, s.shared_level_prob).to(self.device)
        self.model.train()
        loss = diffusion_loss(self.model, x, t, self.schedule, self.latw, s.w_max, g, s.bf16,
                              self.band_limit)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
        self.opt.step()
        with torch.no_grad():
            d = min(s.ema_decay, (1 + self.step) / (10 + self.step))
            for pe, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                pe.lerp_(p, 1.0 - d)
            for be, b in zip(self.ema.buffers(), self.net.buffers(), strict=True):
                be.copy_(b)
        self.step += 1
        return float(loss.detach())

    def fit(self, max_steps: int | None = None, max_minutes: float | None = None, progress: bool = True,
            log_every: int | None = None) -> dict[str, float]:
        """Train until ``settings.steps`` (or ``max_steps``/``max_minutes`` for this call); returns last val losses."""
        from tqdm import tqdm

        s = self.s
        stop = s.steps if max_steps is None else min(s.steps, max_steps)
        log_every = log_every or max(1, min(50, s.steps // 10))
        t_start = time.perf_counter()
        self._fit_start = t_start
        first_step, wall_before = self.step, self.wall
        last_ckpt = t_start
        bar = tqdm(total=stop, initial=self.step, disable=not progress or self.rank != 0, desc="train", unit="step")
        running, n_run, t_log = 0.0, 0, time.perf_counter()
        while self.step < stop:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.wall += time.perf_counter() - t0
            running += loss
            n_run += 1
            bar.update(1)
            if self.step % log_every == 0 or self.step == stop:
                dt = time.perf_counter() - t_log
                rec = {"step": self.step, "loss": running / n_run, "lr": self.lr(self.step - 1),
                       "samples_per_s": n_run * s.batch_size / max(dt, 1e-9), "wall_seconds": self.wall}
                self.history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}")
                running, n_run, t_log = 0.0, 0, time.perf_counter()
            now = time.perf_counter()
            if now - last_ckpt > 60.0 * s.checkpoint_minutes:
                self.save_state()
                last_ckpt = now
            if max_minutes is not None and now - t_start > 60.0 * max_minutes:
                break
        bar.close()
        val = validation_losses(self.ema, self.val_batch, self.n_val, self.schedule, self.latw, s.val_windows, s.bf16,
                                band_limit=self.band_limit)
        self.history.append({"step": self.step, "val": val, "wall_seconds": self.wall})
        if self.step > first_step:  # one record per call: a campaign's pieces and the hardware of each
            self.history.append({"step": self.step, "event": "piece", "from_step": first_step,
                                 "wall_seconds": round(self.wall - wall_before, 1), "processes": self.world,
                                 "device": str(self.device), "hardware": hardware_description()})
        self.elapsed += time.perf_counter() - t_start
        self._fit_start = None
        self.save_state()
        return val


def _copy_module(net: nn.Module) -> nn.Module:
    import copy

    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def cpu_model_name() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux); ``None`` where that is not readable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def hardware_description() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model_name(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
