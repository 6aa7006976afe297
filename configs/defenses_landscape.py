"""Defences on the landscapes — onset exponent, collapse time t* (ratio to undefended) and task loss at t* for each
defence (optax transformations, gradient descent on the clock t = η k) over a λ × γ grid.

Claim checked on the default landscape (lam, gamma): dynamic projection delays t* by ≥ dynamic_min_ratio (10×),
static projection by < static_max_ratio (2×), and the Fisher penalty has a lower Δu than no defence at the task
loss the undefended run has at its t*.
Run (default, ≈30 s on 2 CPU cores, 11–18 s of CPU time, mostly compilation; float64; the grid is vmapped and sharded
over all devices, checkpointed per chunk, so a killed run resumes when the same command is run again):
    python -m experiments.run --config=configs/defenses_landscape.py --workdir=runs/defenses_landscape
    python -m experiments.run --config=configs/defenses_landscape.py:every=20,fisher_strength=30 --workdir=...
Smoke (≈30 s, 17 s of CPU time: as much compilation, less descent): --config=configs/defenses_landscape.py:smoke.
GPU/TPU: :large.
Fields: defenses (names of the registry dynamics.defenses.DEFENSES; none first), lams, gammas (the grid axes), lam,
gamma (the default landscape), policy_curvature (κ: the rotation of the sensitive subspace that a static
projection cannot see), tail_coupling, lr (η of gradient descent), every (K, the refresh period of the dynamic
projection, in steps), estimator (its Fisher estimator on the grid: factor | lanczos | randomized), cost_estimators
(refreshes timed on the default landscape, cold and warm-started: factor | lanczos | randomized | tracking),
cost_repeats, fisher_strength, utility_strength (λ_reg), threshold (the Δu level defining t*), dynamic_min_ratio,
static_max_ratio (the claim's bounds), t-grid, substeps (RK4 steps per interval of the comparison flows),
chunk_size.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=40, lams=(10.0,), gammas=(0.15, 0.6), lr=4e-3, every=5,
                  cost_estimators=("factor", "tracking"), cost_repeats=3),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=160, lams=(3.0, 5.0, 10.0, 20.0, 30.0), gammas=(0.1, 0.15, 0.3, 0.45, 0.6),
                  lr=1e-3, every=10, chunk_size=32, scale=2.0),
}


def get_config(arg=None):
    c = common.landscape_config(
        "defenses_landscape",
        defenses=("none", "static_projection", "dynamic_projection", "fisher_penalty", "utility_penalty",
                  "coupling_suppression"),
        lams=(3.0, 10.0, 30.0),
        gammas=(0.15, 0.3, 0.6),
        policy_curvature=0.3,
        tail_coupling=0.0,
        t_min=4e-3,
        t_max=4.0,
        num_t=64,
        lr=2e-3,
        every=10,
        estimator="factor",
        cost_estimators=("factor", "lanczos", "tracking"),
        cost_repeats=20,
        fisher_strength=10.0,
        utility_strength=10.0,
        threshold=1e-4,
        dynamic_min_ratio=10.0,
        static_max_ratio=2.0,
        substeps=48,
        chunk_size=16,
    )
    return common.apply_config_arg(c, arg, PRESETS)
