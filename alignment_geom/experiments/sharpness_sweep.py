"""Figure 2 — sharpness sweep: the fitted quartic coefficient c₄ = Δu/t⁴ against λ at fixed γ_E.

Corollary 6.3 with γ measured without F^{1/2} (γ_E = ‖P H g‖): Δu ≳ λ γ_E² t⁴ / 8, so at fixed γ_E the t⁴
coefficient grows linearly in the sharpness λ: log–log slope 1. Every λ is one landscape; the grid is vmapped
and sharded over all devices (resumable chunks). results: exponent, exponent_ci (95%), per-point lam, c4_fit,
c4_exact, the bounds, windows and slopes.
"""
from __future__ import annotations

import numpy as np

from alignment_geom import runner
from alignment_geom import experiments as ex

THEORY = True


def validate(config):
    ex.validate_theory(config, sweep_fields=("lams",))


def coefficient_sweep(config, workdir, *, axis: str, values, expected: float, tol: float, name: str,
                      xlabel: str, bound_label: str):
    """Shared by the sharpness and coupling sweeps: c₄ against one knob, power-law exponent and CI."""
    values = np.asarray(values, np.float64)
    ts, du, a, info = ex.sweep_flows(config, workdir, name=name, **{axis: values})
    an = ex.sweep_analysis(ts, du, a)
    c4 = an["c4_fit"]
    good = np.isfinite(c4) & (c4 > 0)
    if good.sum() < 2:
        raise runner.NonFiniteError("c4_fit", "sweep", {"c4_fit": c4, "values": values},
                                    "fewer than 2 grid points have a t^4 window")
    fit = ex.power_law_fit(values[good], c4[good])
    fit_exact = ex.power_law_fit(values, an["c4_exact"])
    agree = abs(fit["exponent"] - expected) <= tol
    results = {
        "axis": axis, axis: values, "exponent": fit["exponent"], "exponent_ci": fit["exponent_ci"],
        "prefactor": fit["prefactor"], "r2": fit["r2"], "exponent_taylor": fit_exact["exponent"],
        "expected_exponent": expected, "c4_fit": c4, "c4_exact": an["c4_exact"],
        "c4_rel_err": np.abs(c4 - an["c4_exact"]) / np.abs(an["c4_exact"]),
        "c4_bound_F": np.asarray(info["bound_F"]), "c4_bound_E": np.asarray(info["bound_E"]),
        "gamma_E": np.asarray(info["gamma_E"]), "gamma_F": np.asarray(info["gamma_F"]),
        "lam": np.asarray(info["lam"]), "window": an["window"], "slope": an["slope"],
        "claim": ex.claim(f"exponent of c4 vs {axis}", fit["exponent"], f"{expected:g} ± {tol:g}", agree),
    }
    fig, (ax, ax2) = ex.new_figure(2, width=5.0)
    ax.loglog(values, an["c4_exact"], "o", mfc="none", color="C0", ms=8, label=r"$a_4$ (exact Taylor)")
    ax.loglog(values[good], c4[good], "k.", ms=9, label=r"$c_4$ fitted from $\Delta u(t)$")
    ax.loglog(values, results["c4_bound_F"], color="C2", ls=":", label=r"$\gamma_F^2/8$")
    ax.loglog(values, results["c4_bound_E"], color="C3", ls="-.", label=r"$\lambda\gamma_E^2/8$")
    xs = np.geomspace(values.min(), values.max(), 50)
    ax.loglog(xs, fit["prefactor"] * xs ** fit["exponent"], color="C1", lw=1,
              label=rf"fit: slope {fit['exponent']:.3f} [{fit['exponent_ci'][0]:.3f}, {fit['exponent_ci'][1]:.3f}]")
    ex.reference_slope(ax, xs, fit["prefactor"] * np.sqrt(xs[0] * xs[-1]) ** expected * 0.5, expected,
                       label=f"reference slope {expected:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"quartic coefficient $c_4 = \Delta u / t^4$")
    ax.set_title(bound_label)
    ax.legend(loc="upper left")
    sym = {"lam": r"$\lambda$", "gamma": r"$\gamma_E$"}.get(axis, axis)
    for i in range(du.shape[0]):
        ax2.loglog(ts, du[i], lw=1, color=f"C{i % 10}", label=f"{sym}={values[i]:.3g}")
    ex.reference_slope(ax2, ts[(ts > 0.01) & (ts < 0.5)], float(np.interp(0.1, ts, du[-1])) * 4, 4.0, x0=0.1,
                       label="slope 4")
    ax2.legend(loc="lower right", fontsize=7, ncol=2)
    ax2.set_xlabel(r"$t$")
    ax2.set_ylabel(r"$\Delta u(\theta(t))$")
    ax2.set_title(f"Δu(t) for each of the {len(values)} grid points")
    ax2.set_ylim(max(du.min(), 1e-30), du.max() * 10)
    fig.tight_layout()
    runner.save_figure(fig, workdir, name)
    return results


def run(config, workdir):
    return coefficient_sweep(config, workdir, axis="lam", values=config.lams, expected=1.0, tol=0.05,
                             name="sharpness_sweep", xlabel=r"sharpness $\lambda$ ($=\lambda_d$)",
                             bound_label=rf"$c_4$ vs $\lambda$ at fixed $\gamma_E$={config.gamma:g}")
