"""Figure 5 — curvature-driven drift: ‖F^{1/2} P (θ(t) − θ*)‖ vs t against (γ_F/2) t² − ‖F^{1/2} P g‖ t (Thm 6.2).

Claim checked: local log–log slope of the drift 2 ± 0.05 in the quartic window of Δu, drift ≥ 0.98 × bound there.
Run (default, ≈15 s on 2 CPU cores, float64):
    python -m experiments.run --config=configs/drift.py --workdir=runs/drift
    python -m experiments.run --config=configs/drift.py:lam=10,gamma=0.3,eps=1e-3 --workdir=...
Smoke (≈8 s): --config=configs/drift.py:smoke.   GPU/TPU: :large (or --config.scale=4).
Fields: lam, gamma, eps (ε = ‖P g‖), tail, n, d, t_min/t_max/num_t (or ts), substeps, scale.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=48),
    "default": dict(),
    "large": dict(n=512, d=16, num_t=256, scale=4.0),
}


def get_config(arg=None):
    c = common.landscape_config("drift")
    return common.apply_config_arg(c, arg, PRESETS)
