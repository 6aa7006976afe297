"""Shared pieces of the nine theory figures: the landscape and t-grid of a config, its validation, the RK4 flow
with a recorder, the onset analysis of a Δu(t) curve, and the vmapped, sharded, resumable sweeps.

Notation: θ* aligned parameters, g = ∇L(θ*), H = ∇²L(θ*), F the safety Fisher at θ*, P the projector on its
top-d eigenvectors, λ = λ_d, γ_E = ‖P H g‖, γ_F = ‖F^{1/2} P H g‖, ε = ‖P g‖.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import aic, harness, scaling
from alignment_geom.curvature import fisher_vp, hvp, stable_kl_utility, utility_taylor_coeffs
from alignment_geom.dynamics import gradient_flow, record_path
from alignment_geom.harness import ConfigError
from alignment_geom.landscapes import landscape_grid, landscape_logits, landscape_loss, make_landscape

THEORY_FIGURES = ("quartic_onset", "sharpness_sweep", "coupling_sweep", "collapse_time", "drift",
                  "orthogonality_illusion", "projection_defense", "gd_vs_flow", "subspace_rotation")


# --------------------------------------------------------------------------- config -> problem


def landscape_kwargs(config, **overrides) -> dict:
    """make_landscape keyword arguments from the config's landscape fields (those present)."""
    keys = ("n", "d", "lam", "gamma", "eps", "tail", "third_order", "policy_curvature", "n_tail", "lam_spread",
            "h_sens", "h_task", "h_tail", "tail_coupling", "mix", "grad_norm", "n_examples", "grad_noise")
    kw = {k: config[k] for k in keys if k in config}
    kw["dtype"] = harness.dtype_of(config)
    kw["key"] = jax.random.PRNGKey(int(config.get("seed", 0)))
    kw.update(overrides)
    return kw


def t_grid(config) -> np.ndarray:
    """The t-grid: ``config.ts`` when given, else ``num_t·scale`` log-spaced points in [t_min, t_max]."""
    if "ts" in config and len(config.ts):
        return np.asarray(config.ts, np.float64)
    num = max(2, int(round(config.num_t * config.get("scale", 1.0))))
    return np.geomspace(config.t_min, config.t_max, num)


def validate_theory(config, sweep_fields=()):
    """Shared validation of the theory configs: λ > 0, γ ≥ 0, ε ≥ 0, d ≤ n, the t-grid, sweeps."""
    harness.require_d_le_n(config)
    need = config.d + 1 + config.get("n_tail", 4)
    if config.n < need:
        raise ConfigError("n", config.n, f"an integer >= d + 1 + n_tail = {need}")
    for f in ("lam",):
        if f in config:
            harness.require_positive(config, f)
    for f in ("gamma", "eps", "tail"):
        if f in config:
            harness.require_positive(config, f, strict=False)
    if "lam" in config and "tail" in config and config.tail > 0 and config.tail / 2.0 >= config.lam:
        raise ConfigError("tail", config.tail, f"a Fisher tail whose largest eigenvalue tail/2 < λ={config.lam}")
    if "ts" in config and len(config.ts):
        harness.require_increasing(config, "ts")
        if config.ts[0] <= 0:
            raise ConfigError("ts", config.ts, "a strictly increasing grid of times > 0")
    else:
        harness.require_positive(config, "t_min")
        harness.require_positive(config, "t_max")
        if config.t_max <= config.t_min:
            raise ConfigError("t_max", config.t_max, f"a value > t_min={config.t_min} (the t-grid must increase)")
        harness.require_int(config, "num_t", lo=2)
    if "scale" in config:
        harness.require_positive(config, "scale")
    if "substeps" in config:
        harness.require_int(config, "substeps", lo=1)
    for f in sweep_fields:
        harness.require_nonempty(config, f)
        if f in ("lams",):
            harness.require_positive(config, f)
        else:
            harness.require_positive(config, f, strict=False)


# --------------------------------------------------------------------------- flows


def landscape_setup(config):
    """(landscape, t-grid) of a theory figure's config: ``make_landscape(**landscape_kwargs(config))``
    and :func:`t_grid`."""
    return make_landscape(**landscape_kwargs(config)), t_grid(config)


