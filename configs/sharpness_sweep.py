"""Figure 2 — sharpness sweep: fitted quartic coefficient c₄ vs λ at fixed γ_E (expected log–log slope 1).

Run (default, ≈30 s on 2 CPU cores, float64; the λ grid is vmapped and sharded over all devices, resumable):
    python -m experiments.run --config=configs/sharpness_sweep.py --workdir=runs/sharpness_sweep
    python -m experiments.run --config=configs/sharpness_sweep.py:lams=1/3/10/30,gamma=0.5 --workdir=...
Smoke (≈15 s): --config=configs/sharpness_sweep.py:smoke.   GPU/TPU: :large (or --config.scale=4).
Fields: lams (the λ sweep), gamma (fixed γ_E), eps, tail, n, d, t-grid (t_min, t_max, num_t or ts),
chunk_size (grid points per checkpointed chunk), scale (× t-grid resolution).
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=40, lams=(1.0, 3.0, 10.0, 30.0)),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=160, scale=2.0,
                  lams=tuple(float(x) for x in (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100))),
}


def get_config(arg=None):
    c = common.landscape_config(
        "sharpness_sweep",
        drop=("lam",),
        lams=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0),
        eps=1e-4,
        t_max=2.0,
        num_t=64,
        chunk_size=8,
    )
    return common.apply_config_arg(c, arg, PRESETS)
