"""Figure 7 — projection defences: Δu(t) with no defence, static removal of P(θ*) from every update, and
re-projection onto the current top-d Fisher subspace at every step.

Claim checked: under the static defence Δu still grows with log–log slope 4 ± 0.1 and stays within a factor
static_min_ratio of the undefended Δu; re-projection keeps it below dynamic_max_ratio × undefended.
Run (default, ≈25 s on 2 CPU cores, float64):
    python -m experiments.run --config=configs/projection_defense.py --workdir=runs/projection_defense
    python -m experiments.run --config=configs/projection_defense.py:policy_curvature=1 --workdir=...
Smoke (≈12 s): --config=configs/projection_defense.py:smoke.   GPU/TPU: :large.
Fields: lam, gamma, eps, tail, tail_coupling (H coupling of the task direction into the Fisher tail, which no
top-d projection removes), policy_curvature (κ: how strongly the policy is curved / the subspace rotates),
n, d, t-grid, substeps, static_min_ratio, dynamic_max_ratio, scale.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=40),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=160, scale=2.0),
}


def get_config(arg=None):
    c = common.landscape_config(
        "projection_defense",
        eps=1e-4,
        policy_curvature=0.3,
        tail_coupling=0.3,
        t_min=1e-2,
        t_max=3.0,
        num_t=56,
        static_min_ratio=0.1,
        dynamic_max_ratio=1e-2,
    )
    return common.apply_config_arg(c, arg, PRESETS)