def landscape_record(config, *, dynamic: bool):
    """(landscape, ts, path, record): the gradient flow of the config's landscape (RK4 with ``config.substeps``)
    and ``dynamics.record_path`` along it (``dynamic``: also the moving top-d subspace and its angles)."""
    ls, ts = landscape_setup(config)
    path = jax.jit(lambda: integrate(ls.loss_fn, ls.params, ls.batch, jnp.asarray(ts), int(config.substeps)))()
    rec = record_path(path, ts, params0=ls.params, logits_fn=ls.logits_fn, inputs=ls.inputs, loss_fn=ls.loss_fn,
                      batch=ls.batch, basis=ls.basis, fisher_eigvals=ls.fisher_eigvals, dynamic=dynamic)
    return ls, ts, path, rec


def integrate(loss_fn, params, batch, ts, substeps: int = 4, record: Optional[Callable] = None,
              velocity: Optional[Callable] = None):
    """Gradient flow θ̇ = −∇L(θ) (or ``velocity(θ, ∇L)``) from θ*, RK4 with ``substeps`` steps per interval
    of the t-grid (dynamics.gradient_flow, lax.scan), then ``record(θ(t))`` vmapped over the grid."""
    path = gradient_flow(loss_fn, params, batch, ts, method="rk4", steps=substeps, velocity=velocity)
    return path if record is None else jax.vmap(record)(path)


def claim(quantity: str, measured, expected, agree: bool) -> dict:
    """The figure's headline check for the summary table."""
    return {"quantity": quantity, "measured": float(measured) if measured is not None else None,
            "expected": expected, "agree": bool(agree)}


# --------------------------------------------------------------------------- sweeps


@functools.lru_cache(maxsize=None)
def _sweep_point(substeps: int):
    """One grid point -> Δu on its t-grid (memoised per substeps, so jit/sharding caches are reused)."""
    def point(p):
        params, batch, inputs = p["params"], p["batch"], p["inputs"]

        def rec(th):
            return stable_kl_utility(landscape_logits, params, th, inputs)

        return {"du": integrate(landscape_loss, params, batch, p["ts"], substeps, rec)}

    return point


@functools.partial(jax.jit, static_argnames=("order",))
def landscape_taylor(params, batch, inputs, order: int = 5):
    """[a_0..a_order] of Δu(θ(t)) for a landscape (curvature.utility_taylor_coeffs; jitted once per shape/order)."""
    return utility_taylor_coeffs(landscape_loss, params, batch, landscape_logits, inputs, order)


def sweep_flows(config, workdir, *, name: str, devices=None, **grid_axes):
    """Δu(θ(t)) on the t-grid and the Taylor coefficients a_0..a_5 for every landscape of a grid.

    ``grid_axes``: knob -> 1-D values (Cartesian product, C order; see landscapes.landscape_grid). The
    gradient flows (RK4 in lax.scan + Δu) are vmapped over the grid and sharded over all devices by
    harness.checkpointed_map, in resumable chunks of ``config.chunk_size`` points (checkpointed under
    ``workdir/checkpoints/<name>``; ``devices`` default: all); the exact a_k come from one compiled
    Taylor-mode function applied point by point. Returns (ts, du (N, T), a (N, 6), info).
    """
    kw = landscape_kwargs(config)
    kw.update(grid_axes)
    ls = landscape_grid(**kw)
    ts = t_grid(config)
    dtype = ls.params["theta"].dtype
    N = int(ls.params["theta"].shape[0])
    grid = {"params": ls.params, "batch": ls.batch, "inputs": ls.inputs,
            "ts": jnp.broadcast_to(jnp.asarray(ts, dtype), (N, len(ts)))}
    out = harness.checkpointed_map(_sweep_point(int(config.get("substeps", 4))), grid, workdir=workdir, name=name,
                                  devices=devices, chunk_size=int(config.get("chunk_size", 8)), desc=name)
    harness.check_finite("du", np.moveaxis(out["du"], 1, 0), steps=ts, partial={"ts": ts, "du": out["du"]})
    tree_i = lambda t, i: jax.tree_util.tree_map(lambda x: x[i], t)  # noqa: E731
    a = np.stack([np.asarray(landscape_taylor(tree_i(ls.params, i), tree_i(ls.batch, i), tree_i(ls.inputs, i), 5))
                  for i in range(N)])
    return ts, out["du"], a, ls.info


