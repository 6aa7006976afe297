"""Discrete training from θ* recorded on the gradient-flow clock t = η·k: GD, SGD, Adam or any optax optimiser.

    discrete_path(loss_fn, params, batch, ts, *, lr, optimizer="gd"|"sgd"|"adam"|optax transform, key=None,
                  batch_size=None, sample_fn=None, velocity=None, mask=None) -> (path, actual_ts)
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignment_geom.dynamics.flow import _finish
from alignment_geom.tree import apply_mask, check_mask, tree_add, tree_float_dtype, tree_map, tree_scale

PyTree = Any

__all__ = ["discrete_path"]


def _subsample_leading(key, batch, *, batch_size):
    leaves = jax.tree_util.tree_leaves(batch)
    m = leaves[0].shape[0]
    if any(x.ndim == 0 or x.shape[0] != m for x in leaves):
        raise ValueError("default SGD sampling needs every batch leaf to share a leading example axis; "
                         "pass sample_fn(key, batch) instead")
    idx = jax.random.choice(key, m, (batch_size,), replace=False)
    return tree_map(lambda x: x[idx], batch)


def discrete_path(loss_fn: Callable, params: PyTree, batch: Any, ts, *, lr: float, optimizer="gd",
                  key=None, batch_size: Optional[int] = None, sample_fn: Optional[Callable] = None,
                  velocity: Optional[Callable] = None, mask: Optional[PyTree] = None, output: str = "params"):
    """Discrete training from θ* recorded on the gradient-flow clock t = η·k.

    Step k (η = ``lr``): the gradient ∇L(θ_k) on the full batch ("gd", "adam") or on a minibatch of
    ``batch_size`` examples ("sgd", or any optimizer when batch_size is given; drawn with
    ``sample_fn(key_k, batch)``, default: without replacement along every leaf's leading axis) is
    turned into a direction v = ``velocity(θ, grad)`` (default −grad), and the optax transform is fed
    the pseudo-gradient −v: "gd"/"sgd" = optax.sgd(η) (θ_{k+1} = θ_k + η v), "adam" = optax.adam(η);
    an ``optax.GradientTransformation`` may be passed instead.

    Each t in ``ts`` is rounded to the nearest step k = round(t/η); the state after k steps is
    recorded. Steps run in a lax.scan over the recording intervals (fori_loop inside).
    Returns ``(path, actual_ts)``: path as in :func:`gradient_flow`, actual_ts = η·k (T,).
    """
    check_mask(mask, params)
    ts_np = np.asarray(ts, np.float64)
    if ts_np.ndim != 1 or ts_np.size == 0 or np.any(np.diff(ts_np) < 0) or ts_np[0] < 0:
        raise ValueError("ts must be a non-empty, non-decreasing 1-D array of times >= 0")
    lr = float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    ks = np.rint(ts_np / lr).astype(np.int64)
    if not (isinstance(optimizer, optax.GradientTransformation) or optimizer in ("gd", "sgd", "adam")):
        raise ValueError(f"optimizer must be 'gd', 'sgd', 'adam' or an optax.GradientTransformation; got {optimizer!r}")
    if optimizer == "sgd" and batch_size is None:
        raise ValueError("optimizer='sgd' needs batch_size")
    stochastic = batch_size is not None
    if stochastic:
        key = jax.random.PRNGKey(0) if key is None else key
        if sample_fn is None:
            sample_fn = partial(_subsample_leading, batch_size=int(batch_size))
    else:
        key, sample_fn = jax.random.PRNGKey(0), None
    opt_name = "custom" if isinstance(optimizer, optax.GradientTransformation) else optimizer
    custom = optimizer if opt_name == "custom" else None
    starts = np.concatenate([[0], ks[:-1]])
    pairs = jnp.asarray(np.stack([starts, ks], axis=1), jnp.int32)
    dtype = tree_float_dtype(params)
    deltas = _discrete_jit(loss_fn, opt_name, custom, sample_fn, velocity, params, batch, pairs,
                           jnp.asarray(lr, dtype), key, mask)
    return _finish(params, deltas, output), jnp.asarray(ks * lr, dtype)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _discrete_jit(loss_fn, opt_name, custom, sample_fn, velocity, params, batch, pairs, lr, key, mask):
    """Compiled once per (loss_fn, optimizer kind, hooks) and shapes; lr and the step counts are traced."""
    opt = {"gd": lambda: optax.sgd(lr), "sgd": lambda: optax.sgd(lr), "adam": lambda: optax.adam(lr),
           "custom": lambda: custom}[opt_name]()
    grad = jax.grad(loss_fn)

    def step(k, carry):
        delta, st = carry
        p = tree_add(params, delta)
        b = sample_fn(jax.random.fold_in(key, k), batch) if sample_fn is not None else batch
        gr = apply_mask(mask, grad(p, b))
        v = tree_scale(-1.0, gr) if velocity is None else velocity(p, gr)
        pseudo = apply_mask(mask, tree_scale(-1.0, v))
        upd, st = opt.update(pseudo, st, p)
        delta = tree_map(lambda a, u: a + u.astype(a.dtype), delta, apply_mask(mask, upd))
        return delta, st

    def interval(carry, k_pair):
        carry = jax.lax.fori_loop(k_pair[0], k_pair[1], step, carry)
        return carry, carry[0]

    delta0 = tree_map(jnp.zeros_like, params)
    _, deltas = jax.lax.scan(interval, (delta0, opt.init(params)), pairs)
    return deltas
