"""Figure 7 — projection defences: no defence vs static removal of P(θ*) vs re-projection at every step.

Three gradient flows from θ* on a landscape whose policy is curved (policy_curvature κ > 0, so the
sensitive subspace rotates with θ):
  none     θ̇ = −∇L(θ);
  static   θ̇ = −(I − P*) ∇L(θ), P* = P(θ*) (flow.projection_defense): the update never enters span P(θ*),
           yet Δu still grows like t⁴ — through the curvature of the policy (ζ_i moves with w² along the
           task direction) and the rotation of the subspace;
  dynamic  θ̇ = −(I − P(θ)) ∇L(θ), P(θ) the top-d Fisher subspace recomputed at every RHS evaluation
           (flow.dynamic_projection_defense): follows the rotation and keeps Δu orders of magnitude lower.
With tail_coupling > 0 the task direction also drives the Fisher tail (outside the top d), which no top-d
projection removes: the dynamic defence's residual Δu. results: Δu(t) for each, the slopes of the static curve in
its window, the ratios at t_end.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import harness, scaling
from alignment_geom.curvature import stable_kl_utility
from alignment_geom.dynamics import dynamic_projection_defense, projection_defense
from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config)
    harness.require_positive(config, "policy_curvature")


def run(config, workdir):
    ls, ts = T.landscape_setup(config)
    tsj = jnp.asarray(ts)
    d = int(config.d)
    velocities = {"none": None, "static": projection_defense(ls.basis),
                  "dynamic": dynamic_projection_defense(ls.logits_fn, ls.inputs, d)}

    def rec(th):
        return stable_kl_utility(ls.logits_fn, ls.params, th, ls.inputs)

    du = {}
    for name in harness.progress(list(velocities), desc="defences"):
        v = velocities[name]
        du[name] = np.asarray(jax.jit(lambda v=v: T.integrate(ls.loss_fn, ls.params, ls.batch, tsj,
                                                                 int(config.substeps), rec, velocity=v))())
        harness.check_finite(f"du[{name}]", du[name], steps=ts, partial={"ts": ts, **du})
    win = scaling.onset_window(ts, du["static"], 4.0, 0.1, indices=True)
    slopes_static = scaling.local_slope(ts, du["static"])
    slope_static = float("nan") if win is None else float(np.median(slopes_static[win[0]:win[1] + 1]))
    k = len(ts) - 1
    # compare at the end of the no-defence t^4 window (before the nonlinear regime)
    w_none = scaling.onset_window(ts, du["none"], 4.0, 0.1, indices=True)
    k = w_none[1] if w_none is not None else k
    r_static = float(du["static"][k] / du["none"][k])
    r_dynamic = float(du["dynamic"][k] / du["none"][k])
    agree = (win is not None and abs(slope_static - 4) <= 0.1 and r_static >= float(config.static_min_ratio)
             and r_dynamic <= float(config.dynamic_max_ratio))
    results = {
        "ts": ts, "du_none": du["none"], "du_static": du["static"], "du_dynamic": du["dynamic"],
        "t_compare": float(ts[k]), "ratio_static_to_none": r_static, "ratio_dynamic_to_none": r_dynamic,
        "slope_static": slope_static, "window_static": None if win is None else [float(ts[win[0]]), float(ts[win[1]])],
        "policy_curvature": float(config.policy_curvature), "a4_split": {k_: float(ls.info[k_]) for k_ in
                                                                        ("a4", "a4_JHg", "a4_curv", "a4_cross")},
        "claim": T.claim("Δu slope under the static defence (still quartic)", slope_static,
                          f"4 ± 0.1; static/none ≥ {config.static_min_ratio:g}, dynamic/none ≤ "
                          f"{config.dynamic_max_ratio:g}", agree),
    }
    fig, (ax,) = harness.new_figure(1, width=6.4, height=4.6)
    ax.loglog(ts, du["none"], "k-", lw=2, label="no defence")
    ax.loglog(ts, du["static"], "C3--", lw=2, label=r"static: remove $P(\theta^*)\nabla L$ (slope %.2f)" % slope_static)
    ax.loglog(ts, du["dynamic"], "C2-.", lw=2, label=r"dynamic: remove $P(\theta(t))\nabla L$ at every step")
    harness.reference_slope(ax, ts[ts < 0.5], du["static"][np.searchsorted(ts, 0.1)], 4.0, x0=0.1, label="slope 4")
    ax.axvline(ts[k], color="0.5", ls=":", lw=1)
    ax.text(0.03, 0.97, f"at t={ts[k]:.2g} (end of the undefended $t^4$ window):\n"
            f"static/none = {r_static:.2g}, dynamic/none = {r_dynamic:.1e}",
            transform=ax.transAxes, va="top", fontsize=8.5)
    pos = np.concatenate([du["none"], du["static"], du["dynamic"]])
    ax.set_ylim(max(pos[pos > 0].min(), du["none"].min() * 1e-8) / 3, pos.max() * 30)
    ax.set_xlabel(r"$t$")
    ax.set_ylabel(r"$\Delta u(\theta(t))$")
    ax.set_title(rf"Projection defences ($\kappa$ = {config.policy_curvature:g}: curved, rotating subspace)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    harness.save_figure(fig, workdir, "projection_defense")
    return results