def sweep_analysis(ts, du, a) -> dict:
    """Per grid point: onset window, slope in it, fitted c₄ (lists over the grid)."""
    rows = [analyse(ts, du[i], float(a[i, 4])) for i in range(du.shape[0])]
    return {"window": [r["window"] for r in rows], "slope": [r["slope"] for r in rows],
            "c4_fit": np.array([r["c4_fit"] for r in rows]), "c4_exact": np.asarray(a[:, 4])}


def analyse(ts, du, c4_exact, tol=0.1):
    """Window (|local slope − 4| ≤ tol), median slope in it and the fitted t⁴ coefficient of a Δu(t) curve."""
    win = scaling.onset_window(ts, du, 4.0, tol, indices=True)
    slopes = scaling.local_slope(ts, du)
    if win is None:
        return {"window": None, "slope": float("nan"), "c4_fit": float("nan"), "c4_fit_method": None,
                "slopes": slopes}
    i0, i1 = win
    window = (float(ts[i0]), float(ts[i1]))
    # the series fit needs 8 points; a shorter window falls back to the intercept fit (reported)
    method = "series" if i1 - i0 + 1 >= 8 else "intercept"
    return {"window": list(window), "window_idx": [int(i0), int(i1)],
            "slope": float(np.median(slopes[i0:i1 + 1])),
            "c4_fit": scaling.fit_coefficient(ts, du, window, 4, method), "c4_fit_method": method, "slopes": slopes}


# --------------------------------------------------------------------------- measurements shared by figures


@jax.jit
def _aic_numbers(params, batch, inputs, basis):
    Q = basis["theta"]                                     # (d, n) orthonormal rows
    g = jax.grad(landscape_loss)(params, batch)
    Hg = hvp(landscape_loss, params, g, batch)["theta"]
    FQ = jax.vmap(lambda q: fisher_vp(landscape_logits, params, {"theta": q}, inputs)["theta"])(Q)
    lam_top = jnp.einsum("in,in->i", Q, FQ)                 # Rayleigh quotients = eigenvalues
    resid = jnp.linalg.norm(FQ - lam_top[:, None] * Q)      # eigen-residual (0 for exact eigenvectors)
    Pg, PHg = Q @ g["theta"], Q @ Hg
    return {"lam": jnp.min(lam_top), "lam_top": lam_top, "eig_residual": resid,
            "eps": jnp.linalg.norm(Pg), "eps_F": jnp.linalg.norm(jnp.sqrt(lam_top) * Pg),
            "gamma_E": jnp.linalg.norm(PHg), "gamma_F": jnp.linalg.norm(jnp.sqrt(lam_top) * PHg)}


def aic_numbers(ls):
    """λ, ε = ‖P g‖, ε_F = ‖F^{1/2} P g‖, γ_E = ‖P H g‖, γ_F = ‖F^{1/2} P H g‖ measured with the curvature
    operators at θ* (P from the landscape's top-d Fisher eigenvectors, their eigenvalues from F·q)."""
    return _aic_numbers(ls.params, ls.batch, ls.inputs, ls.basis)


@functools.partial(jax.jit, static_argnames=("substeps",))
def _trajectory(params, batch, inputs, basis, eigvals, ts, substeps):
    Q = basis["theta"]
    lam_top = eigvals[: Q.shape[0]]

    def rec(th):
        du = stable_kl_utility(landscape_logits, params, th, inputs)
        Pd = Q @ (th["theta"] - params["theta"])
        return {"du": du, "drift_F": jnp.linalg.norm(jnp.sqrt(lam_top) * Pd), "P_norm": jnp.linalg.norm(Pd),
                "norm": jnp.linalg.norm(th["theta"] - params["theta"])}

    return integrate(landscape_loss, params, batch, ts, substeps, rec)


def measure_aic(ls, d):
    """aic.measure at θ*: the top-d Fisher subspace found from scratch (Lanczos on F·v), then λ, ε, γ_E, γ_F,
    the two c₄ bounds, t_min and t0 — the measured numbers the figure reports."""
    return aic.measure(ls.problem, d)


def landscape_trajectory(config):
    """(landscape, ts, trajectory): :func:`landscape_setup` and :func:`trajectory` with ``config.substeps``."""
    ls, ts = landscape_setup(config)
    return ls, ts, trajectory(ls, ts, int(config.get("substeps", 4)))


