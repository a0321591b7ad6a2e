"""The noise-blind UViT, schedule, sampler, checkpoint I/O and diffusion-forcing training."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from wind_bmi.model.checkpoint import CheckpointError, load_prior
from wind_bmi.model.network import UViT, sphere_pad
from wind_bmi.model.sampler import sample_window
from wind_bmi.model.schedule import CosineVPSchedule
from wind_bmi.model.train import batch_indices, loss_latitude_weights, sample_levels

from wind_bmi.config import load_config
from wind_bmi.training import run_training


def tiny_net(**kw: object) -> UViT:
    torch.manual_seed(0)
    return UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, **kw)  # type: ignore[arg-type]


def test_network_shapes_and_gradient_flow() -> None:
    net = tiny_net()
    # zero-initialised output layers: perturb so that every parameter receives gradient
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    z = torch.randn(2, 5, 4, 8, 16)
    out = net(z)
    assert out.shape == z.shape
    out.square().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    with pytest.raises(ValueError, match="expected windows"):
        net(torch.randn(1, 5, 3, 8, 16))


def test_network_is_noise_blind() -> None:
    net = tiny_net()
    params = list(inspect.signature(net.forward).parameters)
    assert params == ["z"], "the network must not take a noise level"
    names = " ".join(n for n, _ in net.named_modules()).lower()
    assert "time" not in names and "emb" not in names and "ada" not in names


def test_sphere_padding_crosses_poles_and_wraps_longitude() -> None:
    x = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 1, 4, 8)
    p = sphere_pad(x, 1)
    assert p.shape == (1, 1, 6, 10)
    assert torch.equal(p[0, 0, 1:-1, 0], x[0, 0, :, -1])  # west halo = east edge
    assert torch.equal(p[0, 0, 1:-1, -1], x[0, 0, :, 0])
    # beyond the south pole: row 0 seen from the other side (rolled by half the longitudes)
    assert torch.equal(p[0, 0, 0, 1:-1], x[0, 0, 0].roll(4))
    assert torch.equal(p[0, 0, -1, 1:-1], x[0, 0, -1].roll(4))
    assert torch.equal(sphere_pad(x, 2)[0, 0, 0, 2:-2], x[0, 0, 1].roll(4))  # two rows beyond: mirrored order
    # corners: the halo rows wrap in longitude too; gradients reach every source cell (in-place fills)
    assert torch.equal(p[0, 0, 0, 0], p[0, 0, 0, -2]) and torch.equal(p[0, 0, -1, -1], p[0, 0, -1, 1])
    xd = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sphere_pad(v, 2), (xd,))


def test_sphere_padding_adjoint_matches_autograd_of_the_slices() -> None:
    """The hand-written backward equals autograd through plain slicing, with and without signs."""
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    sign = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)[:, None, None]
    for p in (1, 2):
        for sg in (None, sign):
            s = torch.ones(3, 1, 1, dtype=torch.float64) if sg is None else sg
            rows = torch.cat([x[..., :p, :].flip(-2).roll(4, -1) * s, x, x[..., -p:, :].flip(-2).roll(4, -1) * s], -2)
            ref = torch.cat([rows[..., -p:], rows, rows[..., :p]], -1)
            out = sphere_pad(x, p, sg)
            assert torch.equal(out, ref)
            w = torch.randn_like(ref)
            (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
            (g_new,) = torch.autograd.grad((out * w).sum(), x)
            assert torch.allclose(g_new, g_ref, rtol=0, atol=1e-12), (p, sg is None)
    assert torch.autograd.gradcheck(lambda v: sphere_pad(v, 1, sign), (x,))
    with pytest.raises(ValueError, match="sign must have shape"):
        sphere_pad(x, 1, sign[:2])


def test_wind_components_change_sign_across_the_pole() -> None:
    """A uniform flow over the pole is smooth across it only with the wind halo negated."""
    H, W = 8, 32
    lat = torch.deg2rad(torch.linspace(-78.75, 78.75, H, dtype=torch.float64))[:, None]
    lon = torch.deg2rad(torch.arange(W, dtype=torch.float64) * 360 / W)[None, :]
    # the constant Cartesian vector (1, 0, 0) in the local east/north axes
    u = (-torch.sin(lon)).expand(H, W)
    v = -torch.sin(lat) * torch.cos(lon)
    x = torch.stack([u, v])[None]
    sign = torch.tensor([-1.0, -1.0], dtype=torch.float64)[:, None, None]

    # the same formulas continued past the pole (latitude 180 - lat, same longitude) give the halo
    beyond = torch.deg2rad(torch.tensor(180.0 - 78.75, dtype=torch.float64))
    expect = torch.stack([-torch.sin(lon[0]), -torch.sin(beyond) * torch.cos(lon[0])])
    with_sign, blind = sphere_pad(x, 1, sign)[0, :, -1, 1:-1], sphere_pad(x, 1)[0, :, -1, 1:-1]
    assert torch.allclose(with_sign, expect, atol=1e-12)
    assert float((blind - expect).abs().max()) > 1.5  # without the sign: a jump of twice the wind
    net = UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, vector_channels=(0, 2))
    assert net.stem.pole_sign is not None and net.stem.pole_sign.flatten().tolist() == [-1.0, 1.0, -1.0, 1.0]
    assert "stem.pole_sign" not in net.state_dict()  # rebuilt from the card, not stored in the weights
    with pytest.raises(ValueError, match="vector_channels"):
        UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, vector_channels=(4,))
    with pytest.raises(ValueError, match="in_patch"):
        UViT(4, 5, (8, 16), channels=(8, 16), dim=32, depth=1, heads=2, vector_channels=(0,), in_patch=2)


def test_schedule_clean_frames_are_exact() -> None:
    s = CosineVPSchedule()
    x = torch.randn(2, 5, 1, 2, 2)
    t = torch.tensor([[0.0, 0.0, 0.5, 0.9, 1.0]] * 2)
    z = s.noise(x, t, torch.Generator().manual_seed(0))
    assert torch.equal(z[:, :2], x[:, :2])
    assert not torch.allclose(z[:, 2:], x[:, 2:])
    a, sig = s.coefficients(t)
    assert torch.allclose(a**2 + sig**2, torch.ones_like(a), atol=2e-6)
    w = s.loss_weight(t, 5.0)
    assert torch.all(w[:, :2] == 0) and torch.all(w[:, 2:] >= 1) and torch.all(w <= 5)


def test_sampler_keeps_context_frames_exactly_and_uses_the_generator() -> None:
    net = tiny_net()
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    sched = CosineVPSchedule()

    def D(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(z)

    ctx = torch.randn(3, 5, 4, 8, 16)
    mask = torch.tensor([True, True, False, False, False])
    a = sample_window(D, sched, ctx, mask, steps=4, generator=torch.Generator().manual_seed(1))
    b = sample_window(D, sched, ctx, mask, steps=4, generator=torch.Generator().manual_seed(1))
    c = sample_window(D, sched, ctx, mask, steps=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[:, :2], ctx[:, :2])
    assert torch.equal(a, b) and not torch.equal(a[:, 2:], c[:, 2:])
    assert torch.isfinite(a).all()
    # members differ (independent noise per batch row)
    assert not torch.allclose(a[0, 2:], a[1, 2:])


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


def test_loss_latitude_weight_floor_lifts_the_polar_rows() -> None:
    from wind_bmi.model.physics import latitude_weights

    lat = torch.linspace(-87.2, 87.2, 48, dtype=torch.float64)
    area = latitude_weights(lat)
    assert torch.equal(loss_latitude_weights(area, 0.0), area / area.mean())  # 0: pure area weights
    w = loss_latitude_weights(area, 0.3)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(area[0]) < 0.1 and float(w[0]) > 0.25  # polar rows: ~0.05 -> the floor (after renormalising)
    assert torch.allclose(w[20] / w[27], area[20] / area[27])  # rows above the floor keep their ratios
    with pytest.raises(ValueError, match="lat_weight_floor"):
        loss_latitude_weights(area, 1.5)


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


def test_loading_rejects_corrupt_or_mismatched_weights(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    card_path = tmp_path / "model.json"
    shutil.copy(tiny_model, card_path)
    weights = tmp_path / "model.safetensors"
    shutil.copy(tiny_model.with_suffix(".safetensors"), weights)
    load_prior(card_path)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_prior(card_path)
    card = json.loads(tiny_model.read_text())
    card["architecture"]["dim"] = 64
    shutil.copy(tiny_model.with_suffix(".safetensors"), weights)
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError):
        load_prior(card_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prior(tmp_path / "none.json")
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_prior(card_path)


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


def test_fine_tuning_starts_from_the_prior_and_keeps_its_normalisation(tiny_model: Path, tiny_config: Path,
                                                                       tmp_path: Path) -> None:
    import dataclasses

    from helpers import write_dataset
    from safetensors.torch import load_file

    other = tmp_path / "other_data"  # a different world: the re-fitted statistics would differ
    write_dataset(other / "train", "2000-01-01", 40, seed=7)
    write_dataset(other / "val", "2001-01-01", 10, seed=8)
    base = json.loads(tiny_model.read_text())
    cfg = dataclasses.replace(load_config(tiny_config), init_from=str(tiny_model), lat_weight_floor=1.0)
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


def test_denoising_error_by_row_is_zero_for_an_oracle_and_sigma_for_the_identity() -> None:
    from wind_bmi.evaluation.prior_report import denoising_error_by_row

    sched = CosineVPSchedule()
    x = torch.zeros(4, 5, 3, 6, 64)
    truth = x.clone()
    g = torch.Generator().manual_seed(0)
    oracle = denoising_error_by_row(lambda z, t: truth, sched, x, 0.3, g)
    identity = denoising_error_by_row(lambda z, t: z, sched, x, 0.3, g)
    sigma = float(sched.coefficients(torch.full((1, 1), 0.3))[1])
    assert oracle.shape == (6,) and np.all(oracle == 0)
    assert np.allclose(identity, sigma, rtol=0.05)  # pure noise passed through: its std in every row


def test_prior_report_rolls_out_several_members(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    from wind_bmi.evaluation.prior_report import run_prior_report

    card = tmp_path / "card" / tiny_model.name  # a copy: the report writes itself into the card
    card.parent.mkdir()
    for f in (tiny_model, tiny_model.with_suffix(".safetensors")):
        (card.parent / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="rollout_members"):
        run_prior_report(tiny_data / "val", tmp_path / "bad", card=card, rollout_members=0)
    assert not (tmp_path / "bad").exists()
    rep = run_prior_report(tiny_data / "val", tmp_path / "rep", card=card, samples=2, rollout_days=3.0,
                           rollout_members=3)
    r = rep["rollout"]
    assert r["members"] == 3 and r["finite"]
    assert len(r["member_max_abs_diff_to_truth_K"]) == 3
    assert len(set(r["member_max_abs_diff_to_truth_K"])) == 3  # independent members, not one repeated
    assert r["max_abs_diff_to_truth_K"] == max(r["member_max_abs_diff_to_truth_K"])
    assert r["ensemble_mean_max_abs_diff_to_truth_K"] <= r["max_abs_diff_to_truth_K"] + 1e-9
    assert (tmp_path / "rep" / "prior_rollout.png").stat().st_size > 0
    assert json.loads(card.read_text())["test_report"]["rollout"]["members"] == 3
    rows = rep["denoise_rmse_by_row_t0.3"]["rows"]
    assert len(rows) == 8 and all(np.isfinite(rows))
    cu = rep["context_use_t1"]
    assert cu["estimate"][0] == 0.0 and cu["persistence"][0] == 0.0 and len(cu["estimate"]) == 5


def test_context_use_tells_a_copying_denoiser_from_a_blind_one() -> None:
    from wind_bmi.evaluation.prior_report import context_use

    sched = CosineVPSchedule()
    base = torch.randn(3, 1, 2, 4, 8)
    windows = base + 0.1 * torch.randn(3, 5, 2, 4, 8)  # frames close to each other
    copy = lambda z, t: torch.where((t == 0)[..., None, None, None], z, z[:, :1].expand_as(z))  # noqa: E731
    blind = lambda z, t: torch.where((t == 0)[..., None, None, None], z, torch.zeros_like(z))  # noqa: E731
    c = context_use(copy, sched, windows, 1.0, torch.Generator().manual_seed(0))
    b = context_use(blind, sched, windows, 1.0, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(c["estimate"], c["persistence"], rtol=1e-6)
    np.testing.assert_allclose(b["estimate"][1:], b["climatology"][1:], rtol=1e-6)
    assert max(c["estimate"][1:]) < 0.5 * min(b["estimate"][1:])


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


def test_latitude_offset_is_an_exact_change_of_variables() -> None:
    from wind_bmi.model.denoiser import GaussianDenoiser, PriorDenoiser
    from wind_bmi.model.train import diffusion_loss

    from wind_bmi.data.windows import Normalisation

    # statistics: the offset is each row's mean minus the channel mean, in std units; it survives the card
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(30, 2, 4, 6)) + np.array([[-3.0], [-1.0], [0.5], [4.0]])[None, None] * [[[[1.0]], [[2.0]]]]
    norm = Normalisation.fit(frames, per_latitude=True)
    expect = (frames.mean(axis=(0, 3)) - frames.mean(axis=(0, 2, 3))[:, None]) / frames.std(axis=(0, 2, 3))[:, None]
    np.testing.assert_allclose(norm.lat_offset, expect, atol=1e-12)
    assert Normalisation.fit(frames).lat_offset is None and "lat_offset" not in Normalisation.fit(frames).to_dict()
    back = Normalisation.from_dict(json.loads(json.dumps(norm.to_dict())))
    np.testing.assert_array_equal(back.lat_offset, norm.lat_offset)
    with pytest.raises(ValueError, match="lat_offset"):
        Normalisation.from_dict({**norm.to_dict(), "lat_offset": [[0.0, 1.0]]})

    # a network that is exactly right in the centred space x' = x - offset, wrapped with the offset, is
    # exactly right for x ~ N(offset, cov): the wrapper feeds it z - alpha offset and shifts its estimate back
    T, C, H, W = 2, 1, 3, 2
    shape = (T, C, H, W)
    offset = torch.tensor([[-2.0, 0.5, 3.0]])
    mu = offset[:, :, None].expand(T, C, H, W).reshape(-1).double()
    L = torch.randn(T * C * H * W, T * C * H * W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cov = 0.1 * L @ L.T / L.shape[0] + 0.05 * torch.eye(L.shape[0], dtype=torch.float64)
    net = _CentredGaussian(cov, shape)
    sched = CosineVPSchedule()
    t = torch.tensor([[0.0, 0.6]])
    net.t = t
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = GaussianDenoiser(mu, cov, shape, sched)(z, t)
    wrapped = PriorDenoiser(net, sched, offset=offset).double()(z, t)
    torch.testing.assert_close(wrapped, exact, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(PriorDenoiser(net, sched)(z, t), exact, atol=1e-2)  # the offset matters
    # a deterministic world x = offset is learnt by the zero network: zero loss at any level with the offset only
    x = offset[None, None, :, :, None].expand(3, T, C, H, W).float().contiguous()
    zero_net = lambda z: 0 * z  # noqa: E731
    g = torch.Generator().manual_seed(3)
    tt = torch.rand(3, T, generator=g)
    latw = torch.ones(H)
    assert float(diffusion_loss(zero_net, x, tt, sched, latw, 5.0, g, False, offset)) == 0.0  # type: ignore[arg-type]
    assert float(diffusion_loss(zero_net, x, tt, sched, latw, 5.0, g, False)) > 1.0  # type: ignore[arg-type]


def test_training_with_a_latitude_offset_ships_it_in_the_card(tiny_data: Path, tiny_config: Path,
                                                               tmp_path: Path) -> None:
    import dataclasses

    from wind_bmi.model.tasks import WindModel

    from wind_bmi.data.windows import Normalisation, stack_channels

    cfg = dataclasses.replace(load_config(tiny_config), latitude_offset=True)
    card_path = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "lo"), max_steps=2, progress=False)
    card = json.loads(card_path.read_text())
    prior = load_prior(card_path)
    off = prior.lat_offset
    assert off is not None and tuple(off.shape) == (len(card["channels"]), len(card["grid"]["lat"]))
    assert float(off.abs().max()) > 0
    wm = WindModel(prior)
    assert wm.denoiser.offset is not None and torch.equal(wm.denoiser.offset, off)
    # the offset is the training data's, as fitted by Normalisation
    from wind_bmi.data.layouts import open_any
    from wind_bmi.data.windows import Channel

    ds = open_any(next((tiny_data / "train").glob("*.nc")))
    phys = stack_channels(ds, [Channel(v, lv) for v, lv in wm.channels])
    np.testing.assert_allclose(off.numpy(), Normalisation.fit(phys, per_latitude=True).lat_offset, atol=1e-5)
    # a fine-tune from it keeps the offset; a card whose offset has the wrong shape is refused
    ft = run_training(dataclasses.replace(cfg, init_from=str(card_path), latitude_offset=False), data=str(tiny_data),
                      out=str(tmp_path / "ft"), max_steps=1, progress=False)
    assert json.loads(ft.read_text())["normalisation"]["lat_offset"] == card["normalisation"]["lat_offset"]
    card["normalisation"]["lat_offset"] = card["normalisation"]["lat_offset"][:-1]
    bad = tmp_path / "lo" / "bad.json"
    bad.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="lat_offset"):
        load_prior(bad)


def test_latitude_input_lets_the_convolutions_differ_by_row(tiny_data: Path, tiny_config: Path,
                                                           tmp_path: Path) -> None:
    import dataclasses

    lat = torch.linspace(-80, 80, 8).tolist()
    plain, with_lat = tiny_net(), tiny_net(lat_deg=lat)
    for net in (plain, with_lat):
        torch.manual_seed(1)
        for p in net.parameters():  # zero-initialised output layers: perturb so the output depends on the input
            p.data.add_(0.05 * torch.randn_like(p))
    z = torch.zeros(1, 5, 4, 8, 16)  # a field constant everywhere: only the static channels vary by row
    with torch.no_grad():
        r_plain, r_lat = plain(z), with_lat(z)
    # the first conv sees the same thing in every interior row without the latitude channels, not with them
    stem_in = lambda net: net.stem(torch.cat([z[0], net.static.expand(5, -1, -1, -1)], 1) if net.static is not None  # noqa: E731
                                   else z[0])[0, 0, :, 0]
    with torch.no_grad():
        s_plain, s_lat = stem_in(plain), stem_in(with_lat)
    assert torch.allclose(s_plain[2:-2], s_plain[3:-1]) and not torch.allclose(s_lat[2:-2], s_lat[3:-1], atol=1e-4)
    assert torch.isfinite(r_plain).all() and torch.isfinite(r_lat).all()
    with pytest.raises(ValueError, match="lat_deg"):
        tiny_net(lat_deg=lat[:-1])

    # trained with it, the card records it, and the loaded prior is the same network (latitudes from the card)
    cfg = load_config(tiny_config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lat_input=True))
    card_path = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "li"), max_steps=2, progress=False)
    card = json.loads(card_path.read_text())
    assert card["architecture"]["lat_input"] is True
    prior = load_prior(card_path)
    assert prior.net.static is not None
    np.testing.assert_allclose(prior.net.static[0, :, 0].numpy(), np.sin(np.deg2rad(card["grid"]["lat"])), atol=1e-6)
    # a prior without it cannot be fine-tuned into one with it (the first conv differs)
    plain_card = run_training(load_config(tiny_config), data=str(tiny_data), out=str(tmp_path / "pl"), max_steps=0,
                              progress=False)
    with pytest.raises(ValueError, match="architecture"):
        run_training(dataclasses.replace(cfg, init_from=str(plain_card)), data=str(tiny_data),
                     out=str(tmp_path / "bad"), max_steps=1, progress=False)


def test_temporal_mix_carries_a_clean_frame_to_the_others_at_full_resolution(tiny_config: Path, tiny_data: Path,
                                                                             tmp_path: Path) -> None:
    import dataclasses

    plain, mixed = tiny_net(), tiny_net(temporal_mix=True)
    for net in (plain, mixed):
        torch.manual_seed(1)
        for name, p in net.named_parameters():  # perturb the zero-initialised branches, but keep the
            if not name.startswith("from_tokens"):  # transformer's output at zero: no other path in time
                p.data.add_(0.05 * torch.randn_like(p))
    z = torch.randn(1, 5, 4, 8, 16)
    z2 = z.clone()
    z2[0, 0, :, 3, 5] += 1.0  # one pixel of frame 0
    with torch.no_grad():
        d_plain = (plain(z2) - plain(z))[0, 1:].abs()
        d_mixed = (mixed(z2) - mixed(z))[0, 1:].abs()
    assert float(d_plain.max()) == 0.0  # per-frame convs alone never reach another frame
    assert float(d_mixed.max()) > 1e-4
    assert float(d_mixed[..., 3, 5].mean()) > float(d_mixed[..., 7, 13].mean())  # local, at full resolution
    with pytest.raises(ValueError, match="5 frames"):
        mixed(z[:, :4])
    # trained with it, the card records it and loads the same network
    cfg = load_config(tiny_config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, temporal_mix=True))
    card_path = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "tm"), max_steps=2, progress=False)
    assert json.loads(card_path.read_text())["architecture"]["temporal_mix"] is True
    assert load_prior(card_path).net.temporal_mix


def test_write_card_writes_through_a_link_and_keeps_it(tmp_path: Path) -> None:
    """An editable install links the package's card to the repository's: updating the card (report,
    band-limit fit) must reach the repository file, not replace the link with a copy."""
    from wind_bmi.model.checkpoint import write_card

    real = tmp_path / "repo" / "card.json"
    real.parent.mkdir()
    real.write_text(json.dumps({"name": "a"}))
    link = tmp_path / "card.json"
    link.symlink_to(real)
    write_card({"name": "b"}, link)
    assert link.is_symlink() and json.loads(real.read_text()) == {"name": "b"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_persistence_anomaly_is_a_change_of_variables_that_starts_forecasts_from_persistence(
        tiny_data: Path, tiny_config: Path, tmp_path: Path) -> None:
    import dataclasses

    from wind_bmi.model.denoiser import PriorDenoiser, network_estimate, persistence_base
    from wind_bmi.model.tasks import WindModel
    from wind_bmi.model.train import diffusion_loss, validation_losses

    # the base of each frame: the newest clean frame strictly before it
    t = torch.tensor([[0.0, 0.5, 0.0, 0.7, 0.9], [0.3, 0.2, 0.0, 0.1, 0.0]])
    z = torch.arange(10.0).reshape(2, 5, 1, 1, 1).expand(2, 5, 2, 3, 4).contiguous()
    base, has = persistence_base(z, t)
    assert has.tolist() == [[False, True, False, True, True], [False, False, False, True, False]]
    assert base[0, 1, 0, 0, 0] == 0 and base[0, 3, 0, 0, 0] == 2 and base[0, 4, 0, 0, 0] == 2
    assert base[1, 3, 0, 0, 0] == 7
    # a persistent world (every frame equals the first) is learnt by the zero network with the change only
    sched = CosineVPSchedule()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 3, 8, 16, generator=g).expand(4, 5, 3, 8, 16).contiguous()
    tt = sample_levels(4, 5, 1.0, g)  # every sample has a clean prefix
    zero_net = lambda z: 0 * z  # noqa: E731
    latw = torch.ones(8)
    kw = dict(w_max=5.0, g=torch.Generator().manual_seed(1), bf16=False)
    assert float(diffusion_loss(zero_net, x, tt, sched, latw, persistence=True, **kw)) == 0.0  # type: ignore[arg-type]
    assert float(diffusion_loss(zero_net, x, tt, sched, latw, **kw)) > 1.0  # type: ignore[arg-type]
    # frames with no clean frame before them are untouched: an all-noisy window is estimated as without it
    net = tiny_net()
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    zz = torch.randn(2, 5, 4, 8, 16, generator=g)
    noisy = torch.rand(2, 5, generator=g) + 0.1
    assert torch.equal(network_estimate(net, zz, noisy, sched, None, False, persistence=True),
                       network_estimate(net, zz, noisy, sched, None, False))
    with_ctx = noisy.clone()
    with_ctx[:, 0] = 0.0
    assert not torch.allclose(PriorDenoiser(net, sched, persistence=True)(zz, with_ctx),
                              PriorDenoiser(net, sched)(zz, with_ctx))
    # validation scores the first step of a 6-h forecast against persistence: the zero network with the
    # change IS persistence; without it, it forecasts 0 (the climatological mean)
    xs = torch.randn(6, 5, 4, 8, 16, generator=g).cumsum(dim=1) * 0.3  # frames that wander

    def batch(idx: list[int]) -> torch.Tensor:
        return xs[idx]

    v = validation_losses(zero_net, batch, 6, sched, latw, 6, False, persistence=True)  # type: ignore[arg-type]
    assert v["forecast_persistence"] > 0 and v["forecast_t1"] == pytest.approx(v["forecast_persistence"], rel=1e-6)
    v0 = validation_losses(zero_net, batch, 6, sched, latw, 6, False)  # type: ignore[arg-type]
    assert v0["forecast_t1"] > 2 * v0["forecast_persistence"]
    # trained with it, the card says so and the loaded prior's denoiser applies it
    cfg = load_config(tiny_config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, persistence_anomaly=True))
    card_path = run_training(cfg, data=str(tiny_data), out=str(tmp_path / "pa"), max_steps=2, progress=False)
    assert json.loads(card_path.read_text())["architecture"]["persistence_anomaly"] is True
    assert WindModel(load_prior(card_path)).denoiser.persistence is True
    # the sigma2 weighting: the shift is sigma_t^2 x_p (persistence at t = 1, nothing near t = 0)
    tw = torch.tensor([[0.0, 1.0, 0.5, 0.05, 0.3]])
    zw = torch.randn(1, 5, 4, 8, 16, generator=g)
    est = network_estimate(zero_net, zw, tw, sched, None, False, persistence="sigma2")  # type: ignore[arg-type]
    s2 = sched.coefficients(tw)[1][0, 1:] ** 2
    torch.testing.assert_close(est[0, 1:], s2 * zw[0, :1], rtol=1e-6, atol=1e-6)
    assert float(s2[0]) == pytest.approx(1.0, abs=1e-5) and float(s2[2]) < 0.01
    with pytest.raises(ValueError, match="persistence must be"):
        network_estimate(zero_net, zw, tw, sched, None, False, persistence="half")  # type: ignore[arg-type]
    card = json.loads(card_path.read_text())
    card["architecture"]["persistence_weight"] = "sigma2"
    (tmp_path / "pa" / "s2.json").write_text(json.dumps(card))
    (tmp_path / "pa" / "s2.safetensors").write_bytes(card_path.with_suffix(".safetensors").read_bytes())
    assert WindModel(load_prior(tmp_path / "pa" / "s2.json")).denoiser.persistence == "sigma2"
    from wind_bmi.config import ModelConfig
    with pytest.raises(ValueError, match="persistence_weight"):
        ModelConfig(persistence_weight="half")


def test_sampler_warm_start_from_persistence() -> None:
    sched = CosineVPSchedule()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(3, 5, 4, 8, 16, generator=g)
    mask = torch.tensor([True, True, False, False, False])

    def D(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # an estimate that keeps what it is given
        return z

    def draw(**kw: object) -> torch.Tensor:
        return sample_window(D, sched, ctx, mask, steps=4, eta=0.0, generator=torch.Generator().manual_seed(1),
                             **kw)  # type: ignore[arg-type]

    assert torch.equal(draw(), draw(start_level=1.0))  # 1 is the cold start, bit for bit
    warm, cold = draw(start_level=0.02), draw()
    assert torch.equal(warm[:, :2], ctx[:, :2])
    persist = ctx[:, 1:2].expand(3, 3, 4, 8, 16)
    assert float((warm[:, 2:] - persist).abs().max()) < 0.2  # starts (and stays) next to persistence
    assert float((cold[:, 2:] - persist).abs().mean()) > 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="start_level"):
            draw(start_level=bad)
    with pytest.raises(ValueError, match="frame 0 has none before it"):
        sample_window(D, sched, ctx, torch.tensor([False, True, False, False, False]), steps=2, start_level=0.5)
    with pytest.raises(ValueError, match="schedule_kind 'full'"):
        draw(start_level=0.5, schedule_kind="pyramid")


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
