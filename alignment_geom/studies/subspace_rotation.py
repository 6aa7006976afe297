"""Figure 9 — rotation of the alignment-sensitive subspace along gradient flow.

The top-d Fisher subspace M(θ) moves with θ (paper §2: the proofs control it with Davis–Kahan under the Fisher's
local Lipschitz assumption). On a landscape with a curved policy (policy_curvature κ: ζ_i = a_i(s_i + ½ κ_i w²))
the rows of J(θ) tilt towards the task direction w as the flow moves along it, so M(θ(t)) rotates by an angle
≈ arctan(κ |w(t)|) ∝ t at small t. We measure the principal angles between M(θ*) and M(θ(t)) (flow.record_path:
exact top-d subspace at every t), their small-t log–log slope, the dynamic projection ratio ‖P_t δ‖/‖δ‖, and
cross-check the angles from flow.record_path (top-d subspace by a thin SVD of the Fisher factor, scalable)
against a dense eigendecomposition of F(θ(t)) (exact, n small; the figure uses the dense ones), and
compare the largest angle with the Davis–Kahan bound sin Θ ≤ 2‖F(θ(t)) − F(θ*)‖₂ / (λ_d − λ_{d+1}) (Yu–Wang–
Samworth form; F dense, n small).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import harness, scaling
from alignment_geom.curvature import linearized_fisher_vp
from alignment_geom.linalg import principal_angles
from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config)
    harness.require_positive(config, "policy_curvature")


def _dense_fisher(ls, th):
    n = th["theta"].shape[0]
    mv = linearized_fisher_vp(ls.logits_fn, th, ls.inputs)
    eye = jnp.eye(n, dtype=th["theta"].dtype)
    return jax.vmap(lambda e: mv({"theta": e})["theta"])(eye)


def run(config, workdir):
    ls, ts, path, rec = T.landscape_record(config, dynamic=True)
    angles_flow = np.asarray(rec["angles"])            # (T, d) ascending, flow.top_fisher_subspace at each t
    F0 = _dense_fisher(ls, ls.params)
    ev0 = np.linalg.eigvalsh(np.asarray(F0))[::-1]
    d = int(config.d)
    gap = float(ev0[d - 1] - ev0[d])

    def dense(th):
        # exact reference for small n: dense F(θ(t)), its top-d eigenvectors, angles to M(θ*), ‖F(θ) − F(θ*)‖₂
        F = _dense_fisher(ls, {"theta": th})
        _, V = jnp.linalg.eigh(F)
        top = V[:, ::-1][:, :d].T
        delta = th - ls.params["theta"]
        ratio = jnp.linalg.norm(top @ delta) / jnp.linalg.norm(delta)
        return principal_angles({"theta": top}, ls.basis), jnp.linalg.norm(F - F0, 2), ratio

    angles, dF, ratio_dyn = jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(dense))(path["theta"]))
    harness.check_finite("angles", angles, steps=ts, partial={"ts": ts, "angles": angles})
    angle_check = float(np.max(np.abs(angles - angles_flow)))
    dk = np.minimum(2 * dF / gap, 1.0)
    theta_max = angles[:, -1]
    # small-t slope: the first third of the grid
    s = scaling.local_slope(ts, theta_max)
    m = max(3, len(ts) // 3)
    slope = float(np.median(s[:m]))
    viol = int(np.sum(np.sin(theta_max) > dk * (1 + 1e-9)))
    agree = abs(slope - 1) <= 0.05 and viol == 0 and angle_check <= 1e-8
    results = {
        "ts": ts, "angles": angles, "theta_max": theta_max, "davis_kahan": dk, "fisher_perturbation": dF,
        "eigengap": gap, "slope_small_t": slope, "dk_violations": viol, "angles_record_path": angles_flow,
        "max_angle_diff_record_path_vs_dense": angle_check,
        "proj_ratio": rec["proj_ratio"], "proj_ratio_dynamic": ratio_dyn,
        "proj_ratio_dynamic_record_path": rec["proj_ratio_dynamic"], "du": rec["du"],
        "policy_curvature": float(config.policy_curvature),
        "claim": T.claim("small-t log-log slope of the largest principal angle (≤ Davis–Kahan; record_path = dense)",
                         slope, "1 ± 0.05", agree),
    }
    fig, (ax, ax2) = harness.new_figure(2, width=5.2)
    ax.loglog(ts, theta_max, "k-", lw=2, label=r"largest principal angle $\theta_{\max}$")
    others = angles[:, :-1]
    if others.size and others.max() > 1e-10:
        for j in range(others.shape[1]):
            ax.loglog(ts, np.maximum(others[:, j], 1e-18), lw=1, color=f"C{j}",
                      label="other principal angles" if j == 0 else None)
    else:
        ax.text(0.03, 0.97, f"the other {angles.shape[1] - 1} principal angles are < 1e-10:\none direction tilts",
                transform=ax.transAxes, va="top", fontsize=8.5)
    ax.loglog(ts, np.arcsin(dk), "C3--", lw=1.3, label=r"Davis–Kahan: $\arcsin(2\|F(\theta)-F(\theta^*)\|/\delta)$")
    harness.reference_slope(ax, ts[: len(ts) // 2], theta_max[len(ts) // 4] * 0.5, 1.0, x0=ts[len(ts) // 4],
                       label="slope 1")
    ax.set_ylim(max(theta_max[theta_max > 0].min() / 10, 1e-8), np.pi)
    ax.set_xlabel(r"$t$")
    ax.set_ylabel(r"principal angles between $M(\theta^*)$ and $M(\theta(t))$ (rad)")
    ax.set_title(rf"Subspace rotation ($\kappa$={config.policy_curvature:g}): small-$t$ slope {slope:.3f}")
    ax.legend(loc="lower right")
    ax2.loglog(ts, rec["proj_ratio"], "k-", lw=2, label=r"$\|P(\theta^*)\delta\|/\|\delta\|$ (static subspace)")
    ax2.loglog(ts, ratio_dyn, "C2--", lw=2, label=r"$\|P(\theta(t))\delta\|/\|\delta\|$ (moving subspace)")
    ax2.set_ylim(min(rec["proj_ratio"].min(), ratio_dyn.min()) / 3, 1.5)
    ax2.set_xlabel(r"$t$")
    ax2.set_ylabel("projection ratio")
    ax2.set_title(r"displacement inside the static vs the moving subspace")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    harness.save_figure(fig, workdir, "subspace_rotation")
    return results
