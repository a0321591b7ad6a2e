"""Diffusion-forcing training: data order, noise levels, loss, resume, fine-tuning, DDP, bf16 fallback."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from wind_bmi.model.checkpoint import load_prior
from wind_bmi.model.schedule import CosineVPSchedule
from wind_bmi.model.train import batch_indices, sample_levels

from wind_bmi.config import load_config
from wind_bmi.training import run_training


def test_data_order_and_levels_are_deterministic() -> None:
    assert batch_indices(7, 10, 4, 0) == batch_indices(7, 10, 4, 0)
    seen = sum((batch_indices(s, 10, 5, 0) for s in range(2)), [])
    assert sorted(seen) == list(range(10))  # one epoch covers every window once
    t = sample_levels(1000, 5, 0.5, torch.Generator().manual_seed(0))
    clean_rows = (t == 0).any(dim=1).float().mean()
    assert 0.4 < clean_rows < 0.6
    # clean frames only ever form a prefix
    for row in t[(t == 0).any(dim=1)]:
        k = int((row == 0).sum())
        assert torch.all(row[:k] == 0) and torch.all(row[k:] > 0)


def test_shared_levels_give_the_noisy_frames_one_level_and_keep_the_prefix_clean() -> None:
    from wind_bmi.model.train import TrainSettings

    g = torch.Generator().manual_seed(0)
    t = sample_levels(2000, 5, 0.5, g, shared_level_prob=0.5)
    noisy = [row[row > 0] for row in t]
    one_level = torch.tensor([bool(torch.all(r == r[0])) for r in noisy]).float().mean()
    assert 0.45 < one_level < 0.6  # ~half shared (+ the rows whose single noisy frame is trivially one level)
    base = sample_levels(2000, 5, 0.5, torch.Generator().manual_seed(0))
    base_one = torch.tensor([bool(torch.all(r[r > 0] == r[r > 0][0])) for r in base]).float().mean()
    assert base_one < 0.15  # independent levels: only single-noisy-frame rows
    for row in t[(t == 0).any(dim=1)]:  # the clean prefix survives sharing
        k = int((row == 0).sum())
        assert torch.all(row[:k] == 0) and torch.all(row[k:] > 0)
    # 0 draws nothing extra: the levels of runs without it are unchanged
    assert torch.equal(sample_levels(64, 5, 0.5, torch.Generator().manual_seed(3), 0.0),
                       sample_levels(64, 5, 0.5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="shared_level_prob"):
        TrainSettings(shared_level_prob=1.5)


def test_training_reduces_loss_and_checkpoint_round_trips(tiny_model: Path) -> None:
    card = json.loads(tiny_model.read_text())
    hist = json.loads((tiny_model.parent / "train_state.json").read_text())["history"]
    losses = [h["loss"] for h in hist if "loss" in h]
    assert losses[-1] < losses[0]
    assert card["training"]["steps"] == 30 and set(card["validation"]) == {
        "t_0.00_0.25", "t_0.25_0.50", "t_0.50_0.75", "t_0.75_1.00", "forecast_t1", "forecast_persistence"}
    assert len(card["normalisation"]["mean"]) == len(card["channels"]) == 3 * 4 + 2
    prior = load_prior(tiny_model)
    from safetensors.torch import load_file

    saved = load_file(str(tiny_model.with_suffix(".safetensors")))
    for k, v in prior.net.state_dict().items():
        assert torch.equal(v, saved[k])
    # pole_flip_winds: the card names the wind channels and the loaded stem negates exactly those
    winds = [i for i, c in enumerate(card["channels"]) if c["variable"] in ("u_wind", "v_wind")]
    assert card["architecture"]["vector_channels"] == winds and len(winds) == 2 * 3
    sign = prior.net.stem.pole_sign
    assert sign is not None and [i for i, s in enumerate(sign.flatten().tolist()) if s < 0] == winds


def test_resume_continues_bit_for_bit(tiny_data: Path, tiny_config: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_config)
    full = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "full"), max_steps=12, progress=False)
    run_training(cfg, data=str(tiny_data), out=str(tmp_path / "split"), max_steps=5, progress=False)
    split = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "split"), resume=True, max_steps=12,
                         progress=False)
    from safetensors.torch import load_file

    a = load_file(str(full.with_suffix(".safetensors")))
    b = load_file(str(split.with_suffix(".safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "other"), max_steps=7, progress=False)
    assert not all(torch.equal(a[k], load_file(str(c.with_suffix(".safetensors")))[k]) for k in a)


def test_compact_state_carries_a_run_to_a_new_folder(tiny_data: Path, tiny_config: Path, tmp_path: Path) -> None:
    """A campaign moves between machines with the compact state only (float16 EMA weights): the
    continued run starts from them, keeps its step count and history, re-warms the LR, and ends near
    the uninterrupted run."""
    from safetensors.torch import load_file

    cfg = dataclasses.replace(load_config(tiny_config), warmup_steps=6)
    state = tmp_path / "carry" / "state"
    run_training(cfg, data=str(tiny_data), out=str(tmp_path / "a"), max_steps=6, progress=False,
                 export_state=str(state))
    full = load_file(str(tmp_path / "a" / "train_state.safetensors"))
    compact = load_file(str(state.with_suffix(".safetensors")))
    assert all(v.dtype == torch.float16 and k.startswith("ema.") for k, v in compact.items())
    assert sum(v.numel() * 2 for v in compact.values()) < 0.15 * sum(v.numel() * v.element_size() for v in full.values())
    card = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "b"), resume=True, resume_from=str(state),
                        max_steps=12, progress=False)
    # zero further steps: the moved run's EMA is the exported one, rounded to float16
    same = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "c"), resume=True, resume_from=str(state),
                        max_steps=6, progress=False)
    ema_a = load_file(str(tmp_path / "a" / "model.safetensors"))
    ema_c = load_file(str(same.with_suffix(".safetensors")))
    assert all(torch.equal(ema_c[k], ema_a[k].half().float()) for k in ema_a)
    meta = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert meta["step"] == 12 and meta["rewarm_from"] == 6
    training = json.loads(card.read_text())["training"]
    assert training["steps"] == 12
    # the card lists each piece of the campaign (steps, wall time, hardware), carried by the compact state
    pieces = training["pieces"]
    assert [(p["from_step"], p["step"]) for p in pieces] == [(0, 6), (6, 12)]
    assert sum(p["wall_seconds"] for p in pieces) == pytest.approx(training["wall_seconds"], abs=0.2)
    assert all(p["hardware"]["cpu_count"] == os.cpu_count() and p["device"] == "cpu" for p in pieces)
    from wind_bmi.model.train import cpu_model_name
    assert all(p["hardware"]["cpu_model"] == cpu_model_name() for p in pieces)
    if Path("/proc/cpuinfo").exists():
        assert cpu_model_name()  # the CPU's name, so a piece's throughput can be read against its machine
    lrs = {h["step"]: h["lr"] for h in meta["history"] if "lr" in h}
    from wind_bmi.model.train import TrainSettings, lr_at

    s = TrainSettings(**{k: v for k, v in meta["settings"].items()})
    assert lrs[9] == pytest.approx(lr_at(8, s) * 3 / 6)  # re-warmed over warmup_steps after the move
    assert lrs[12] == pytest.approx(lr_at(11, s))  # then back on the schedule
    # an uninterrupted run to 12 steps and the carried one differ only by the restarted moments
    ref = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "ref"), max_steps=12, progress=False)
    a, b = load_file(str(ref.with_suffix(".safetensors"))), load_file(str(card.with_suffix(".safetensors")))
    rel = max(float((a[k] - b[k]).norm() / (a[k].norm() + 1e-12)) for k in a if a[k].numel() > 100)
    assert rel < 0.5


def test_fine_tuning_starts_from_the_prior_and_keeps_its_normalisation(tiny_model: Path, tiny_config: Path,
                                                                       tmp_path: Path) -> None:
    import dataclasses

    from helpers import write_dataset
    from safetensors.torch import load_file

    other = tmp_path / "other_data"  # a different world: the re-fitted statistics would differ
    write_dataset(other / "train", "2000-01-01", 40, seed=7)
    write_dataset(other / "val", "2001-01-01", 10, seed=8)
    base = json.loads(tiny_model.read_text())
    cfg = dataclasses.replace(load_config(tiny_config), init_from=str(tiny_model))
    c0 = run_training(cfg, data=str(other), out=str(tmp_path / "ft0"), max_steps=0, progress=False)
    w_base, w0 = load_file(str(tiny_model.with_suffix(".safetensors"))), load_file(str(c0.with_suffix(".safetensors")))
    assert all(torch.equal(w_base[k], w0[k]) for k in w_base)  # zero steps: exactly the prior
    card0 = json.loads(c0.read_text())
    assert card0["normalisation"] == base["normalisation"]
    assert card0["training"]["init_from"]["sha256"] == base["weights"]["sha256"]
    assert card0["training"]["total_steps"] == base["training"]["steps"]
    c3 = run_training(cfg, data=str(other), out=str(tmp_path / "ft3"), max_steps=3, progress=False)
    card3 = json.loads(c3.read_text())
    assert card3["training"]["total_steps"] == base["training"]["steps"] + 3
    # the totals add this run's wall time to the prior's (rounded to 0.1 s; 3 tiny steps may round to 0)
    assert card3["training"]["total_wall_seconds"] == pytest.approx(
        base["training"]["wall_seconds"] + card3["training"]["wall_seconds"], abs=0.11)
    # elapsed (steps + checkpoints + validation) is the budget figure: never below the step time
    assert card3["training"]["elapsed_seconds"] >= card3["training"]["wall_seconds"]
    assert card3["training"]["elapsed_seconds"] > 0.0
    assert card3["training"]["total_elapsed_seconds"] == pytest.approx(
        base["training"]["elapsed_seconds"] + card3["training"]["elapsed_seconds"], abs=0.11)
    w3 = load_file(str(c3.with_suffix(".safetensors")))
    assert not all(torch.equal(w_base[k], w3[k]) for k in w_base)

    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=cfg.model.dim * 2))
    with pytest.raises(ValueError, match="init_from .*architecture"):
        run_training(wider, data=str(other), out=str(tmp_path / "bad"), max_steps=1, progress=False)
    assert not (tmp_path / "bad" / "model.json").exists()


def test_fine_tuning_grows_frame_mixers_on_a_prior_without_them(tiny_model: Path, tiny_config: Path,
                                                                 tiny_data: Path, tmp_path: Path) -> None:
    import dataclasses

    from safetensors.torch import load_file
    from wind_bmi.model.checkpoint import load_prior

    cfg = load_config(tiny_config)
    assert not cfg.model.temporal_mix
    grown = dataclasses.replace(cfg, init_from=str(tiny_model), shared_level_prob=0.5,
                                model=dataclasses.replace(cfg.model, temporal_mix=True))
    base = load_prior(tiny_model)
    c0 = load_prior(run_training(grown, data=str(tiny_data), out=str(tmp_path / "g0"), max_steps=0, progress=False))
    assert c0.net.temporal_mix and c0.card["architecture"]["temporal_mix"]
    z = torch.randn(2, 5, base.net.in_channels, 8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # zero steps: the mixers are the identity, so the same function
        assert torch.allclose(c0.net(z), base.net(z), atol=1e-6)
    c3 = run_training(grown, data=str(tiny_data), out=str(tmp_path / "g3"), max_steps=3, progress=False)
    w3 = load_file(str(c3.with_suffix(".safetensors")))
    assert any(float(v.abs().max()) > 0 for k, v in w3.items() if k.startswith("mix_") and k.endswith("mix.weight"))
    # the other way round (dropping a prior's mixers) is refused by name
    shrink = dataclasses.replace(cfg, init_from=str(c3))
    with pytest.raises(ValueError, match="init_from .*architecture"):
        run_training(shrink, data=str(tiny_data), out=str(tmp_path / "bad"), max_steps=1, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_with_two_gloo_processes(tiny_data: Path, tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(_free_port()),
           "--no-python", str(Path(sys.executable).parent / "wind-bmi"), "train", "--config", str(tiny_config),
           "--data", str(tiny_data), "--out", str(out),
           "--max-steps", "4"]
    # run from tmp_path: the repository root on sys.path would shadow the installed package
    subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True, cwd=tmp_path)
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["steps"] == 4
    prior = load_prior(out / "model.json")
    assert all(np.isfinite(p.detach().numpy()).all() for p in prior.net.parameters())


class _CentredGaussian(torch.nn.Module):
    """A 'network' that is the exact denoiser of N(0, cov) at the levels ``self.t`` (set by the test)."""

    def __init__(self, cov: torch.Tensor, shape: tuple[int, ...]) -> None:
        super().__init__()
        from wind_bmi.model.denoiser import GaussianDenoiser

        self.exact = GaussianDenoiser(torch.zeros(cov.shape[0]), cov, shape, CosineVPSchedule())
        self.t = torch.zeros(1, shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.exact(z, self.t)


def test_bf16_default_follows_the_hardware(tiny_model: Path) -> None:
    """bf16=None (the BMI's, the report's and the shipped tests' default) autocasts only where the CPU
    runs bf16 natively; fast_bf16 agrees with torch's own CPU feature probes."""
    from wind_bmi.model.denoiser import PriorDenoiser, fast_bf16

    native = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert fast_bf16("cpu") is native and fast_bf16(torch.device("meta")) is False
    prior = load_prior(tiny_model)
    assert PriorDenoiser(prior.net, prior.schedule, bf16=None).bf16 is native
    assert PriorDenoiser(prior.net, prior.schedule, bf16=True).bf16 is True  # explicit requests are kept


def test_training_without_native_bf16_says_so_and_runs_in_fp32(tiny_data: Path, tiny_config: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    import wind_bmi.training as training

    cfg = dataclasses.replace(load_config(tiny_config), bf16=True)
    monkeypatch.setattr(training, "fast_bf16", lambda device: False)
    card = json.loads(run_training(cfg, data=str(tiny_data), out=str(tmp_path / "a"), max_steps=2,
                                   progress=False).read_text())
    assert "config key 'bf16'" in capsys.readouterr().err and card["training"]["settings"]["bf16"] is False
    monkeypatch.setattr(training, "fast_bf16", lambda device: True)
    card = json.loads(run_training(cfg, data=str(tiny_data), out=str(tmp_path / "b"), max_steps=2,
                                   progress=False).read_text())
    assert "config key 'bf16'" not in capsys.readouterr().err and card["training"]["settings"]["bf16"] is True
    assert card["training"]["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
