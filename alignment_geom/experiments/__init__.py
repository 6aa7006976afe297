"""One module per figure. Each defines ``run(config, workdir) -> dict`` (compute, save PNG + PDF, return the
results) and ``validate(config)``; see :mod:`alignment_geom.runner` for the contract.

Figures (../shared/paper-notes.md §6): quartic_onset, sharpness_sweep, coupling_sweep, collapse_time, drift,
orthogonality_illusion, projection_defense, gd_vs_flow, subspace_rotation.

This module also holds the small shared pieces of the theory figures: the landscape built from a config, a
numerically stable Δu, a gradient-flow integrator on a given t-grid (RK4 substeps in ``lax.scan``), the exact
Taylor coefficients of Δu(θ(t)), local log–log slopes, the onset window, coefficient and power-law fits, and
plotting helpers. Notation: θ* aligned parameters, g = ∇L(θ*), H = ∇²L(θ*), F the safety Fisher at θ*, P the
projector on its top-d eigenvectors, λ = λ_d, γ_E = ‖P H g‖, γ_F = ‖F^{1/2} P H g‖, ε = ‖P g‖.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

FIGURES = ("quartic_onset", "sharpness_sweep", "coupling_sweep", "collapse_time", "drift",
           "orthogonality_illusion", "projection_defense", "gd_vs_flow", "subspace_rotation")


# --------------------------------------------------------------------------- config -> problem


def landscape_kwargs(config, **overrides) -> dict:
    """make_landscape keyword arguments from the config's landscape fields (those present)."""
    from alignment_geom import runner

    keys = ("n", "d", "lam", "gamma", "eps", "tail", "third_order", "policy_curvature", "n_tail", "lam_spread",
            "h_sens", "h_task", "h_tail", "tail_coupling", "mix", "grad_norm", "n_examples", "grad_noise")
    kw = {k: config[k] for k in keys if k in config}
    kw["dtype"] = runner.dtype_of(config)
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
    from alignment_geom import runner

    runner.require_d_le_n(config)
    need = config.d + 1 + config.get("n_tail", 4)
    if config.n < need:
        raise runner.ConfigError("n", config.n, f"an integer >= d + 1 + n_tail = {need}")
    for f in ("lam",):
        if f in config:
            runner.require_positive(config, f)
    for f in ("gamma", "eps", "tail"):
        if f in config:
            runner.require_positive(config, f, strict=False)
    if "lam" in config and "tail" in config and config.tail > 0 and config.tail / 2.0 >= config.lam:
        raise runner.ConfigError("tail", config.tail, f"a Fisher tail whose largest eigenvalue tail/2 < λ={config.lam}")
    if "ts" in config and len(config.ts):
        runner.require_increasing(config, "ts")
        if config.ts[0] <= 0:
            raise runner.ConfigError("ts", config.ts, "a strictly increasing grid of times > 0")
    else:
        runner.require_positive(config, "t_min")
        runner.require_positive(config, "t_max")
        if config.t_max <= config.t_min:
            raise runner.ConfigError("t_max", config.t_max, f"a value > t_min={config.t_min} (the t-grid must increase)")
        runner.require_int(config, "num_t", lo=2)
    if "scale" in config:
        runner.require_positive(config, "scale")
    if "substeps" in config:
        runner.require_int(config, "substeps", lo=1)
    for f in sweep_fields:
        runner.require_nonempty(config, f)
        if f in ("lams",):
            runner.require_positive(config, f)
        else:
            runner.require_positive(config, f, strict=False)


# --------------------------------------------------------------------------- Δu, flow, Taylor (alignment_geom.flow)


def landscape_setup(config):
    """(landscape, t-grid) of a theory figure's config: ``make_landscape(**landscape_kwargs(config))``
    and :func:`t_grid`."""
    from alignment_geom.landscapes import make_landscape

    return make_landscape(**landscape_kwargs(config)), t_grid(config)


def landscape_record(config, *, dynamic: bool):
    """(landscape, ts, path, record): the gradient flow of the config's landscape (RK4 with ``config.substeps``)
    and ``flow.record_path`` along it (``dynamic``: also the moving top-d subspace and its angles)."""
    from alignment_geom.flow import record_path

    ls, ts = landscape_setup(config)
    path = jax.jit(lambda: integrate(ls.loss_fn, ls.params, ls.batch, jnp.asarray(ts), int(config.substeps)))()
    rec = record_path(path, ts, params0=ls.params, logits_fn=ls.logits_fn, inputs=ls.inputs, loss_fn=ls.loss_fn,
                      batch=ls.batch, basis=ls.basis, fisher_eigvals=ls.fisher_eigvals, dynamic=dynamic)
    return ls, ts, path, rec


