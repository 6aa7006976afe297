"""Figure 3 — coupling sweep: the fitted quartic coefficient c₄ against the coupling γ (= γ_E) at fixed λ.

Δu ≳ γ_F² t⁴/8 with γ_F ∝ γ_E at fixed Fisher: log–log slope 2. Same machinery as the sharpness sweep
(vmapped, sharded, resumable); results: exponent, exponent_ci, per-point gamma, c4_fit, c4_exact, bounds.
"""
from __future__ import annotations

from alignment_geom import harness
from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config, sweep_fields=("gammas",))

    harness.require_positive(config, "gammas")


def run(config, workdir):
    return T.coefficient_sweep(config, workdir, axis="gamma", values=config.gammas, expected=2.0, tol=0.05,
                             name="coupling_sweep", xlabel=r"coupling $\gamma_E = \|P H g\|$",
                             bound_label=rf"$c_4$ vs $\gamma$ at fixed $\lambda$={config.lam:g}")
