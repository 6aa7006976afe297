"""Figure 6 — the orthogonality illusion: the first-order prediction of Δu against the true Δu.

First-order reasoning moves θ along −g: Δu_lin(t) = Δu(θ* − t g) ≈ ½ t² gᵀF g = O(ε² t²) (g is almost
orthogonal to the sensitive subspace). The true Δu(θ(t)) along gradient flow grows like t⁴ and overtakes it by
orders of magnitude inside the quartic window. Right panel: the projection ratio ‖P δ‖/‖δ‖ (δ = θ(t) − θ*),
which starts at ‖Pg‖/‖g‖ = ε/‖g‖ and grows like γ_E t / (2‖g‖): the path bends into the subspace.
"""
from __future__ import annotations

import jax
import numpy as np

from alignment_geom import harness, scaling
from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config)
    harness.require_positive(config, "min_ratio")


def run(config, workdir):
    ls, ts, _, rec = T.landscape_record(config, dynamic=False)
    harness.check_finite("du", rec["du"], steps=ts, partial={"ts": ts, "du": rec["du"]})
    g = np.asarray(jax.grad(ls.loss_fn)(ls.params, ls.batch)["theta"])
    gnorm = float(np.linalg.norm(g))
    win = scaling.onset_window(ts, rec["du"], 4.0, 0.1, indices=True)
    if win is None:
        raise harness.NonFiniteError("window", "-", {"ts": ts, "du": rec["du"]}, "no t^4 window in Δu")
    i0, i1 = win
    ratio = rec["du"] / rec["du_first_order"]
    r_hi = float(ratio[i1])
    r_med = float(np.median(ratio[i0:i1 + 1]))
    eps, gam = float(ls.info["eps"]), float(ls.info["gamma_E"])
    agree = r_hi >= float(config.min_ratio) and ratio[i0] > 1
    results = {
        "ts": ts, "du": rec["du"], "du_first_order": rec["du_first_order"], "proj_ratio": rec["proj_ratio"],
        "ratio": ratio, "window": [float(ts[i0]), float(ts[i1])], "ratio_at_window_end": r_hi,
        "ratio_median_in_window": r_med, "ratio_at_window_start": float(ratio[i0]),
        "orders_of_magnitude_at_window_end": float(np.log10(r_hi)),
        "proj_ratio_t0": eps / gnorm, "g_norm": gnorm, "eps": eps, "gamma_E": gam,
        "claim": T.claim("true Δu / first-order Δu at the window's end", r_hi, f">= {config.min_ratio:g}", agree),
    }
    fig, (ax, ax2) = harness.new_figure(2, width=5.2)
    ax.loglog(ts, rec["du"], "k-", lw=2, label=r"true $\Delta u(\theta(t))$ (gradient flow)")
    ax.loglog(ts, rec["du_first_order"], "C3--", lw=1.5, label=r"first order $\Delta u(\theta^* - t g)$")
    gFg = 2 * rec["du_first_order"][0] / ts[0] ** 2
    ax.loglog(ts, 0.5 * gFg * ts ** 2, "C3:", lw=1, label=r"$\frac{1}{2}t^2 g^\top F g = O(\varepsilon^2 t^2)$")
    ax.axvspan(ts[i0], ts[i1], color="C1", alpha=0.15, lw=0, label=r"$t^4$ window")
    ax.set_ylim(max(min(rec["du"].min(), rec["du_first_order"].min()), 1e-30) / 3, rec["du"].max() * 10)
    ax.set_xlabel(r"$t$")
    ax.set_ylabel(r"$\Delta u$")
    ax.set_title(rf"Orthogonality illusion: true/first-order = {r_hi:.3g} at $t$={ts[i1]:.2g}")
    ax.legend(loc="upper left")
    ax2.loglog(ts, rec["proj_ratio"], "k-", lw=2, label=r"$\|P\delta\|/\|\delta\|$, $\delta=\theta(t)-\theta^*$")
    ax2.axhline(eps / gnorm, color="C0", ls=":", lw=1, label=r"$\|Pg\|/\|g\| = \varepsilon/\|g\|$")
    ax2.loglog(ts, gam * ts / (2 * gnorm), "C2--", lw=1, label=r"$\gamma_E t/(2\|g\|)$")
    ax2.axvspan(ts[i0], ts[i1], color="C1", alpha=0.15, lw=0)
    ax2.set_ylim(eps / gnorm / 3, 1.5)
    ax2.set_xlabel(r"$t$")
    ax2.set_ylabel("projection ratio")
    ax2.set_title("the path bends into the sensitive subspace")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    harness.save_figure(fig, workdir, "orthogonality_illusion")
    return results
