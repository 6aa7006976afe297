"""Beyond the paper — defences as optimiser transformations, measured against the onset law on the landscapes.

Every defence of :mod:`alignment_geom.dynamics.defenses` is run as gradient descent through
``optax.chain(defence, optax.sgd(η))`` from θ* (t = η k), on a landscape with a curved policy (κ =
policy_curvature > 0: the top-d Fisher subspace rotates with θ), over a λ × γ grid (vmapped, sharded over all
devices, checkpointed per chunk by harness.checkpointed_map). For each defence and grid point: Δu(t), the task loss
L(t), the collapse time t* (Δu(θ(t*)) = threshold), its ratio to the undefended t*, the task loss at t*, the onset
exponent (the least-squares log–log slope of Δu over the undefended run's t⁴ window), and Δu at the task loss the
undefended run reaches at its t* (the trade-off at equal task progress). On the default landscape the stateless
defences are also integrated as gradient flows (``flow_velocity``), and the refresh of the dynamic projection is
timed for each estimator, cold and warm-started.

The onset law re-derived per defence (ε = ‖Pg‖, τ = Kη; the landscape's heads ζ_i = a_i(s_i + ½ κ_i w²),
A_i = (H g)_i + κ_i G², a₄ = ⅛ Σ_i λ_i A_i², a4_curv = ⅛ Σ_i λ_i κ_i² G⁴, landscapes.py):
  none                  Δu ≈ a₄ t⁴ (Corollary 6.3): exponent 4.
  static_projection     P δ ≡ 0 removes the (H g)_i part of A_i, but the policy's curvature moves the logits
                        through the task coordinate alone: Δu ≈ (a4_curv + a4_tail) t⁴, exponent 4 and
                        t*/t*_none = (a₄ / a4_curv)^{1/4} (= √((γ + κG²)/(κG²)) with κ = policy_curvature, as
                        the landscapes' coupling and curvature directions are parallel: < 2 while γ < 3 κ G²).
  dynamic_projection    the update is orthogonal to the rows ∇ζ_i(θ_r) of the last refresh, so
                        ζ̇_i = a_i κ_i (w − w_r) ẇ and each interval of length τ adds a_i κ_i G² τ²/2 to ζ_i: the
                        logits drift linearly, ζ_i ≈ a_i κ_i G² τ t/2, and Δu ≈ τ² a4_curv t² (+ a4_tail t⁴):
                        exponent 2, t* = (threshold / (τ² a4_curv))^{1/2} ∝ 1/τ. The flow limit τ → 0 keeps ζ
                        constant (Δu = 0 without a Fisher tail).
  fisher_penalty        quartic for t ≪ 1/(λ_reg λ_d); beyond, the Hg-driven sensitive coordinates settle at
                        ⟨u_j, δ⟩ ≈ (Hg)_j t/(λ_reg λ_j) (a t² part ∝ 1/λ_reg²) while the curvature part, which F(θ*)
                        does not see, keeps a4_curv t⁴: a mixed slope between 2 and 4, and at large t the static
                        projection's t*.
  utility_penalty       ∇Δu(θ) acts on the logits themselves (curvature included): they settle at a drift
                        linear in t, Δu ∝ t²/λ_reg² beyond 1/(λ_reg λ_d): exponent → 2.
  coupling_suppression  P δ(t) = −t P g + O(t³) (dynamics/defenses/coupling.py): the γ part is removed, the ε part
                        kept: Δu ≈ ½ ε_F² t² + a4_curv t⁴, i.e. exponent 2 in the ε window, then 4 (as static).
Measured (default preset: λ = 10, γ_E = 0.3, κ = 0.3, η = 0.002, K = 10, threshold 10⁻⁴): slopes none 3.99,
static 3.97 (t* ×1.41, the law's √2), coupling suppression 3.96 (×1.41), Fisher penalty 3.79 (×1.35), ∇Δu penalty
2.09 (×10.3), dynamic projection 2.02 (×21.8). The fitted t⁴ coefficient under the static projection is a4_curv to
0.1%; the dynamic projection's t² coefficient is 0.89 τ² a4_curv (the task gradient G + h_w w shrinks along the path
and the logits drift in a sawtooth between refreshes). Beyond t ≈ 0.5 the dynamic projection's Δu grows slower than
t²: the subspace has rotated into the task direction (∇ζ_i ∋ κ_i w e_w), the projection removes most of the task
gradient and the task nearly stops (L(4) = −1.43, against −2.75 under the static projection and −5.5 undefended;
the ∇Δu penalty stops at the same −1.43: both hold the logits), so its t* (2.44) comes later than the t² law's
(1.23).
Run: ``python -m experiments.run --config=configs/defenses_landscape.py --workdir=runs/defenses_landscape`` (the
config's docstring gives the fields and the measured runtime).
results: ``defenses`` {name: {exponent, tstar, tstar_ratio, task_loss_at_tstar, task_progress_at_tstar,
du_at_equal_task_loss, tstar_flow, law (the re-derived p, c of Δu ≈ c t^p and the fitted c), grid: per-point t*,
ratios, exponents}}, the refresh costs, the curves of the default landscape.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import matplotlib.ticker
import numpy as np
import optax

from alignment_geom import harness, scaling
from alignment_geom.aic import SensitiveSubspace
from alignment_geom.curvature import stable_kl_utility
from alignment_geom.dynamics import discrete_path
from alignment_geom.dynamics.defenses import (
    DEFENSES,
    ESTIMATORS,
    estimate_subspace,
    fisher_estimator,
    flow_velocity,
    make_defense,
)
from alignment_geom.landscapes import landscape_grid, landscape_logits, landscape_loss, make_landscape
from alignment_geom.linalg import principal_angles
from alignment_geom.problem import Problem
from alignment_geom.studies import _theory as T
from alignment_geom.tree import tree_random_normal

THEORY = True
ARTIFACTS = ("defenses_landscape.png",)
COST_ESTIMATORS = ("factor", "lanczos", "randomized", "tracking")

LABELS = {"none": "no defence", "static_projection": r"static: $(I-P(\theta^*))\,g$",
          "dynamic_projection": r"dynamic: $(I-P(\theta_r))\,g$, every $K$", "fisher_penalty": r"Fisher penalty",
          "utility_penalty": r"$\nabla\Delta u$ penalty", "coupling_suppression": r"coupling: $g - PH\delta$"}
MARKERS = {"static_projection": "s", "dynamic_projection": "o", "fisher_penalty": "D", "utility_penalty": "v",
           "coupling_suppression": "x"}
STYLES = {"none": ("k", "-"), "static_projection": ("C3", "--"), "dynamic_projection": ("C2", "-"),
          "fisher_penalty": ("C0", "-."), "utility_penalty": ("C4", "-"), "coupling_suppression": ("C1", ":")}


def validate(config):
    T.validate_theory(config, sweep_fields=("lams", "gammas"))
    harness.require_positive(config, "gammas")
    for f in ("lr", "threshold", "policy_curvature", "dynamic_min_ratio", "static_max_ratio"):
        harness.require_positive(config, f)
    for f in ("fisher_strength", "utility_strength"):
        harness.require_positive(config, f, strict=False)
    harness.require_int(config, "every", lo=1)
    harness.require_int(config, "cost_repeats", lo=1)
    names = tuple(config.defenses)
    if not names or names[0] != "none" or len(set(names)) != len(names):
        raise harness.ConfigError("defenses", names, "distinct registered defences, starting with 'none'")
    for n in names:
        if n not in DEFENSES:
            raise harness.ConfigError("defenses", names, "names among " + ", ".join(DEFENSES))
    for f in ("estimator",):
        harness.require_choice(config, f, tuple(k for k in ESTIMATORS if k in ("factor", "lanczos", "randomized")))
    for e in config.cost_estimators:
        if e not in COST_ESTIMATORS:
            raise harness.ConfigError("cost_estimators", tuple(config.cost_estimators),
                                      "names among " + ", ".join(COST_ESTIMATORS))
    if config.lr * 20 >= config.t_max:
        raise harness.ConfigError("lr", config.lr, f"a step size with 20 η < t_max={config.t_max}")


def options_of(config, name: str) -> dict:
    """The registry options of defence ``name`` from the config fields."""
    return {"dynamic_projection": dict(every=int(config.every), estimator=str(config.estimator)),
            "fisher_penalty": dict(strength=float(config.fisher_strength)),
            "utility_penalty": dict(strength=float(config.utility_strength))}.get(name, {})


def step_grid(config) -> np.ndarray:
    """The recording times: the t-grid rounded to whole steps of η (distinct, ≥ 1 step)."""
    ks = np.unique(np.rint(T.t_grid(config) / config.lr).astype(np.int64))
    return ks[ks >= 1] * float(config.lr)


def _problem(p) -> Problem:
    return Problem(p["params"], loss_fn=landscape_loss, batch=p["batch"], logits_fn=landscape_logits,
                   inputs=p["inputs"], name="landscape")


def _subspace(p) -> SensitiveSubspace:
    d = jax.tree_util.tree_leaves(p["basis"])[0].shape[0]
    lam = p["eigvals"][:d]
    return SensitiveSubspace(p["basis"], lam, jnp.zeros_like(lam))


def _record(p, path):
    du = jax.vmap(lambda th: stable_kl_utility(landscape_logits, p["params"], th, p["inputs"]))(path)
    loss = jax.vmap(lambda th: landscape_loss(th, p["batch"]))(path)
    return du, loss


def _descent_point(p, *, specs, lr, ts, k_mid):
    """One landscape -> Δu and L along gradient descent through each defence, {"du", "loss"} of shape (D, T), and
    "theta_mid", θ at ts[k_mid] of the first defence's run (where the refresh cost is measured)."""
    pb, sub = _problem(p), _subspace(p)
    dus, losses, mid = [], [], None
    for name, opts in specs:
        tx = optax.chain(make_defense(name, pb, sub, **dict(opts)), optax.sgd(lr))
        path, _ = discrete_path(landscape_loss, pb.params, pb.batch, ts, lr=lr, optimizer=tx)
        du, loss = _record(p, path)
        dus.append(du)
        losses.append(loss)
        mid = jax.tree_util.tree_map(lambda x: x[k_mid], path) if mid is None else mid
    return {"du": jnp.stack(dus), "loss": jnp.stack(losses), "theta_mid": mid}


