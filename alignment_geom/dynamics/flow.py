"""Gradient flow θ̇ = −∇L(θ) from θ* (paper §4: the path whose curvature bends into the sensitive subspace).

    gradient_flow(loss_fn, params, batch, ts, *, method="dopri5"|"rk4", rtol=1e-10, atol=1e-12, steps=32,
                  mask=None, velocity=None, mxstep=100_000, output="params") -> path

A path is a pytree shaped like ``params`` with a leading time axis (one entry per t in ``ts``). The state
integrated is the displacement δ = θ − θ* (tolerances act on θ − θ*, not on θ). ``velocity(θ, ∇L) -> θ̇``
replaces −∇L (the defences of :mod:`alignment_geom.dynamics.defenses`).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.ode import odeint

from alignment_geom.tree import apply_mask, check_mask, tree_add, tree_float_dtype, tree_map, tree_scale

PyTree = Any

__all__ = ["gradient_flow"]


def _check_ts(ts):
    """Validate a concrete time grid (1-D, ≥ 0, non-decreasing); traced grids pass through."""
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] == 0:
        raise ValueError(f"ts must be a non-empty 1-D array of times; got shape {ts.shape}")
    if not isinstance(ts, jax.core.Tracer):
        tn = np.asarray(ts)
        if not np.all(np.isfinite(tn)) or tn[0] < 0 or np.any(np.diff(tn) < 0):
            raise ValueError("ts must be finite, >= 0 and non-decreasing")
    return ts


def _make_rhs(loss_fn, batch, mask, velocity):
    """δ ↦ θ̇ at θ = θ* + δ: ``velocity(θ, ∇L)`` (default −∇L), restricted to the mask."""
    grad = jax.grad(loss_fn)

    def rhs(delta, params0):
        p = tree_add(params0, delta)
        gr = apply_mask(mask, grad(p, batch))
        v = tree_scale(-1.0, gr) if velocity is None else velocity(p, gr)
        return apply_mask(mask, tree_map(lambda a, b: a.astype(b.dtype), v, delta))

    return rhs


def _finish(params0, deltas, output):
    if output == "displacement":
        return deltas
    if output == "params":
        return tree_map(lambda p, d: p[None] + d, params0, deltas)
    raise ValueError(f"output must be 'params' or 'displacement'; got {output!r}")


def gradient_flow(loss_fn: Callable, params: PyTree, batch: Any, ts, *, method: str = "dopri5",
                  rtol: float = 1e-10, atol: float = 1e-12, steps: int = 32, mask: Optional[PyTree] = None,
                  velocity: Optional[Callable] = None, mxstep: int = 100_000, output: str = "params") -> PyTree:
    """Integrate gradient flow θ̇ = −∇L(θ), θ(0) = θ*, and return θ(t) for every t in ``ts``.

    The state integrated is the displacement δ = θ − θ* (so tolerances act on θ − θ*, not on θ).

    Args:
      loss_fn: ``(params, batch) -> scalar`` L. params: θ* (pytree). batch: L's data.
      ts: (T,) non-decreasing times ≥ 0; integration starts at t = 0.
      method: "dopri5" (adaptive Dormand–Prince, ``jax.experimental.ode.odeint``, componentwise
        error control atol + rtol·|δ|, dense-output interpolation at ts) or "rk4" (classical RK4,
        ``steps`` equal sub-steps per interval [t_{i−1}, t_i], in lax.scan).
      mask: optional boolean pytree; only θ_S moves (θ̇ = −∇_S L on S, 0 elsewhere).
      velocity: optional hook ``velocity(θ, grad) -> θ̇`` replacing −grad (defences); grad is ∇L(θ),
        already masked.
      mxstep: maximum dopri5 steps per output interval.
      output: "params" (θ(t)) or "displacement" (θ(t) − θ*, no cancellation).
    Returns:
      a pytree like params with a leading axis of length T. jit/vmap compatible (vmap over
      params/batch with a shared ts).
    """
    check_mask(mask, params)
    ts = _check_ts(ts)
    if method not in ("dopri5", "rk4"):
        raise ValueError(f"method must be 'dopri5' or 'rk4'; got {method!r}")
    if output not in ("params", "displacement"):
        raise ValueError(f"output must be 'params' or 'displacement'; got {output!r}")
    if method == "rk4" and int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    return _gradient_flow_jit(loss_fn, velocity, method, float(rtol), float(atol), int(steps), int(mxstep), output,
                              params, batch, ts, mask)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _gradient_flow_jit(loss_fn, velocity, method, rtol, atol, steps, mxstep, output, params, batch, ts, mask):
    """Compiled once per (loss_fn, velocity, options) and shapes: repeated calls hit the jit cache."""
    dtype = tree_float_dtype(params)
    ts = ts.astype(dtype)
    rhs = _make_rhs(loss_fn, batch, mask, velocity)
    delta0 = tree_map(jnp.zeros_like, params)
    if method == "dopri5":
        times = jnp.concatenate([jnp.zeros((1,), dtype), ts])
        deltas = odeint(lambda y, t, p0: rhs(y, p0), delta0, times, params,
                        rtol=rtol, atol=atol, mxstep=mxstep)
        deltas = tree_map(lambda x: x[1:], deltas)
    else:
        def rk4_step(_, carry):
            y, h = carry
            f = lambda yy: rhs(yy, params)  # noqa: E731
            k1 = f(y)
            k2 = f(tree_map(lambda a, k: a + 0.5 * h * k, y, k1))
            k3 = f(tree_map(lambda a, k: a + 0.5 * h * k, y, k2))
            k4 = f(tree_map(lambda a, k: a + h * k, y, k3))
            y = tree_map(lambda a, b1, b2, b3, b4: a + (h / 6) * (b1 + 2 * b2 + 2 * b3 + b4), y, k1, k2, k3, k4)
            return y, h

        def interval(carry, t_next):
            y, t_prev = carry
            h = (t_next - t_prev) / steps
            y, _ = jax.lax.fori_loop(0, steps, rk4_step, (y, h))
            return (y, t_next), y

        _, deltas = jax.lax.scan(interval, (delta0, jnp.zeros((), dtype)), ts)
    return _finish(params, deltas, output)
