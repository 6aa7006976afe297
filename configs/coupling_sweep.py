"""Figure 3 — coupling sweep: fitted quartic coefficient c₄ vs γ at fixed λ (expected log–log slope 2).

Run (default, ≈30 s on 2 CPU cores, float64; the λ grid is vmapped and sharded over all devices, resumable):
    python -m experiments.run --config=configs/coupling_sweep.py --workdir=runs/coupling_sweep
    python -m experiments.run --config=configs/coupling_sweep.py:gammas=0.1/0.3/1,lam=3 --workdir=...
Smoke (≈15 s): --config=configs/coupling_sweep.py:smoke.   GPU/TPU: :large (or --config.scale=4).
Fields: gammas (the γ_E sweep), lam (fixed λ), eps, tail, n, d, t-grid (t_min, t_max, num_t or ts),
chunk_size (grid points per checkpointed chunk), scale (× t-grid resolution).
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=40, gammas=(0.1, 0.2, 0.4, 0.8)),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=160, scale=2.0,
                  gammas=tuple(float(x) for x in (0.1, 0.13, 0.17, 0.22, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0))),
}


def get_config(arg=None):
    c = common.landscape_config(
        "coupling_sweep",
        drop=("gamma",),
        gammas=(0.1, 0.15, 0.2, 0.3, 0.4, 0.55, 0.75, 1.0),
        eps=1e-4,
        t_max=2.0,
        num_t=64,
        chunk_size=8,
    )
    return common.apply_config_arg(c, arg, PRESETS)
