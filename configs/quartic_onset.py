"""Figure 1 — quartic onset: Δu(θ(t)) vs t on log–log axes along gradient flow from an AIC landscape.

Shows the measured t⁴ window [t_lo, t_hi] (local log–log slope 4 ± 0.1), the fitted coefficient c4_fit = Δu/t⁴
against the exact Taylor coefficient a_4 (utility_taylor), both lower bounds γ_F² t⁴/8 and λ γ_E² t⁴/8, the
ε-dominated regime at small t and the cubic-dominated regime at large t.

Run (default, ≈25 s on 2 CPU cores, float64):
    python -m experiments.run --config=configs/quartic_onset.py --workdir=runs/quartic_onset
Sweep a point / override fields:
    python -m experiments.run --config=configs/quartic_onset.py:lam=10,gamma=0.3 --workdir=runs/q_10_03
    python -m experiments.run --config=configs/quartic_onset.py --config.lam=20 --config.eps=1e-4 --workdir=...
Smoke scale (≈10 s):  --config=configs/quartic_onset.py:smoke
Fields: lam (λ, sharpness), gamma (γ_E = ‖P H g‖, coupling), eps (ε: ‖P g‖ and the Fisher tail), n, d (dims),
t_min/t_max/num_t (log-spaced t-grid; or an explicit increasing ``ts``), scale (× grid resolution, for GPU/TPU).
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=48),
    "default": dict(),
    "large": dict(n=512, d=16, num_t=256, scale=4.0),
}


def get_config(arg=None):
    c = common.landscape_config("quartic_onset")
    return common.apply_config_arg(c, arg, PRESETS)
