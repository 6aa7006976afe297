"""Test utilities in one place (as optax/chex do): tree assertions, a compile counter, and a zoo of tiny models
(n ≤ 500 parameters) for dense float64 oracles.

Every tiny model is a :class:`~alignment_geom.problem.Problem` (``name`` set) with
  params                    the parameter pytree θ*,
  loss_fn(params, batch)    the fine-tuning loss L (scalar),
  batch                     its data (also the ``safety_batch`` of logprob_fn),
  logits_fn(params, inputs) policy logits z, shape (..., C),
  inputs                    the safety-skill inputs for logits_fn,
  logprob_fn(params, batch) per-example log π(y|x), shape (m,).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from alignment_geom.problem import Problem

# --------------------------------------------------------------------------- assertions


def assert_trees_all_close(actual, desired, *, rtol=1e-10, atol=0.0, err_msg=""):
    """Assert two pytrees have the same structure and leaves close (numpy.testing semantics)."""
    a_def = jax.tree_util.tree_structure(actual)
    d_def = jax.tree_util.tree_structure(desired)
    if a_def != d_def:
        raise AssertionError(f"tree structures differ: {a_def} vs {d_def}. {err_msg}")
    for i, (a, d) in enumerate(zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired))):
        a = np.asarray(a)
        d = np.asarray(d)
        if a.shape != d.shape:
            raise AssertionError(f"leaf {i}: shapes differ {a.shape} vs {d.shape}. {err_msg}")
        np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=f"leaf {i}. {err_msg}")


def relative_error(actual, desired) -> float:
    """‖a − d‖ / max(‖d‖, tiny) over the ravelled pytrees, in float64 numpy."""
    a = np.asarray(ravel_pytree(actual)[0], np.float64)
    d = np.asarray(ravel_pytree(desired)[0], np.float64)
    return float(np.linalg.norm(a - d) / max(np.linalg.norm(d), 1e-300))


def assert_tree_dtype(tree, dtype):
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.asarray(leaf).dtype != jnp.dtype(dtype):
            raise AssertionError(f"expected dtype {jnp.dtype(dtype)}, got {jnp.asarray(leaf).dtype}")


class CompileCounter:
    """Wrap a function so jit tracing is counted: `f = CompileCounter(fn); g = jax.jit(f)`;
    `f.count` is the number of traces (= compilations for a plain jit)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.count = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------- tiny models


def _zoo(name, params, loss_fn, batch, logits_fn, inputs, logprob_fn) -> Problem:
    """A zoo model as a Problem whose safety batch is its fine-tuning batch."""
    return Problem(params, loss_fn=loss_fn, batch=batch, logits_fn=logits_fn, inputs=inputs, logprob_fn=logprob_fn,
                   safety_batch=batch, name=name)


def ce_logprob(logits, y):
    """log softmax(logits)[y] along the last axis (per example / position)."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]


def linear_model(key, n_in=5, n_out=3, m=8, dtype=jnp.float64) -> Problem:
    """z = x W + b; L = mean ½‖z − y‖² (quadratic: third derivatives vanish)."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = {"W": jax.random.normal(k1, (n_in, n_out), dtype) / np.sqrt(n_in),
              "b": 0.1 * jax.random.normal(k2, (n_out,), dtype)}
    x = jax.random.normal(k3, (m, n_in), dtype)
    y = jax.random.normal(k4, (m, n_out), dtype)

    def logits_fn(p, inputs):
        return inputs @ p["W"] + p["b"]

    def loss_fn(p, batch):
        r = logits_fn(p, batch["x"]) - batch["y"]
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))

    cls = jax.random.randint(k5, (m,), 0, n_out)

    def logprob_fn(p, batch):
        return ce_logprob(logits_fn(p, batch["x"]), batch["cls"])

    batch = {"x": x, "y": y, "cls": cls}
    return _zoo("linear", params, loss_fn, batch, logits_fn, x, logprob_fn)


def mlp_model(key, n_in=4, hidden=8, n_out=3, m=10, dtype=jnp.float64) -> Problem:
    """Two-layer tanh MLP with softmax cross-entropy."""
    ks = jax.random.split(key, 7)
    params = {"l1": {"W": jax.random.normal(ks[0], (n_in, hidden), dtype) / np.sqrt(n_in),
                     "b": 0.1 * jax.random.normal(ks[1], (hidden,), dtype)},
              "l2": {"W": jax.random.normal(ks[2], (hidden, n_out), dtype) / np.sqrt(hidden),
                     "b": 0.1 * jax.random.normal(ks[3], (n_out,), dtype)}}
    x = jax.random.normal(ks[4], (m, n_in), dtype)
    y = jax.random.randint(ks[5], (m,), 0, n_out)
    xs = jax.random.normal(ks[6], (m, n_in), dtype)

    def logits_fn(p, inputs):
        h = jnp.tanh(inputs @ p["l1"]["W"] + p["l1"]["b"])
        return h @ p["l2"]["W"] + p["l2"]["b"]

    def loss_fn(p, batch):
        return -jnp.mean(ce_logprob(logits_fn(p, batch["x"]), batch["y"]))

    def logprob_fn(p, batch):
        return ce_logprob(logits_fn(p, batch["x"]), batch["y"])

    return _zoo("mlp", params, loss_fn, {"x": x, "y": y}, logits_fn, xs, logprob_fn)


