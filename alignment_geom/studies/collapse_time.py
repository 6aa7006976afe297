"""Figure 4 — collapse time t* (the first t where Δu(θ(t)) reaches a threshold) against λγ² over the whole grid.

If Δu ≈ c₄ t⁴ with c₄ ∝ λ γ_E², then t* = (threshold / c₄)^{1/4} ∝ (λγ²)^{−1/4}: log–log slope −1/4 across the
λ × γ grid (vmapped, sharded over all devices, checkpointed in chunks so a killed run resumes). results:
exponent, exponent_ci, per-point lam, gamma, t_star, c4_exact and the Taylor prediction (threshold/a_4)^{1/4}.
"""
from __future__ import annotations

import numpy as np

from alignment_geom import harness, scaling
from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config, sweep_fields=("lams", "gammas"))
    harness.require_positive(config, "gammas")
    harness.require_positive(config, "threshold")


def run(config, workdir):
    lams = np.asarray(config.lams, np.float64)
    gammas = np.asarray(config.gammas, np.float64)
    ts, du, a, info = T.sweep_flows(config, workdir, name="collapse_time", lam=lams, gamma=gammas)
    lam_pts = np.asarray(info["lam"], np.float64)
    gam_pts = np.asarray(info["gamma_E"], np.float64)
    x = lam_pts * gam_pts ** 2
    thr = float(config.threshold)
    t_star = np.array([scaling.collapse_time(ts, du[i], thr) for i in range(du.shape[0])])
    t_pred = (thr / np.asarray(a[:, 4])) ** 0.25
    good = np.isfinite(t_star)
    if good.sum() < 2:
        raise harness.NonFiniteError("t_star", "sweep", {"t_star": t_star}, "Δu never reached the threshold")
    fit = scaling.power_law_fit(x[good], t_star[good])
    agree = abs(fit["exponent"] + 0.25) <= 0.02 and bool(good.all())
    results = {
        "threshold": thr, "lam": lam_pts, "gamma": gam_pts, "lam_gamma2": x, "t_star": t_star,
        "t_star_taylor": t_pred, "c4_exact": np.asarray(a[:, 4]), "reached": good,
        "exponent": fit["exponent"], "exponent_ci": fit["exponent_ci"], "prefactor": fit["prefactor"],
        "r2": fit["r2"], "expected_exponent": -0.25,
        "claim": T.claim("exponent of t* vs λγ²", fit["exponent"], "-0.25 ± 0.02", agree),
    }
    fig, (ax, ax2) = harness.new_figure(2, width=5.0)
    sc = ax.scatter(x[good], t_star[good], c=np.log10(lam_pts[good]), cmap="viridis", s=30, zorder=3,
                    label=r"$t^*$ measured (colour: $\log_{10}\lambda$)")
    fig.colorbar(sc, ax=ax, label=r"$\log_{10}\lambda$")
    xs = np.geomspace(x.min(), x.max(), 50)
    ax.plot(xs, fit["prefactor"] * xs ** fit["exponent"], "C1-", lw=1,
            label=rf"fit: slope {fit['exponent']:.4f} [{fit['exponent_ci'][0]:.4f}, {fit['exponent_ci'][1]:.4f}]")
    harness.reference_slope(ax, xs, fit["prefactor"] * np.sqrt(xs[0] * xs[-1]) ** -0.25 * 1.3, -0.25,
                       label="reference slope −1/4")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\lambda\gamma_E^2$")
    ax.set_ylabel(rf"collapse time $t^*$: $\Delta u(\theta(t^*))$ = {thr:g}")
    ax.set_title(rf"$t^* \propto (\lambda\gamma^2)^{{-1/4}}$ over a {len(lams)}×{len(gammas)} grid")
    ax.legend(loc="lower left")
    ax2.loglog(t_pred, t_star, "k.", ms=8)
    lim = [min(t_pred.min(), np.nanmin(t_star)) * 0.9, max(t_pred.max(), np.nanmax(t_star)) * 1.1]
    ax2.plot(lim, lim, "C0--", lw=1, label="equality")
    ax2.set_xlabel(r"Taylor prediction $(\mathrm{threshold}/a_4)^{1/4}$")
    ax2.set_ylabel(r"measured $t^*$")
    ax2.set_title("measured vs quartic-law collapse time")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    harness.save_figure(fig, workdir, "collapse_time")
    return results
