"""Figure 8 — gradient flow vs discrete GD at several step sizes η (t = η k) vs SGD and Adam.

Claim checked: the median log–log slope of Δu on the flow's t⁴ window (t ≥ 20 η) is 4 ± 0.1 for the flow and
for GD with the smallest η; SGD (minibatch noise inside the sensitive subspace) and Adam (per-coordinate
rescaling breaks the orthogonality) have small-t slopes < 3: the law is a gradient-flow law.
Run (default, ≈30 s on 2 CPU cores, float64):
    python -m experiments.run --config=configs/gd_vs_flow.py --workdir=runs/gd_vs_flow
    python -m experiments.run --config=configs/gd_vs_flow.py:lrs=0.1/0.01,batch_size=8 --workdir=...
Smoke (≈15 s): --config=configs/gd_vs_flow.py:smoke.   GPU/TPU: :large.
Fields: lrs (GD step sizes), sgd_lr, batch_size, n_examples, grad_noise (per-example gradient noise σ), adam_lr,
lam, gamma, eps, tail, n, d, t-grid, substeps, scale.
"""
from configs import common

PRESETS = {
    "smoke": dict(n=16, d=2, num_t=32, lrs=(0.1, 0.003)),
    "default": dict(),
    "large": dict(n=256, d=8, num_t=128, lrs=(0.3, 0.1, 0.03, 0.01, 0.003, 0.001), n_examples=256, batch_size=16),
}


def get_config(arg=None):
    c = common.landscape_config(
        "gd_vs_flow",
        eps=1e-4,
        t_min=3e-3,
        t_max=2.0,
        num_t=48,
        lrs=(0.1, 0.01, 0.001),
        sgd_lr=0.01,
        batch_size=4,
        n_examples=32,
        grad_noise=0.3,
        adam_lr=0.01,
    )
    return common.apply_config_arg(c, arg, PRESETS)