def softmax_regression_model(key, n_in=6, n_out=4, m=12, dtype=jnp.float64) -> Problem:
    """Multinomial logistic regression z = x W + b with cross-entropy."""
    ks = jax.random.split(key, 5)
    params = {"W": jax.random.normal(ks[0], (n_in, n_out), dtype) / np.sqrt(n_in),
              "b": 0.1 * jax.random.normal(ks[1], (n_out,), dtype)}
    x = jax.random.normal(ks[2], (m, n_in), dtype)
    y = jax.random.randint(ks[3], (m,), 0, n_out)
    xs = jax.random.normal(ks[4], (m, n_in), dtype)

    def logits_fn(p, inputs):
        return inputs @ p["W"] + p["b"]

    def loss_fn(p, batch):
        return -jnp.mean(ce_logprob(logits_fn(p, batch["x"]), batch["y"]))

    def logprob_fn(p, batch):
        return ce_logprob(logits_fn(p, batch["x"]), batch["y"])

    return _zoo("softmax_regression", params, loss_fn, {"x": x, "y": y}, logits_fn, xs, logprob_fn)


def attention_model(key, vocab=5, d=4, T=4, m=3, dtype=jnp.float64) -> Problem:
    """One causal single-head attention block (+ residual, tanh MLP-free readout) over
    token sequences; logits (m, T, vocab) for next-token prediction."""
    ks = jax.random.split(key, 8)
    s = 1.0 / np.sqrt(d)
    params = {"emb": jax.random.normal(ks[0], (vocab, d), dtype) * 0.5,
              "pos": jax.random.normal(ks[1], (T, d), dtype) * 0.1,
              "Wq": jax.random.normal(ks[2], (d, d), dtype) * s,
              "Wk": jax.random.normal(ks[3], (d, d), dtype) * s,
              "Wv": jax.random.normal(ks[4], (d, d), dtype) * s,
              "Wo": jax.random.normal(ks[5], (d, vocab), dtype) * s}
    tokens = jax.random.randint(ks[6], (m, T + 1), 0, vocab)
    safety_tokens = jax.random.randint(ks[7], (m, T), 0, vocab)

    def logits_fn(p, toks):
        h = p["emb"][toks] + p["pos"][: toks.shape[-1]]
        q, k, v = h @ p["Wq"], h @ p["Wk"], h @ p["Wv"]
        att = jnp.einsum("...qd,...kd->...qk", q, k) / np.sqrt(d)
        Tn = toks.shape[-1]
        causal = jnp.tril(jnp.ones((Tn, Tn), bool))
        att = jnp.where(causal, att, -1e9)
        h = h + jax.nn.softmax(att, axis=-1) @ v
        return jnp.tanh(h) @ p["Wo"]

    def logprob_fn(p, batch):
        toks = batch["tokens"]
        return jnp.sum(ce_logprob(logits_fn(p, toks[:, :-1]), toks[:, 1:]), axis=-1)

    def loss_fn(p, batch):
        toks = batch["tokens"]
        return -jnp.mean(ce_logprob(logits_fn(p, toks[:, :-1]), toks[:, 1:]))

    return _zoo("attention", params, loss_fn, {"tokens": tokens}, logits_fn, safety_tokens, logprob_fn)


MODEL_ZOO = {
    "linear": linear_model,
    "mlp": mlp_model,
    "softmax_regression": softmax_regression_model,
    "attention": attention_model,
}


def tiny_models(seed=0, dtype=jnp.float64):
    """All zoo models, built from one seed."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(MODEL_ZOO))
    return [fn(k, dtype=dtype) for k, fn in zip(keys, MODEL_ZOO.values())]


# --------------------------------------------------------------------------- dense oracles


def dense_hessian(loss_fn, params, batch):
    """(H, ravel, unravel): the dense n×n Hessian of L on ravelled parameters."""
    flat, unravel = ravel_pytree(params)
    H = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
    return H, flat, unravel


def dense_third(loss_fn, params, batch):
    """The dense n×n×n third-derivative tensor D³L on ravelled parameters."""
    flat, unravel = ravel_pytree(params)
    return jax.jit(jax.jacfwd(jax.hessian(lambda f: loss_fn(unravel(f), batch))))(flat)


def dense_fisher(logits_fn, params, inputs):
    """The dense true Fisher F = mean over leading axes of Jᵀ(diag p − ppᵀ)J."""
    flat, unravel = ravel_pytree(params)
    z = logits_fn(params, inputs)
    C = z.shape[-1]
    J = jax.jit(jax.jacfwd(lambda f: logits_fn(unravel(f), inputs)))(flat).reshape(-1, C, flat.shape[0])
    p = jax.nn.softmax(z.reshape(-1, C), axis=-1)
    LamJ = p[:, :, None] * J - p[:, :, None] * jnp.einsum("bc,bcn->bn", p, J)[:, None, :]  # (diag p − ppᵀ) J
    n = flat.shape[0]
    return J.reshape(-1, n).T @ LamJ.reshape(-1, n) / J.shape[0]
