"""Figure 6 — orthogonality illusion: first-order prediction Δu(θ* − t g) vs the true Δu(θ(t)), and the
projection ratio ‖P δ‖/‖δ‖ vs t.

Claim checked: true Δu / first-order Δu ≥ min_ratio (default 100: two orders of magnitude) at the end of the t⁴ window.
Run (default, ≈15 s on 2 CPU cores, float64):
    python -m experiments.run --config=configs/orthogonality_illusion.py --workdir=runs/orthogonality_illusion
    python -m experiments.run --config=configs/orthogonality_illusion.py:eps=1e-2 --workdir=...
Smoke (≈8 s): --config=configs/orthogonality_illusion.py:smoke.   GPU/TPU: :large (or --config.scale=4).
Fields: lam, gamma, eps, tail, n, d, t-grid (t_min, t_max, num_t or ts), substeps, min_ratio, scale.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=48),
    "default": dict(),
    "large": dict(n=512, d=16, num_t=256, scale=4.0),
}


def get_config(arg=None):
    c = common.landscape_config("orthogonality_illusion", min_ratio=100.0)
    return common.apply_config_arg(c, arg, PRESETS)
