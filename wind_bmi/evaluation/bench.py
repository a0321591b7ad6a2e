"""``wind-bmi bench``: speed and memory of a guided window, the network and training.

Writes ``bench.json`` (flat records ``{benchmark, value, unit, config}``) and ``bench.md``.
All figures are measured in one run on the machine at hand; nothing is asserted here.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from wind_bmi.config import GuidanceConfig, SamplerConfig
from wind_bmi.data import shipped_sample_path
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels
from wind_bmi.model.checkpoint import build_network, load_prior
from wind_bmi.model.denoiser import fast_bf16
from wind_bmi.model.operators import MaskOperator, Observation
from wind_bmi.model.physics import latitude_weights
from wind_bmi.model.tasks import WindModel


def _time(fn: Any, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def matmul_tflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, reps) / 1e12


def run_bench(out: str | Path, quick: bool = False, model: str | None = None, steps: int | None = None) -> Path:
    """Measure everything in one run; ``steps`` per window defaults to the BMI default (``sampler.steps``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recs: list[dict[str, Any]] = []

    def add(name: str, value: float, unit: str, **config: Any) -> None:
        recs.append({"benchmark": name, "value": float(value), "unit": unit, "config": config})
        print(f"{name:40s} {value:10.4g} {unit} {config}", flush=True)

    reps = 1 if quick else 3
    steps = steps or (4 if quick else SamplerConfig().steps)
    threads = torch.get_num_threads()
    add("bf16_matmul_tflops", matmul_tflops(torch.bfloat16, 1024 if quick else 2048), "TFLOP/s", threads=threads)
    add("fp32_matmul_tflops", matmul_tflops(torch.float32, 1024 if quick else 2048), "TFLOP/s", threads=threads)
    # bf16 where the CPU runs it natively (AMX / AVX-512 BF16); an AVX2-only CPU emulates it, so the
    # windows and the training step run in fp32 there and utilisation is against the fp32 peak
    fast = fast_bf16("cpu")
    add("bf16_fast_on_this_cpu", float(fast), "bool", capability=torch.backends.cpu.get_cpu_capability())
    peak = recs[0 if fast else 1]["value"]

    prior = load_prior(model)
    wm = WindModel(prior, "cpu", bf16=fast, steps=steps)
    net = prior.net
    z = torch.randn(1, wm.T, wm.C, wm.H, wm.W)
    with FlopCounterMode(display=False) as fc:
        net(z)
    fwd_flops = fc.get_total_flops()
    for dt_name, bf16 in (("bf16", True), ("fp32", False))[0 if fast else 1:]:
        def fwd(bf16: bool = bf16) -> None:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                net(z)
        t = _time(fwd, reps)
        add(f"network_forward_seconds_{dt_name}", t, "s", batch=1)
        add(f"network_forward_tflops_{dt_name}", fwd_flops / t / 1e12, "TFLOP/s", batch=1)

    # training throughput with a trainable copy of the shipped architecture: the recipe's step (eager,
    # batch 8, bf16 autocast where native) and, side by side, the variants tried to speed it up
    def train_rate(B: int = 8, bf16: bool = fast, layout: str = "nchw", compiled: bool = False) -> float:
        train_net = build_network(prior.card)
        if layout == "channels_last":
            train_net = train_net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        run_net: Any = torch.compile(train_net) if compiled else train_net
        opt = torch.optim.AdamW(train_net.parameters(), 1e-4)
        xb = torch.randn(B, wm.T, wm.C, wm.H, wm.W)

        def train_step() -> None:
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                y = run_net(xb)
            loss = (y.float() - xb).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if compiled:
            train_step()  # compilation
        return B / _time(train_step, reps)

    rate = train_rate()
    add("train_samples_per_second", rate, "samples/s", batch=8, bf16=fast)
    train_tflops = 3 * fwd_flops * rate / 1e12  # forward + backward ~ 3x forward
    add("network_utilisation", train_tflops / peak, f"fraction of {'bf16' if fast else 'fp32'} matmul",
        train_tflops=train_tflops)
    if not quick:
        variants: list[tuple[str, dict[str, Any]]] = [("batch_4", {"B": 4}), ("batch_16", {"B": 16}),
                                                      ("channels_last", {"layout": "channels_last"}),
                                                      ("torch_compile", {"compiled": True})]
        if fast:
            variants.append(("fp32", {"bf16": False}))
        for label, kw in variants:
            r = train_rate(**kw)
            add(f"train_samples_per_second_{label}", r, "samples/s", relative_to_recipe=round(r / rate, 3), **kw)

    # guided vs unguided 24-h windows (1 context frame, 4 new frames)
    ds = open_any(shipped_sample_path())
    frames = torch.from_numpy(stack_channels(ds.isel(time=slice(0, 5)), [Channel(v, lv) for v, lv in wm.channels]))
    x0 = wm.normalise(frames)
    mask_ctx = torch.zeros(wm.T, dtype=torch.bool)
    mask_ctx[0] = True
    obs_mask = torch.zeros(wm.T, wm.C, wm.H, wm.W, dtype=torch.bool)
    obs_mask[-1] = torch.rand(wm.C, wm.H, wm.W, generator=torch.Generator().manual_seed(0)) < 0.05

    default = GuidanceConfig()
    m0 = float(wm.dry_air_mass(wm.denormalise(x0[None, :1]))[0, 0])

    def window(members: int, iterations: int | None, mass: bool = False) -> float:
        ctx = x0[None].expand(members, -1, -1, -1, -1).contiguous()
        obs = []
        if iterations is not None:  # 5 % of the cells of the last frame observed in every channel (GMRES)
            obs = [Observation(MaskOperator(obs_mask), x0[obs_mask][None].expand(members, -1), 0.01)]
        if mass:  # the dry-air-mass constraint alone: 4 entries, solved exactly (one backward pass per entry)
            obs = [wm.dry_air_mass_constraint(m0)(ctx, mask_ctx)]
        g = torch.Generator().manual_seed(1)
        return _time(lambda: wm.sample(ctx, mask_ctx, obs, g, iterations=iterations or default.iterations,
                                       solver=default.solver), reps)

    t_unguided = window(1, None)
    add("window_seconds_unguided_1member", t_unguided, "s", steps=steps, advance_hours=24)
    t_guided = window(1, default.iterations)
    add("window_seconds_guided_1member", t_guided, "s", steps=steps, iterations=default.iterations,
        note="the BMI's default guidance (GMRES)")
    t_1 = window(1, 1)
    add("window_seconds_guided_1member_1iteration", t_1, "s", steps=steps, iterations=1)
    add("seconds_per_extra_gmres_iteration", (t_guided - t_1) / max(default.iterations - 1, 1), "s",
        steps=steps, note="per window, 1 member")
    add("window_seconds_mass_constraint_direct_1member", window(1, None, mass=True), "s", steps=steps,
        note="exact small-y solve, 4 entries")
    add("guided_unguided_ratio", t_guided / t_unguided, "ratio", steps=steps)
    add("window_seconds_unguided_8members", window(8, None), "s", steps=steps)
    t8 = window(8, default.iterations)
    add("window_seconds_guided_8members", t8, "s", steps=steps, iterations=default.iterations)
    add("guided_8_vs_1_member_ratio", t8 / t_guided, "ratio", steps=steps)
    add("peak_rss_gb_8members_guided", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "GB",
        note="peak RSS of the bench process, which includes the 8-member guided window")

    # does the step count cost skill? 24-h unguided 8-member forecast on the sample against the truth
    truth = x0[-1]
    w = latitude_weights(wm.lat).float()[:, None]
    for n_steps in sorted({steps, 8 if quick else 32}):
        ens = wm.sample(x0[None].expand(8, -1, -1, -1, -1).contiguous(), mask_ctx, [], torch.Generator().manual_seed(3),
                        steps=n_steps)
        rmse = float(torch.sqrt(((ens[:, -1].mean(0) - truth) ** 2 * w).mean()))
        add(f"forecast_24h_rmse_steps_{n_steps}", rmse, "normalised units", members=8, steps=n_steps,
            note="ensemble-mean RMSE over all channels against the sample's truth at +24 h")

    # bf16 vs fp32 sampling difference on the sample (same noise), where bf16 is what the windows use
    if fast:
        ctx = x0[None]
        a = wm.sample(ctx, mask_ctx, [], torch.Generator().manual_seed(2))
        wm32 = WindModel(prior, "cpu", bf16=False, steps=steps)
        b = wm32.sample(ctx, mask_ctx, [], torch.Generator().manual_seed(2))
        add("bf16_vs_fp32_window_rms_difference", float(torch.sqrt(((a - b) ** 2).mean())), "normalised units",
            note="same generator; 1 = one climatological standard deviation")

    # scaling with grid size (same architecture, random weights)
    card = dict(prior.card)
    for factor, label in ((0.5, "4x_smaller"), (2.0, "4x_larger")):
        if quick and factor > 1:
            continue
        H, W = int(wm.H * factor), int(wm.W * factor)
        c2 = {**card, "grid": {"lat": list(range(H)), "lon": list(range(W))}}
        net2 = build_network(c2).eval()
        z2 = torch.randn(1, wm.T, wm.C, H, W)

        def unguided_window(n: Any = net2, zz: torch.Tensor = z2) -> None:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                for _ in range(steps):
                    n(zz)
        add(f"window_seconds_unguided_grid_{label}", _time(unguided_window, reps), "s", grid=[H, W], steps=steps)

    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(recs, indent=1))
    os.replace(tmp, out / "bench.json")
    lines = ["| benchmark | value | unit | config |", "|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['value']:.4g} | {r['unit']} | {json.dumps(r['config'])} |" for r in recs]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    return out / "bench.json"
