"""Figure 2 — sharpness sweep: the fitted quartic coefficient c₄ = Δu/t⁴ against λ at fixed γ_E.

Corollary 6.3 with γ measured without F^{1/2} (γ_E = ‖P H g‖): Δu ≳ λ γ_E² t⁴ / 8, so at fixed γ_E the t⁴
coefficient grows linearly in the sharpness λ: log–log slope 1. Every λ is one landscape; the grid is vmapped
and sharded over all devices (resumable chunks). results: exponent, exponent_ci (95%), per-point lam, c4_fit,
c4_exact, the bounds, windows and slopes.
"""
from __future__ import annotations

from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config, sweep_fields=("lams",))


def run(config, workdir):
    return T.coefficient_sweep(config, workdir, axis="lam", values=config.lams, expected=1.0, tol=0.05,
                             name="sharpness_sweep", xlabel=r"sharpness $\lambda$ ($=\lambda_d$)",
                             bound_label=rf"$c_4$ vs $\lambda$ at fixed $\gamma_E$={config.gamma:g}")