def _arrays(ls) -> dict:
    return {"params": ls.params, "batch": ls.batch, "inputs": ls.inputs, "basis": ls.basis,
            "eigvals": ls.fisher_eigvals}


def analyse(ts, du, loss, loss0, thr, window) -> dict:
    """t*, task loss / progress at t*, exponent over ``window`` (indices) and the local slope at t* of a curve."""
    ts = np.asarray(ts, np.float64)
    tstar = scaling.collapse_time(ts, du, thr)
    i0, i1 = window
    sel = slice(i0, i1 + 1)
    ok = (du[sel] > 0) & np.isfinite(du[sel])
    exponent = float(np.polyfit(np.log(ts[sel][ok]), np.log(du[sel][ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    slopes = scaling.local_slope(ts, du)
    if np.isfinite(tstar):
        lt = float(np.interp(np.log(tstar), np.log(ts), loss))
        s_star = float(np.interp(np.log(tstar), np.log(ts), slopes))
    else:
        lt, s_star = float("nan"), float("nan")
    return {"tstar": tstar, "task_loss_at_tstar": lt, "task_progress_at_tstar": loss0 - lt, "exponent": exponent,
            "exponent_at_tstar": s_star}


def du_at_loss(du, loss, target) -> float:
    """Δu where a run's task loss (decreasing along the run) first reaches ``target`` (log-interpolated); NaN if
    it never does."""
    below = np.nonzero(loss <= target)[0]
    if below.size == 0 or below[0] == 0:
        return float("nan")
    i = int(below[0])
    w = (target - loss[i - 1]) / (loss[i] - loss[i - 1])
    return float(np.exp((1 - w) * np.log(du[i - 1]) + w * np.log(du[i])))


def _window(ts, du_none, lr):
    """The undefended t⁴ window (|slope − 4| ≤ 0.1, t ≥ 20 η), as indices."""
    ts = np.asarray(ts)
    du = np.where(ts >= 20 * lr, du_none, np.nan)
    win = scaling.onset_window(ts, du, 4.0, 0.1, indices=True)
    if win is None:
        raise harness.NonFiniteError("window", "-", {"ts": ts, "du_none": du_none}, "no t^4 window without defence")
    return win


def refresh_costs(config, ls, t, theta) -> dict:
    """Matvecs, time per refresh (median of ``cost_repeats``) and accuracy (largest principal angle to the exact
    subspace) of one dynamic-projection refresh on the default landscape at ``theta`` (undefended descent at time
    ``t``), for each of ``config.cost_estimators`` (factor: exact SVD of the Fisher factor; lanczos, randomized: to
    a relative residual 1e-10; tracking: one randomized block iteration of d + 2 products): cold (random start)
    and warm-started from the exact subspace one refresh period earlier; and the time of one gradient for scale."""
    d, every = int(config.d), int(config.every)
    # the subspace one refresh period (K steps of η) earlier: θ moves by ≈ K η g per period
    prev = jax.tree_util.tree_map(lambda a, b: a - every * float(config.lr) * b, theta,
                                  jax.grad(landscape_loss)(theta, ls.batch))
    factor = fisher_estimator("factor")
    exact_fn = jax.jit(lambda p: estimate_subspace(ls.problem.replace(params=p), d, factor, jax.random.PRNGKey(0))[0])
    exact, warm = exact_fn(theta), exact_fn(prev)
    cold = tree_random_normal(jax.random.PRNGKey(3), warm)
    grad = jax.jit(jax.grad(landscape_loss))
    out = {"t": float(t), "gradient_seconds": _median_time(lambda: grad(theta, ls.batch), config.cost_repeats)}
    for name in config.cost_estimators:
        # "tracking": one block iteration of d + 2 Fisher products from the start block (then Rayleigh–Ritz)
        est = fisher_estimator("randomized" if name == "tracking" else name, tol=None if name == "tracking" else 1e-10)
        kw = dict(max_iters=1, oversample=2) if name == "tracking" else {}
        f = jax.jit(lambda p, init, est=est, kw=kw: estimate_subspace(ls.problem.replace(params=p), d, est,
                                                                      jax.random.PRNGKey(2), init=init, **kw))
        for mode, init in (("cold", cold), ("warm", warm)):
            if name == "factor" and mode == "warm":
                continue
            basis, _, mv = f(theta, init)
            sec = _median_time(lambda f=f, i=init: f(theta, i), config.cost_repeats)
            out[f"{name}_{mode}"] = {"matvecs": int(mv), "seconds": sec,
                                     "per_gradient": sec / max(out["gradient_seconds"], 1e-12),
                                     "max_angle_to_exact": float(jnp.max(_angles(basis, exact)))}
    return out


_angles = jax.jit(principal_angles)


def _median_time(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def onset_laws(info, tau) -> dict:
    """name -> (p, c): the re-derived leading law Δu ≈ c t^p in the onset window (module docstring), for the
    defences where it is closed-form: none a₄ t⁴; static projection and coupling suppression (a4_curv + a4_tail) t⁴
    (coupling suppression's ½ ε_F² t² is below the window); dynamic projection τ² a4_curv t² (+ a4_tail t⁴, not
    in the fit)."""
    a4, a4c, a4t = float(info["a4"]), float(info["a4_curv"]), float(info["a4_tail"])
    return {"none": (4, a4), "static_projection": (4, a4c + a4t), "coupling_suppression": (4, a4c + a4t),
            "dynamic_projection": (2, tau ** 2 * a4c)}


def point_rows(names, ts, du, loss, loss0, thr, lr) -> dict:
    """The per-defence analysis of one landscape's curves du, loss (D, T): :func:`analyse` over the undefended
    t⁴ window, the t* ratio, and Δu at the task loss the undefended run has at its t* (and its ratio to none)."""
    win = _window(ts, du[0], lr)
    rows = {n: analyse(ts, du[i], loss[i], loss0, thr, win) for i, n in enumerate(names)}
    target = rows["none"]["task_loss_at_tstar"]
    for i, n in enumerate(names):
        r = rows[n]
        r["du_at_equal_task_loss"] = du_at_loss(du[i], loss[i], target)
        r["du_at_equal_task_loss_ratio"] = r["du_at_equal_task_loss"] / rows["none"]["du_at_equal_task_loss"]
        r["tstar_ratio"] = r["tstar"] / rows["none"]["tstar"]
    return rows, win


def _flows(config, ls, names, ts):
    """Δu along the gradient flow θ̇ = −T_θ(∇L(θ)) of each stateless defence (``flow_velocity``; RK4 with
    ``substeps`` steps per interval of the t-grid, enough for the stiff penalties: h λ_reg λ_1 < 2.8), on the
    default landscape."""
    pb, sub = ls.problem, ls.subspace

    def du_of(th):
        return stable_kl_utility(ls.logits_fn, ls.params, th, ls.inputs)

    def all_flows():
        out = {}
        for n in names:
            if n == "dynamic_projection":   # its K → 0 flow keeps the logits fixed: Δu ≡ 0 without a Fisher tail
                continue
            vel = flow_velocity(make_defense(n, pb, sub, **options_of(config, n)))
            out[n] = T.integrate(ls.loss_fn, ls.params, ls.batch, jnp.asarray(ts), int(config.substeps), du_of,
                                 velocity=vel)
        return out

    return jax.tree_util.tree_map(np.asarray, jax.jit(all_flows)())


def run(config, workdir):
    names = tuple(config.defenses)
    specs = tuple((n, tuple(sorted(options_of(config, n).items()))) for n in names)
    lr, thr = float(config.lr), float(config.threshold)
    ts = step_grid(config)
    tau = int(config.every) * lr
    k_mid = int(np.searchsorted(ts, 0.5 * ts[-1]))
    point = functools.partial(_descent_point, specs=specs, lr=lr, ts=ts, k_mid=k_mid)

    # the default landscape (point 0) and the λ × γ grid, in one vmapped, sharded, checkpointed map
    ls = make_landscape(**T.landscape_kwargs(config))
    kw = T.landscape_kwargs(config)
    kw.update(lam=np.asarray(config.lams, np.float64), gamma=np.asarray(config.gammas, np.float64))
    grid = landscape_grid(**kw)
    both = jax.tree_util.tree_map(lambda a, b: np.concatenate([np.asarray(a)[None], np.asarray(b)]),
                                  _arrays(ls), _arrays(grid))
    out = harness.checkpointed_map(point, both, workdir=workdir, name="defenses_landscape",
                                   chunk_size=int(config.chunk_size), desc="defences × landscapes")
    harness.check_finite("du", np.moveaxis(out["du"], 2, 0), steps=ts, partial={"ts": ts, "du": out["du"]})
    loss0 = np.asarray(jax.vmap(landscape_loss)(both["params"], both["batch"]))
    rows, win = point_rows(names, ts, out["du"][0], out["loss"][0], float(loss0[0]), thr, lr)
    grid_rows = [point_rows(names, ts, out["du"][j], out["loss"][j], float(loss0[j]), thr, lr)[0]
                 for j in range(1, out["du"].shape[0])]
    for n in names:
        rows[n]["options"] = options_of(config, n)
        rows[n]["grid"] = {"lam": np.asarray(grid.info["lam"]), "gamma": np.asarray(grid.info["gamma_E"]),
                           **{k: np.array([r[n][k] for r in grid_rows])
                              for k in ("tstar", "tstar_ratio", "exponent", "task_loss_at_tstar",
                                        "du_at_equal_task_loss_ratio")}}

    flow_du = _flows(config, ls, names, ts)
    for n in flow_du:
        rows[n]["tstar_flow"] = scaling.collapse_time(ts, flow_du[n], thr)
    cost = refresh_costs(config, ls, ts[k_mid], jax.tree_util.tree_map(lambda x: jnp.asarray(x[0]), out["theta_mid"]))
    cur = {"du": out["du"][0], "loss": out["loss"][0]}
    loss0 = float(loss0[0])

    for n, (pw, c) in onset_laws(ls.info, tau).items():
        if n in rows:
            i = names.index(n)
            rows[n]["law"] = {"power": pw, "coefficient": c, "tstar_law": (thr / c) ** (1.0 / pw),
                              "coefficient_fit": scaling.fit_coefficient(ts, cur["du"][i], [ts[win[0]], ts[win[1]]],
                                                                         pw, "intercept")}
    r_dyn = rows.get("dynamic_projection", {}).get("tstar_ratio", float("nan"))
    r_st = rows.get("static_projection", {}).get("tstar_ratio", float("nan"))
    du_f = rows.get("fisher_penalty", {}).get("du_at_equal_task_loss_ratio", float("nan"))
    agree = bool(r_dyn >= float(config.dynamic_min_ratio) and r_st < float(config.static_max_ratio) and du_f < 1.0)
    results = {
        "defenses": rows, "names": list(names), "threshold": thr, "lr": lr, "tau": tau, "ts": ts, "loss0": loss0,
        "window": [float(ts[win[0]]), float(ts[win[1]])], "refresh_cost": cost,
        "landscape": {k: float(ls.info[k]) for k in ("lam", "gamma_E", "gamma_F", "eps", "a4", "a4_curv", "a4_tail")},
        "curves": {n: {"du": cur["du"][i], "loss": cur["loss"][i], "du_flow": flow_du.get(n)}
                   for i, n in enumerate(names)},
        "claim": T.claim("t* ratio of dynamic projection (static < 2, Fisher penalty lowers Δu at equal task loss)",
                         r_dyn, f"≥ {config.dynamic_min_ratio:g}; static < {config.static_max_ratio:g}; Fisher Δu "
                         "ratio < 1", agree),
    }
    _figure(results, config, workdir)
    return results


def _tex(x: float) -> str:
    """A number for a title: $10^{k}$ for a power of ten, else %g."""
    k = np.log10(x)
    return f"$10^{{{int(round(k))}}}$" if abs(k - round(k)) < 1e-12 else f"{x:g}"


def _figure(res, config, workdir):
    names, ts, thr = res["names"], np.asarray(res["ts"]), res["threshold"]
    rows, curves = res["defenses"], res["curves"]
    lo, hi = res["window"]
    fig, (ax, ax2, ax3) = harness.new_figure(3, width=5.2, height=4.6)
    for n in names:
        c, ls_ = STYLES.get(n, ("0.5", "-"))
        du, loss = np.asarray(curves[n]["du"]), np.asarray(curves[n]["loss"])
        r = rows[n]
        extra = "" if n == "none" else (f"; $t^*$ ×{r['tstar_ratio']:.3g}" if np.isfinite(r["tstar"]) else
                                        "; $t^*$ not reached")
        ax.loglog(ts, du, color=c, ls=ls_, lw=1.8, label=LABELS.get(n, n) + f" (slope {r['exponent']:.2f}{extra})")
        if np.isfinite(r["tstar"]):
            ax.plot([r["tstar"]], [thr], "o", color=c, ms=5)
        ax2.loglog(res["loss0"] - loss, du, color=c, ls=ls_, lw=1.8)
        if np.isfinite(r["tstar"]):
            ax2.plot([r["task_progress_at_tstar"]], [thr], "o", color=c, ms=5)
        if "law" in r and n in ("static_projection", "dynamic_projection"):
            law = r["law"]
            x = ts[(ts >= lo / 3) & (ts <= 3 * hi)]
            ax.loglog(x, law["coefficient"] * x ** law["power"], color="k", lw=1.0, ls=(0, (1, 2)), zorder=5)
    ax.axvspan(lo, hi, color="0.85", alpha=0.5, lw=0, label="undefended $t^4$ window (slopes measured here)")
    ax.axhline(thr, color="0.4", lw=0.8, ls=":")
    ax.plot([], [], color="k", lw=1.0, ls=(0, (1, 2)), label=r"derived laws: $a_4^{\rm curv}t^4$, "
            r"$\tau^2 a_4^{\rm curv} t^2$")
    pos = np.concatenate([np.asarray(curves[n]["du"]) for n in names])
    ax.set_ylim(max(pos[pos > 0].min(), thr * 1e-8) / 3, pos.max() * 1e3)
    ax.set_xlabel(r"$t = \eta k$ (gradient descent, $\eta$ = %g; dynamic: $K$ = %d)" % (res["lr"], config.every))
    ax.set_ylabel(r"$\Delta u(\theta(t))$")
    lsd = res["landscape"]
    ax.set_title(rf"$\Delta u(t)$ ($\lambda$={lsd['lam']:g}, $\gamma_E$={lsd['gamma_E']:g}, "
                 rf"$\kappa$={config.policy_curvature:g}); dots: $t^*$, $\Delta u$ = {_tex(thr)}", fontsize=9.5)
    ax.legend(loc="upper left", fontsize=6.6)
    ax2.axhline(thr, color="0.4", lw=0.8, ls=":")
    ax2.axvline(rows["none"]["task_progress_at_tstar"], color="0.4", lw=0.8, ls=":")
    ax2.set_ylim(ax.get_ylim())
    ax2.set_xlabel(r"task progress $L(\theta^*) - L(\theta(t))$")
    ax2.set_ylabel(r"$\Delta u$")
    ax2.set_title("trade-off: lower = less Δu at equal task progress\n(colours as left; dots: progress at $t^*$; "
                  "dotted: the undefended one)", fontsize=9.5)
    if "dynamic_projection" in names:
        loss = np.asarray(curves["dynamic_projection"]["loss"])
        ax2.annotate("dynamic projection: the task stalls\nonce the subspace has rotated into\nthe task direction",
                     (res["loss0"] - loss[-1], float(curves["dynamic_projection"]["du"][-1])), xytext=(0.97, 0.1),
                     textcoords="axes fraction", ha="right", fontsize=7, color="C2",
                     arrowprops=dict(arrowstyle="->", color="C2", lw=0.8))
    t_end = float(ts[-1])
    for n in names[1:]:
        g = rows[n]["grid"]
        x = np.asarray(g["lam"]) * np.asarray(g["gamma"]) ** 2
        ratio = np.asarray(g["tstar_ratio"], np.float64)
        t_none = np.asarray(rows["none"]["grid"]["tstar"], np.float64)
        c, _ = STYLES.get(n, ("0.5", "-"))
        m = MARKERS.get(n, "o")
        ok = np.isfinite(ratio)
        ax3.loglog(x[ok], ratio[ok], m, color=c, mfc="none" if m in ("s", "D") else c, ms=7, label=LABELS.get(n, n))
        if (~ok).any():
            ax3.loglog(x[~ok], t_end / t_none[~ok], "^", color=c, mfc="none", ms=8)
    ax3.plot([], [], "^", color="0.3", mfc="none", label=r"not reached by $t_{\rm end}$: $t_{\rm end}/t^*_{\rm none}$")
    ax3.axhline(config.dynamic_min_ratio, color="C2", lw=0.8, ls="--")
    ax3.axhline(config.static_max_ratio, color="C3", lw=0.8, ls="--")
    ax3.axhline(1.0, color="0.5", lw=0.8)
    ax3.set_ylim(0.8, 1e3)
    ax3.legend(loc="upper center", fontsize=6.6, ncol=2)
    ax3.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax3.set_xlabel(r"$\lambda\gamma_E^2$ (grid point)")
    ax3.set_ylabel(r"$t^*_{\rm defence} / t^*_{\rm none}$")
    ax3.set_title(f"collapse delay over the {len(config.lams)}×{len(config.gammas)} λ×γ grid "
                  f"(dashed: {config.dynamic_min_ratio:g}×, {config.static_max_ratio:g}×)", fontsize=9.5)
    fig.tight_layout()
    harness.save_figure(fig, workdir, "defenses_landscape")
