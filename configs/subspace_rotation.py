"""Figure 9 — subspace rotation: principal angles between the top-d Fisher subspace at θ* and at θ(t) along
gradient flow, against the Davis–Kahan bound; static vs moving projection ratio.

Claim checked: the largest principal angle grows linearly at small t (log–log slope 1 ± 0.05) and stays below
the Davis–Kahan bound at every t.
Run (default, ≈20 s on 2 CPU cores, float64):
    python -m experiments.run --config=configs/subspace_rotation.py --workdir=runs/subspace_rotation
    python -m experiments.run --config=configs/subspace_rotation.py:policy_curvature=1 --workdir=...
Smoke (≈10 s): --config=configs/subspace_rotation.py:smoke.   GPU/TPU: :large.
Fields: policy_curvature (κ: rotation rate), lam, gamma, eps, tail, n, d, t-grid, substeps, scale.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=40),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=160, scale=2.0),
}


def get_config(arg=None):
    c = common.landscape_config("subspace_rotation", eps=1e-4, policy_curvature=0.3, t_max=1.0, num_t=48)
    return common.apply_config_arg(c, arg, PRESETS)