def kl_utility_stable(logits_fn: Callable, params_ref, params, inputs):
    """Δu(θ) = mean_x KL(π_ref ‖ π_θ) without the ~1e-16 cancellation floor (flow.stable_kl_utility)."""
    from alignment_geom.flow import stable_kl_utility

    return stable_kl_utility(logits_fn, params_ref, params, inputs)


def integrate(loss_fn, params, batch, ts, substeps: int = 4, record: Optional[Callable] = None,
              velocity: Optional[Callable] = None):
    """Gradient flow θ̇ = −∇L(θ) (or ``velocity(θ, ∇L)``) from θ*, RK4 with ``substeps`` steps per interval
    of the t-grid (flow.gradient_flow, lax.scan), then ``record(θ(t))`` vmapped over the grid."""
    from alignment_geom.flow import gradient_flow

    path = gradient_flow(loss_fn, params, batch, ts, method="rk4", steps=substeps, velocity=velocity)
    return path if record is None else jax.vmap(record)(path)


def utility_taylor(loss_fn, logits_fn, params, batch, inputs, order: int = 5):
    """[a_0, …, a_order]: Δu(θ(t)) = Σ_k a_k t^k + O(t^{order+1}) along gradient flow (flow.utility_taylor_coeffs)."""
    from alignment_geom.flow import utility_taylor_coeffs

    return utility_taylor_coeffs(loss_fn, params, batch, logits_fn, inputs, order)


# --------------------------------------------------------------------------- scaling analysis (host, numpy)


def local_slope(ts, y) -> np.ndarray:
    """d log y / d log t (scaling.local_slope)."""
    from alignment_geom.scaling import local_slope as _ls

    return _ls(ts, y)


def onset_window(ts, y, target: float = 4.0, tol: float = 0.1):
    """(i_lo, i_hi) grid indices of the longest run with |local slope − target| ≤ tol (scaling.onset_window),
    or None."""
    from alignment_geom.scaling import onset_window as _ow

    lo, hi = _ow(ts, y, target, tol)
    if not np.isfinite(lo):
        return None
    ts = np.asarray(ts)
    return int(np.searchsorted(ts, lo)), int(np.searchsorted(ts, hi))


def fit_quartic_coefficient(ts, du, window) -> float:
    """c₄ from Δu(t) in the window: least squares of Δu/t⁴ = Σ_{j=−2}^{2} b_j t^j (relative weights).

    The t², t³ (ε-driven) and t⁵, t⁶ (cubic-remainder) corrections are fitted along, so c₄ = b_0 is the
    t⁴ coefficient rather than a window average biased by them. With fewer than 8 points, c₄ = median Δu/t⁴.
    """
    i0, i1 = window
    t = np.asarray(ts[i0:i1 + 1], np.float64)
    y = np.asarray(du[i0:i1 + 1], np.float64) / t ** 4
    if t.size < 8:
        return float(np.median(y))
    tc = np.sqrt(t[0] * t[-1])
    x = t / tc
    A = np.stack([x ** j for j in (-2, -1, 0, 1, 2)], axis=1)
    w = 1.0 / np.abs(y)
    coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    return float(coef[2])


def power_law_fit(x, y, conf: float = 0.95) -> dict:
    """y = A x^k by least squares in log–log (scaling.power_law_fit): exponent, exponent_ci, prefactor, r2."""
    from alignment_geom.scaling import power_law_fit as _plf

    out = _plf(x, y, conf)
    out["exponent_ci"] = list(out["exponent_ci"])
    out["prefactor_ci"] = list(out["prefactor_ci"])
    return out


def first_crossing(ts, y, level: float) -> float:
    """t* with y(t*) = level, log–log interpolation (scaling.collapse_time); nan when never reached."""
    from alignment_geom.scaling import collapse_time

    t = collapse_time(ts, y, level)
    return t if np.isfinite(t) else float("nan")


# --------------------------------------------------------------------------- plotting