def trajectory(ls, ts, substeps):
    """Δu(θ(t)), the drift ‖F^{1/2} P (θ(t) − θ*)‖, ‖Pδ‖ and ‖δ‖ on the t-grid (numpy)."""
    out = _trajectory(ls.params, ls.batch, ls.inputs, ls.basis, ls.fisher_eigvals,
                      jnp.asarray(ts, ls.params["theta"].dtype), int(substeps))
    return jax.tree_util.tree_map(np.asarray, out)


def coefficient_sweep(config, workdir, *, axis: str, values, expected: float, tol: float, name: str,
                      xlabel: str, bound_label: str):
    """Shared by the sharpness and coupling sweeps: c₄ against one knob, power-law exponent and CI."""
    values = np.asarray(values, np.float64)
    ts, du, a, info = sweep_flows(config, workdir, name=name, **{axis: values})
    an = sweep_analysis(ts, du, a)
    c4 = an["c4_fit"]
    good = np.isfinite(c4) & (c4 > 0)
    if good.sum() < 2:
        raise harness.NonFiniteError("c4_fit", "sweep", {"c4_fit": c4, "values": values},
                                    "fewer than 2 grid points have a t^4 window")
    fit = scaling.power_law_fit(values[good], c4[good])
    fit_exact = scaling.power_law_fit(values, an["c4_exact"])
    agree = abs(fit["exponent"] - expected) <= tol
    results = {
        "axis": axis, axis: values, "exponent": fit["exponent"], "exponent_ci": fit["exponent_ci"],
        "prefactor": fit["prefactor"], "r2": fit["r2"], "exponent_taylor": fit_exact["exponent"],
        "expected_exponent": expected, "c4_fit": c4, "c4_exact": an["c4_exact"],
        "c4_rel_err": np.abs(c4 - an["c4_exact"]) / np.abs(an["c4_exact"]),
        "c4_bound_F": np.asarray(info["bound_F"]), "c4_bound_E": np.asarray(info["bound_E"]),
        "gamma_E": np.asarray(info["gamma_E"]), "gamma_F": np.asarray(info["gamma_F"]),
        "lam": np.asarray(info["lam"]), "window": an["window"], "slope": an["slope"],
        "claim": claim(f"exponent of c4 vs {axis}", fit["exponent"], f"{expected:g} ± {tol:g}", agree),
    }
    fig, (ax, ax2) = harness.new_figure(2, width=5.0)
    ax.loglog(values, an["c4_exact"], "o", mfc="none", color="C0", ms=8, label=r"$a_4$ (exact Taylor)")
    ax.loglog(values[good], c4[good], "k.", ms=9, label=r"$c_4$ fitted from $\Delta u(t)$")
    ax.loglog(values, results["c4_bound_F"], color="C2", ls=":", label=r"$\gamma_F^2/8$")
    ax.loglog(values, results["c4_bound_E"], color="C3", ls="-.", label=r"$\lambda\gamma_E^2/8$")
    xs = np.geomspace(values.min(), values.max(), 50)
    ax.loglog(xs, fit["prefactor"] * xs ** fit["exponent"], color="C1", lw=1,
              label=rf"fit: slope {fit['exponent']:.3f} [{fit['exponent_ci'][0]:.3f}, {fit['exponent_ci'][1]:.3f}]")
    harness.reference_slope(ax, xs, fit["prefactor"] * np.sqrt(xs[0] * xs[-1]) ** expected * 0.5, expected,
                       label=f"reference slope {expected:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"quartic coefficient $c_4 = \Delta u / t^4$")
    ax.set_title(bound_label)
    ax.legend(loc="upper left")
    sym = {"lam": r"$\lambda$", "gamma": r"$\gamma_E$"}.get(axis, axis)
    for i in range(du.shape[0]):
        ax2.loglog(ts, du[i], lw=1, color=f"C{i % 10}", label=f"{sym}={values[i]:.3g}")
    harness.reference_slope(ax2, ts[(ts > 0.01) & (ts < 0.5)], float(np.interp(0.1, ts, du[-1])) * 4, 4.0, x0=0.1,
                       label="slope 4")
    ax2.legend(loc="lower right", fontsize=7, ncol=2)
    ax2.set_xlabel(r"$t$")
    ax2.set_ylabel(r"$\Delta u(\theta(t))$")
    ax2.set_title(f"Δu(t) for each of the {len(values)} grid points")
    ax2.set_ylim(max(du.min(), 1e-30), du.max() * 10)
    fig.tight_layout()
    harness.save_figure(fig, workdir, name)
    return results
