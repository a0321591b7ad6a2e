"""Ad hoc (session 14): 8-member 60-day unguided rollouts for two priors; per-member max |global-mean T - truth|.

Run from the repository root with the test year generated: python docs/prior_budget/rollout_members.py 11
(runs/ft_budget/model.json is the budget run's card; ~4.5 min per prior at 2 threads with AMX).
"""
import json, sys, time
import numpy as np, torch
from wind_bmi.model.checkpoint import load_prior
from wind_bmi.model.tasks import WindModel
from wind_bmi.data.layouts import open_any
from wind_bmi.data.windows import Channel, stack_channels
res = {}
ds = open_any("data/speedy/test")
for name, card in [("budget", "runs/ft_budget/model.json"), ("shipped", "model/weights/wind_speedy_t31.json")]:
    t0 = time.time()
    wm = WindModel(load_prior(card), "cpu", bf16=None, steps=8)
    phys = stack_channels(ds, [Channel(v, lv) for v, lv in wm.channels])
    from wind_bmi.evaluation.scores import latitude_weights; w = latitude_weights(wm.lat.numpy())[:, None]
    roll = wm.rollout(torch.from_numpy(phys[0]), 60, 8, torch.Generator().manual_seed(int(sys.argv[1]))).numpy()
    tch = wm.channels_of("temperature")
    gm = (roll[:, :, tch] * w).mean(axis=(2, 3, 4))
    n = min(gm.shape[1], phys.shape[0] - 1)
    truth = (phys[1:n + 1, tch] * w).mean(axis=(1, 2, 3))
    d = np.abs(gm[:, :n] - truth[None])
    daily = np.abs(gm[:, :n - n % 4].reshape(8, -1, 4).mean(-1) - truth[:n - n % 4].reshape(-1, 4).mean(-1)[None])
    res[name] = {"member_max": d.max(1).round(3).tolist(), "member_max_daily_mean": daily.max(1).round(3).tolist(),
                 "ens_mean_max": float(np.abs(gm[:, :n].mean(0) - truth).max()), "finite": bool(np.isfinite(roll).all()),
                 "seconds": time.time() - t0}
    print(name, res[name], flush=True)
json.dump(res, open(f"out/rollout_members_seed{sys.argv[1]}.json", "w"), indent=1)
