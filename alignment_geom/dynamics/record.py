"""Measurements along a path: Δu, the drift inside the sensitive subspace, projection ratios, subspace rotation.

    record_path(path, ts, *, params0, logits_fn, inputs, loss_fn=None, batch=None, basis=None,
                fisher_eigvals=None, taylor_order=0, dynamic=True, mask=None) -> dict of numpy arrays
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.curvature import fisher_norm, flow_taylor, stable_kl_utility, taylor_eval, top_fisher_subspace
from alignment_geom.dynamics.flow import _check_ts
from alignment_geom.linalg import coordinates, principal_angles, project
from alignment_geom.tree import tree_dot, tree_sub

PyTree = Any

__all__ = ["record_path"]


def record_path(path: PyTree, ts, *, params0: PyTree, logits_fn: Callable, inputs: Any,
                loss_fn: Optional[Callable] = None, batch: Any = None, basis: Optional[PyTree] = None,
                fisher_eigvals=None, taylor_order: int = 0, dynamic: bool = True,
                mask: Optional[PyTree] = None) -> dict:
    """Measurements along a path (gradient_flow / discrete_path output), as numpy arrays over t.

    Keys (δ = θ(t) − θ*, P = P(θ*) onto ``basis``, P_t the top-d Fisher subspace at θ(t)):
      t; du = Δu(θ(t)) (exact KL, ``curvature.stable_kl_utility``: no roundoff floor at tiny Δu);
      loss = L(θ(t)) (needs loss_fn, batch);
      drift_F = ‖F^{1/2} P δ‖ (F = F(θ*); with ``fisher_eigvals`` (≥ d entries, top-d first, basis
        their eigenvectors) as sqrt(Σ_j λ_j ⟨b_j, δ⟩²), else by a jvp); drift_E = ‖P δ‖;
      proj_ratio = ‖Pδ‖/‖δ‖; proj_ratio_dynamic = ‖P_t δ‖/‖δ‖; angles (T, d) principal angles
        between span P and span P_t (``dynamic=True``; cost of :func:`top_fisher_subspace` per t);
      du_first_order = Δu(θ* − t g); du_taylor_K = Δu(θ* + Σ_{k≤K} c_k t^k) for K = 2..taylor_order
        (c_k from ``curvature.flow_taylor``; needs loss_fn, batch).
    At t = 0 the ratios are 0/0 = NaN.
    """
    ts = _check_ts(ts)
    T = ts.shape[0]
    lead = jax.tree_util.tree_leaves(path)[0].shape[0]
    if lead != T:
        raise ValueError(f"path has {lead} entries but ts has {T}")
    need_loss = taylor_order >= 1 or loss_fn is not None
    if need_loss and (loss_fn is None or batch is None):
        raise ValueError("loss_fn and batch are needed for loss, du_first_order and du_taylor_K")
    if taylor_order and taylor_order < 2:
        raise ValueError(f"taylor_order must be 0 or >= 2; got {taylor_order}")
    lam = None if fisher_eigvals is None else jnp.asarray(fisher_eigvals)
    res = _record_jit(logits_fn, loss_fn, int(taylor_order), bool(dynamic), path, ts, params0, inputs, batch,
                      basis, lam, mask)
    res = {k: np.asarray(v) for k, v in res.items()}
    res["t"] = np.asarray(ts)
    return res


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _record_jit(logits_fn, loss_fn, taylor_order, dynamic, path, ts, params0, inputs, batch, basis, lam, mask):
    d = None if basis is None else jax.tree_util.tree_leaves(basis)[0].shape[0]
    if lam is not None:
        lam = lam[:d]
    cs = flow_taylor(loss_fn, params0, batch, max(taylor_order, 1), mask) if loss_fn is not None else None

    def one(args):
        theta, t = args
        delta = tree_sub(theta, params0)
        out = {"du": stable_kl_utility(logits_fn, params0, theta, inputs)}
        nd = jnp.sqrt(tree_dot(delta, delta))
        if loss_fn is not None:
            out["loss"] = loss_fn(theta, batch)
            out["du_first_order"] = stable_kl_utility(logits_fn, params0, taylor_eval(cs[:1], t, params0), inputs)
            for K in range(2, taylor_order + 1):
                out[f"du_taylor_{K}"] = stable_kl_utility(logits_fn, params0, taylor_eval(cs[:K], t, params0), inputs)
        if basis is not None:
            coef = coordinates(basis, delta)
            pn = jnp.sqrt(jnp.sum(coef * coef))
            out["drift_E"] = pn
            out["proj_ratio"] = pn / nd
            if lam is not None:
                out["drift_F"] = jnp.sqrt(jnp.sum(lam * coef * coef))
            else:
                out["drift_F"] = fisher_norm(logits_fn, params0, project(basis, delta), inputs)
            if dynamic:
                bt, _ = top_fisher_subspace(logits_fn, theta, inputs, d, mask)
                ct = coordinates(bt, delta)
                out["proj_ratio_dynamic"] = jnp.sqrt(jnp.sum(ct * ct)) / nd
                out["angles"] = principal_angles(basis, bt)
        return out

    return jax.lax.map(one, (path, ts))
