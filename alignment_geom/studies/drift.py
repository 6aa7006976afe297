"""Figure 5 — curvature-driven drift (Theorem 6.2): ‖F^{1/2} P (θ(t) − θ*)‖ against (γ_F/2) t² − ε_F t.

Along gradient flow the displacement inside the sensitive subspace grows quadratically although the gradient
is (almost) orthogonal to it: ‖F^{1/2} P (θ(t) − θ*)‖ ≥ (γ_F/2) t² − ‖F^{1/2} P g‖ t − C t³. We measure the
drift on a log t-grid (F = F(θ*), P onto its top-d eigenvectors), its local log–log slope (2 once the γ term
dominates, 1 in the ε-dominated start) and the ratio drift / ((γ_F/2) t² − ε_F t) in the quartic window of Δu.
"""
from __future__ import annotations

import jax
import numpy as np

from alignment_geom import harness, scaling
from alignment_geom.studies import _theory as T

THEORY = True


validate = T.validate_theory


def run(config, workdir):
    ls, ts, out = T.landscape_trajectory(config)
    harness.check_finite("drift_F", out["drift_F"], steps=ts, partial={"ts": ts, "drift_F": out["drift_F"]})
    aic = jax.tree_util.tree_map(lambda x: float(np.max(np.asarray(x))), T.aic_numbers(ls))
    gF, eF = aic["gamma_F"], aic["eps_F"]
    bound = 0.5 * gF * ts ** 2 - eF * ts
    lead = np.sqrt((0.5 * gF * ts ** 2) ** 2 + (eF * ts) ** 2)   # exact leading order when Pg ⟂_F PHg
    win = scaling.onset_window(ts, out["du"], 4.0, 0.1, indices=True)
    slopes = scaling.local_slope(ts, out["drift_F"])
    if win is None:
        raise harness.NonFiniteError("window", "-", {"ts": ts, "drift_F": out["drift_F"]}, "no t^4 window in Δu")
    i0, i1 = win
    ratio = out["drift_F"][i0:i1 + 1] / bound[i0:i1 + 1]
    slope = float(np.median(slopes[i0:i1 + 1]))
    min_ratio = float(ratio.min())
    agree = abs(slope - 2) <= 0.05 and min_ratio >= 0.98
    results = {
        "ts": ts, "drift_F": out["drift_F"], "bound": bound, "leading_order": lead, "local_slope": slopes,
        "window": [float(ts[i0]), float(ts[i1])], "slope": slope, "min_ratio_in_window": min_ratio,
        "max_ratio_in_window": float(ratio.max()), "gamma_F": gF, "eps_F": eF, "gamma_E": aic["gamma_E"],
        "lam": aic["lam"], "eps": aic["eps"], "t_cross": 2 * eF / gF,
        "claim": T.claim("drift log-log slope in window (min drift/bound ≥ 0.98)", slope, "2 ± 0.05", agree),
    }
    fig, (ax, ax2) = harness.new_figure(2, width=5.2)
    ax.loglog(ts, out["drift_F"], "k-", lw=2, label=r"$\|F^{1/2}P(\theta(t)-\theta^*)\|$ (flow)")
    pos = bound > 0
    ax.loglog(ts[pos], bound[pos], "C3--", lw=1.3, label=r"$(\gamma_F/2)t^2 - \|F^{1/2}Pg\|\,t$ (Thm 6.2)")
    ax.loglog(ts, 0.5 * gF * ts ** 2, "C2:", lw=1.3, label=r"$(\gamma_F/2)t^2$")
    ax.loglog(ts, eF * ts, "C0:", lw=1.3, label=r"$\|F^{1/2}Pg\|\,t$ ($\varepsilon$ term)")
    ax.axvspan(ts[i0], ts[i1], color="C1", alpha=0.15, lw=0, label=r"$t^4$ window of $\Delta u$")
    ax.set_ylim(out["drift_F"].min() / 3, out["drift_F"].max() * 3)
    ax.set_xlabel(r"$t$")
    ax.set_ylabel(r"drift $\|F^{1/2}P(\theta(t)-\theta^*)\|$")
    ax.set_title(rf"Curvature-driven drift: $\gamma_F$={gF:.3g}, $\varepsilon_F$={eF:.2g}")
    ax.legend(loc="upper left")
    ax2.semilogx(ts, slopes, "k-", lw=1.5, label="local slope of the drift")
    ax2.axhline(2, color="C2", ls="--", lw=1, label=r"slope 2 ($\gamma t^2$)")
    ax2.axhline(1, color="C0", ls=":", lw=1, label=r"slope 1 ($\varepsilon t$)")
    ax2.axvline(2 * eF / gF, color="0.4", ls=":", lw=1, label=r"$2\varepsilon_F/\gamma_F$")
    ax2.axvspan(ts[i0], ts[i1], color="C1", alpha=0.15, lw=0)
    ax2.set_ylim(0, 3.5)
    ax2.set_xlabel(r"$t$")
    ax2.set_ylabel("local log-log slope")
    ax2.set_title(rf"slope {slope:.3f} in window; drift/bound $\geq$ {min_ratio:.3f}")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    harness.save_figure(fig, workdir, "drift")
    return results
