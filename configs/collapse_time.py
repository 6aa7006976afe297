"""Figure 4 — collapse time t* (Δu(θ(t*)) = threshold) vs λγ² over a λ × γ grid (expected log–log slope −1/4).

Run (default, ≈40 s on 2 CPU cores, float64; grid vmapped and sharded over all devices, checkpointed per chunk,
so a killed run resumes when the same command is run again):
    python -m experiments.run --config=configs/collapse_time.py --workdir=runs/collapse_time
    python -m experiments.run --config=configs/collapse_time.py:lams=1/10/100,gammas=0.2/0.5 --workdir=...
Smoke (≈15 s): --config=configs/collapse_time.py:smoke.   GPU/TPU: :large (or --config.scale=4).
Fields: lams, gammas (the grid axes), threshold (Δu level defining t*), eps, tail, n, d, t-grid, chunk_size.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=48, lams=(1.0, 4.0, 16.0), gammas=(0.15, 0.3, 0.6)),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=200, lams=(1.0, 1.5, 2.2, 3.3, 5.0, 7.5, 11.0, 16.0, 24.0, 36.0, 54.0, 80.0),
                  gammas=(0.1, 0.13, 0.17, 0.22, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0), chunk_size=64, scale=2.0),
}


def get_config(arg=None):
    c = common.landscape_config(
        "collapse_time",
        drop=("lam", "gamma"),
        lams=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
        gammas=(0.1, 0.15, 0.2, 0.3, 0.45, 0.6),
        threshold=1e-5,
        eps=1e-4,
        t_max=2.0,
        chunk_size=16,
    )
    return common.apply_config_arg(c, arg, PRESETS)