def new_figure(ncols: int = 1, width: float = 5.6, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8.5})
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def reference_slope(ax, x, y_at, slope: float, x0: Optional[float] = None, label: Optional[str] = None, **kw):
    """Draw a dashed guide y = y_at · (x/x0)^slope over the x-range."""
    x = np.asarray(x, np.float64)
    x0 = x0 if x0 is not None else float(np.sqrt(x[0] * x[-1]))
    kw = {"color": "0.5", "ls": "--", "lw": 1.0, **kw}
    ax.plot(x, y_at * (x / x0) ** slope, label=label or f"slope {slope:g}", **kw)


def claim(quantity: str, measured, expected, agree: bool) -> dict:
    """The figure's headline check for the summary table."""
    return {"quantity": quantity, "measured": float(measured) if measured is not None else None,
            "expected": expected, "agree": bool(agree)}


# --------------------------------------------------------------------------- sweeps


@functools.lru_cache(maxsize=None)
def _sweep_point(substeps: int):
    """One grid point -> Δu on its t-grid (module-level and cached, so jit/sharding caches are reused)."""
    from alignment_geom.landscapes import landscape_logits, landscape_loss

    def point(p):
        params, batch, inputs = p["params"], p["batch"], p["inputs"]

        def rec(th):
            return kl_utility_stable(landscape_logits, params, th, inputs)

        return {"du": integrate(landscape_loss, params, batch, p["ts"], substeps, rec)}

    return point


@functools.partial(jax.jit, static_argnames=("order",))
def landscape_taylor(params, batch, inputs, order: int = 5):
    """utility_taylor for an alignment_geom.landscapes landscape (jitted once per shape/order, shared)."""
    from alignment_geom.landscapes import landscape_logits, landscape_loss

    return utility_taylor(landscape_loss, landscape_logits, params, batch, inputs, order)


def sweep_flows(config, workdir, *, name: str, devices=None, **grid_axes):
    """Δu(θ(t)) on the t-grid and the Taylor coefficients a_0..a_5 for every landscape of a grid.

    ``grid_axes``: knob -> 1-D values (Cartesian product, C order; see landscapes.landscape_grid). The
    gradient flows (RK4 in lax.scan + Δu) are vmapped over the grid and sharded over all devices by
    runner.checkpointed_map, in resumable chunks of ``config.chunk_size`` points (checkpointed under
    ``workdir/checkpoints/<name>``; ``devices`` default: all); the exact a_k come from one compiled
    Taylor-mode function applied point by point. Returns (ts, du (N, T), a (N, 6), info).
    """
    from alignment_geom import runner
    from alignment_geom.landscapes import landscape_grid

    kw = landscape_kwargs(config)
    kw.update(grid_axes)
    ls = landscape_grid(**kw)
    ts = t_grid(config)
    dtype = ls.params["theta"].dtype
    N = int(ls.params["theta"].shape[0])
    grid = {"params": ls.params, "batch": ls.batch, "inputs": ls.inputs,
            "ts": jnp.broadcast_to(jnp.asarray(ts, dtype), (N, len(ts)))}
    out = runner.checkpointed_map(_sweep_point(int(config.get("substeps", 4))), grid, workdir=workdir, name=name,
                                  devices=devices, chunk_size=int(config.get("chunk_size", 8)), desc=name)
    runner.check_finite("du", np.moveaxis(out["du"], 1, 0), steps=ts, partial={"ts": ts, "du": out["du"]})
    tree_i = lambda t, i: jax.tree_util.tree_map(lambda x: x[i], t)  # noqa: E731
    a = np.stack([np.asarray(landscape_taylor(tree_i(ls.params, i), tree_i(ls.batch, i), tree_i(ls.inputs, i), 5))
                  for i in range(N)])
    return ts, out["du"], a, ls.info


def sweep_analysis(ts, du, a) -> dict:
    """Per grid point: onset window, slope in it, fitted c₄ (lists over the grid)."""
    from alignment_geom.experiments.quartic_onset import analyse

    rows = [analyse(ts, du[i], float(a[i, 4])) for i in range(du.shape[0])]
    return {"window": [r["window"] for r in rows], "slope": [r["slope"] for r in rows],
            "c4_fit": np.array([r["c4_fit"] for r in rows]), "c4_exact": np.asarray(a[:, 4])}
