"""Figure 8 — gradient flow vs discrete GD (several η, t = η k) vs SGD and Adam: where the quartic law holds.

Corollary 6.3 is a statement about gradient flow. Discrete GD from θ* follows θ_k = θ* − η Σ_j (I − ηH)^j g, whose
sensitive component is γ (t² − η t)/2 + …: the law holds once t ≫ η (the −ηt term acts like ε). SGD adds
minibatch noise with a component inside the sensitive subspace: a random walk whose Δu grows ∝ η σ² t (slope 1)
until the curvature term wins. Adam rescales every coordinate, so the update is no longer (almost) orthogonal to
the subspace and Δu grows ∝ t² from the start. We report the median local log–log slope of Δu for each method
on the part of the flow's t⁴ window where t ≥ 20 η.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import harness, scaling
from alignment_geom.curvature import stable_kl_utility
from alignment_geom.dynamics import discrete_path
from alignment_geom.landscapes import make_landscape
from alignment_geom.studies import _theory as T

THEORY = True


def validate(config):
    T.validate_theory(config)
    harness.require_nonempty(config, "lrs")
    harness.require_positive(config, "lrs")
    harness.require_positive(config, "sgd_lr")
    harness.require_positive(config, "adam_lr")
    harness.require_int(config, "batch_size", lo=1, hi=config.n_examples)
    harness.require_int(config, "n_examples", lo=2)


def _grid_for(ts, lr):
    ks = np.unique(np.rint(np.asarray(ts) / lr).astype(np.int64))
    ks = ks[ks >= 1]
    return ks * lr


def run(config, workdir):

    ls = make_landscape(**T.landscape_kwargs(config))
    ts = T.t_grid(config)

    def du_of(path):
        return jax.vmap(lambda th: stable_kl_utility(ls.logits_fn, ls.params, th, ls.inputs))(path)

    curves = {}
    flow = jax.jit(lambda: du_of(T.integrate(ls.loss_fn, ls.params, ls.batch, jnp.asarray(ts), int(config.substeps))))()
    curves["flow"] = (ts, np.asarray(flow))
    runs = [(f"GD η={lr:g}", "gd", lr) for lr in config.lrs]
    runs += [(f"SGD η={config.sgd_lr:g}, b={config.batch_size}", "sgd", config.sgd_lr),
             (f"Adam η={config.adam_lr:g}", "adam", config.adam_lr)]
    key = jax.random.PRNGKey(int(config.seed) + 1)
    for name, opt, lr in harness.progress(runs, desc="optimisers"):
        tm = _grid_for(ts, lr)
        kw = {}
        if opt == "sgd":
            bs = int(config.batch_size)
            kw = dict(key=key, batch_size=bs, sample_fn=lambda k, b: ls.minibatch_fn(k, b, bs))
        f = jax.jit(lambda tm=tm, opt=opt, lr=lr, kw=kw: du_of(
            discrete_path(ls.loss_fn, ls.params, ls.batch, tm, lr=lr, optimizer=opt, **kw)[0]))
        curves[name] = (tm, np.asarray(f()))
        harness.check_finite(f"du[{name}]", curves[name][1], steps=tm,
                            partial={k: {"t": v[0], "du": v[1]} for k, v in curves.items()})
    win = scaling.onset_window(ts, curves["flow"][1], 4.0, 0.1, indices=True)
    if win is None:
        raise harness.NonFiniteError("window", "-", {"ts": ts, "du_flow": curves["flow"][1]}, "no t^4 window")
    t_lo, t_hi = float(ts[win[0]]), float(ts[win[1]])
    slopes, regions = {}, {}
    for (name, (tm, du)), lr in zip(curves.items(), [0.0] + [r[2] for r in runs]):
        s = scaling.local_slope(tm, du)
        lo = max(t_lo, 20 * lr)
        sel = (tm >= lo) & (tm <= t_hi)
        slopes[name] = float(np.median(s[sel])) if sel.sum() >= 2 else float("nan")
        regions[name] = [lo, t_hi]
    gd_small = f"GD η={min(config.lrs):g}"
    sgd_name, adam_name = runs[-2][0], runs[-1][0]
    small_t = {}
    for name in (sgd_name, adam_name):
        tm, du = curves[name]
        s = scaling.local_slope(tm, du)
        small_t[name] = float(np.median(s[: max(3, len(s) // 5)]))
    agree = (abs(slopes["flow"] - 4) <= 0.1 and abs(slopes[gd_small] - 4) <= 0.1
             and small_t[sgd_name] < 3.0 and small_t[adam_name] < 3.0)
    results = {
        "window_flow": [t_lo, t_hi], "slope_in_window": slopes, "slope_region": regions,
        "slope_small_t": small_t, "curves": {k: {"t": v[0], "du": v[1]} for k, v in curves.items()},
        "claim": T.claim(f"slope of Δu for {gd_small} (SGD, Adam small-t slopes < 3)", slopes[gd_small],
                          "4 ± 0.1", agree),
    }
    fig, (ax, ax2) = harness.new_figure(2, width=5.4)
    styles = {"flow": dict(color="k", lw=2.5)}
    for i, (name, (tm, du)) in enumerate(curves.items()):
        st = styles.get(name, dict(lw=1.4, color=f"C{i}", ls="--" if name.startswith("GD") else "-"))
        ax.loglog(tm, du, label=f"{name}", **st)
        ax2.semilogx(tm, scaling.local_slope(tm, du), **st)
    harness.reference_slope(ax, ts[(ts > t_lo) & (ts < t_hi)], np.interp(0.1, ts, curves["flow"][1]) * 3, 4, x0=0.1,
                       label="slope 4")
    for a in (ax, ax2):
        a.axvspan(t_lo, t_hi, color="C1", alpha=0.12, lw=0)
    ax.set_ylim(max(min(c[1][c[1] > 0].min() for c in curves.values()), 1e-30) / 3,
                max(c[1].max() for c in curves.values()) * 10)
    ax.set_xlabel(r"$t$ (flow time; $t=\eta k$ for discrete steps)")
    ax.set_ylabel(r"$\Delta u$")
    ax.set_title("Gradient flow vs GD / SGD / Adam")
    ax.legend(loc="lower right", fontsize=7.5)
    ax2.axhline(4, color="C1", ls="--", lw=1)
    ax2.axhline(2, color="0.5", ls=":", lw=1)
    ax2.axhline(1, color="0.5", ls=":", lw=1)
    ax2.set_ylim(0, 6)
    ax2.set_xlabel(r"$t$")
    ax2.set_ylabel(r"local slope $d\log\Delta u/d\log t$")
    ax2.set_title(rf"slope in window: flow {slopes['flow']:.2f}, {gd_small} {slopes[gd_small]:.2f}")
    fig.tight_layout()
    harness.save_figure(fig, workdir, "gd_vs_flow")
    return results
