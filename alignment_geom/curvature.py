"""Exact curvature operators over pytrees (paper §2–4): H·v, D³L[u, v, ·], F·v, Δu, θ(t)'s Taylor series.

Notation (arXiv:2602.15799): θ* the aligned parameters, L the fine-tuning loss, g = ∇L(θ*),
H = ∇²L(θ*), z = logits_fn(θ, x) ∈ ℝ^C the policy logits, π = softmax(z), J = ∂z/∂θ,
Λ = diag(p) − ppᵀ the softmax Hessian, F = E[Jᵀ Λ J] the (true) Fisher of the policy.

All functions are pure, take and return pytrees shaped like ``params`` (no flattening needed),
are jit/vmap compatible and preserve the parameters' dtype (float64, float32, bfloat16).

Conventions
    ``loss_fn(params, batch) -> scalar``
    ``logits_fn(params, inputs) -> (..., C)``: every leading axis (examples, token positions)
        is averaged over in the Fisher and in Δu.
    ``logprob_fn(params, batch) -> (m,)``: per-example log π(yᵢ | xᵢ).
    ``mask``: optional boolean pytree with the structure of ``params`` (a leaf may be a Python/array
        bool or a boolean array broadcastable to the leaf). It restricts an operator to the parameter
        subset S: inputs are zeroed outside S and outputs are zeroed outside S, so the result is the
        dense sub-block (H_SS v_S, F_SS v_S, …) embedded in a full-size pytree.

Every operator's cost, in units of one gradient (forward + backward) on the same batch:
``hvp`` ≈ 2 (forward-over-reverse), ``linearized_hvp`` matvec ≈ 1.3–1.8 (the primal pass is paid
once), ``fisher_vp`` ≈ 1.7 (one linearisation + its transpose; J is never materialised),
``third_order`` ≈ 4, ``flow_taylor`` of order K: O(K²) Taylor-mode passes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import jet as _jet
from jax.flatten_util import ravel_pytree

from alignment_geom._tree import apply_mask, check_mask, mask_select, tree_map, tree_scale

PyTree = Any

__all__ = [
    "hvp",
    "linearized_hvp",
    "third_order",
    "fisher_vp",
    "linearized_fisher_vp",
    "empirical_fisher_vp",
    "per_example_grads",
    "kl_utility",
    "flow_taylor",
    "taylor_eval",
    "CurvatureOperators",
    "curvature_operators",
]


def _check_like(params, v, name="v"):
    p_def = jax.tree_util.tree_structure(params)
    v_def = jax.tree_util.tree_structure(v)
    if p_def != v_def:
        raise ValueError(f"{name} must have the same tree structure as params; got {v_def} vs {p_def}")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(v)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"{name} leaf shape {jnp.shape(b)} does not match params leaf shape {jnp.shape(a)}")


def _grad_fn(loss_fn, batch, mask):
    grad = jax.grad(loss_fn)

    def g(p):
        return apply_mask(mask, grad(p, batch))

    return g


# --------------------------------------------------------------------------- Hessian


def hvp(loss_fn: Callable, params: PyTree, v: PyTree, batch: Any, mask: Optional[PyTree] = None) -> PyTree:
    """H·v = ∇²L(θ)·v by forward-over-reverse differentiation (a jvp of the gradient).

    Args:
      loss_fn: ``(params, batch) -> scalar`` the loss L.
      params: θ, a pytree.
      v: a pytree shaped like params.
      batch: data passed to loss_fn.
      mask: optional boolean pytree; returns H_SS v_S (zeros outside S).
    Returns:
      a pytree shaped like params.
    """
    check_mask(mask, params)
    _check_like(params, v)
    v = apply_mask(mask, v)
    return jax.jvp(_grad_fn(loss_fn, batch, mask), (params,), (v,))[1]


def linearized_hvp(loss_fn: Callable, params: PyTree, batch: Any, mask: Optional[PyTree] = None) -> Callable:
    """A matvec ``v -> ∇²L(θ)·v`` that linearises ∇L once at θ and reuses it for every call.

    The primal forward and backward passes (and their residuals) are computed once, by
    ``jax.linearize``; each matvec then runs only the tangent passes. Use it inside eigensolvers that
    call H·v many times at the same θ. The returned function is pure and jit-compatible (call it
    inside the same jit as the linearisation, or jit it: its residuals are closed-over constants).
    """
    check_mask(mask, params)
    _, f_jvp = jax.linearize(_grad_fn(loss_fn, batch, mask), params)

    def matvec(v):
        return f_jvp(apply_mask(mask, v))

    return matvec


def third_order(loss_fn: Callable, params: PyTree, u: PyTree, v: PyTree, batch: Any,
                mask: Optional[PyTree] = None) -> PyTree:
    """D³L(θ)[u, v, ·] = d/ds ∇²L(θ + s u)·v |_{s=0}, the third derivative contracted twice (a jvp of the HVP).

    Symmetric in u and v. With u = v = g it gives the ∇³L[g, g] term of the path's jerk
    θ⃛(0) = −(H²g + ∇³L[g, g]).
    """
    check_mask(mask, params)
    _check_like(params, u, "u")
    _check_like(params, v, "v")
    u = apply_mask(mask, u)
    v = apply_mask(mask, v)
    g = _grad_fn(loss_fn, batch, mask)

    def hv(p):
        return jax.jvp(g, (p,), (v,))[1]

    return jax.jvp(hv, (params,), (u,))[1]


# --------------------------------------------------------------------------- Fisher


def _softmax_hessian_apply(z, w):
    """Λ w = (diag p − ppᵀ) w for p = softmax(z), row-wise over leading axes."""
    p = jax.nn.softmax(z, axis=-1)
    pw = p * w
    # The row sum Σ_c p_c w_c as a matmul with a ones vector rather than a reduce: XLA:CPU otherwise
    # fuses the whole J·v dot chain into one slow reduce kernel (benchmarks/curvature.py: MLP fisher_vp
    # 2.5× → 1.45× a gradient). Same arithmetic.
    s = pw @ jnp.ones((z.shape[-1], 1), z.dtype)
    return pw - p * s


def _num_positions(z) -> int:
    return int(math.prod(z.shape[:-1])) if z.ndim > 1 else 1


def linearized_fisher_vp(logits_fn: Callable, params: PyTree, inputs: Any,
                         mask: Optional[PyTree] = None) -> Callable:
    """A matvec ``v -> F·v`` for the true Fisher F = mean_x Jᵀ(diag p − ppᵀ)J of π = softmax(z(θ, x)).

    One ``jax.linearize`` of the logits gives z and the jvp v ↦ Jv; its transpose w ↦ Jᵀw comes from
    ``jax.linear_transpose`` and reuses the same residuals, so J is never materialised and the
    forward pass is not repeated per matvec. The mean runs over every leading axis of the logits.
    """
    check_mask(mask, params)

    def f(p):
        return logits_fn(p, inputs)

    z, f_jvp = jax.linearize(f, params)
    f_vjp = jax.linear_transpose(f_jvp, params)
    scale = 1.0 / _num_positions(z)

    def matvec(v):
        jv = f_jvp(apply_mask(mask, v))
        w = _softmax_hessian_apply(z, jv) * jnp.asarray(scale, z.dtype)
        return apply_mask(mask, f_vjp(w)[0])

    return matvec


def fisher_vp(logits_fn: Callable, params: PyTree, v: PyTree, inputs: Any,
              mask: Optional[PyTree] = None) -> PyTree:
    """F·v for the true Fisher of the softmax policy, F = mean over the logits' leading axes of Jᵀ Λ J.

    Equivalent to E_{x, y∼π_θ}[∇log π ∇log πᵀ]·v (Assumption 1: F = ∇²Δu at θ = θ_ref). Matrix-free:
    a jvp (Jv), the softmax Hessian Λ = diag p − ppᵀ applied row-wise, and the transposed jvp (Jᵀ·).

    Args:
      logits_fn: ``(params, inputs) -> (..., C)`` logits z.
      params: θ. v: pytree like params. inputs: the skill's inputs.
      mask: optional boolean pytree; returns F_SS v_S.
    """
    _check_like(params, v)
    return linearized_fisher_vp(logits_fn, params, inputs, mask)(v)


def empirical_fisher_vp(logprob_fn: Callable, params: PyTree, v: PyTree, batch: Any,
                        mask: Optional[PyTree] = None) -> PyTree:
    """The empirical Fisher F̂·v = (1/m) Σᵢ ∇log pᵢ (∇log pᵢ · v), pᵢ = π_θ(yᵢ | xᵢ) with the data's yᵢ.

    Computed as (1/m) Jᵀ(J v) with J the m×n Jacobian of the per-example log-probabilities
    (``logprob_fn(params, batch) -> (m,)``): one linearisation and its transpose, the same value as
    summing per-example gradients without materialising them.
    """
    check_mask(mask, params)
    _check_like(params, v)

    def f(p):
        return logprob_fn(p, batch)

    lp, f_jvp = jax.linearize(f, params)
    if lp.ndim != 1:
        raise ValueError(f"logprob_fn must return per-example log-probabilities of shape (m,); got {lp.shape}")
    f_vjp = jax.linear_transpose(f_jvp, params)
    jv = f_jvp(apply_mask(mask, v))
    return apply_mask(mask, f_vjp(jv / lp.shape[0])[0])


def per_example_grads(logprob_fn: Callable, params: PyTree, batch: Any, mask: Optional[PyTree] = None) -> PyTree:
    """Per-example gradients ∇_θ log π(yᵢ | xᵢ), stacked along a new leading axis of size m.

    Every leaf of ``batch`` must have the example axis first; each example is passed to
    ``logprob_fn`` as a batch of one. Memory: m × n.
    """
    check_mask(mask, params)

    def one(ex):
        ex1 = tree_map(lambda x: x[None], ex)
        return apply_mask(mask, jax.grad(lambda p: logprob_fn(p, ex1)[0])(params))

    return jax.vmap(one)(batch)


# --------------------------------------------------------------------------- alignment utility


def kl_utility(logits_fn: Callable, params_ref: PyTree, params: PyTree, inputs: Any,
               mask: Optional[PyTree] = None) -> jax.Array:
    """Δu(θ) = mean_x KL(π_ref(·|x) ‖ π_θ(·|x)), the alignment utility loss under Assumption 1.

    The mean runs over every leading axis of the logits. Δu(θ_ref) = 0, ∇Δu(θ_ref) = 0 and
    ∇²Δu(θ_ref) = F(θ_ref) (the ``fisher_vp`` Fisher). With ``mask``, parameters outside S are held
    at their reference values (Δu as a function of θ_S alone).
    """
    check_mask(mask, params)
    _check_like(params_ref, params, "params")
    params = mask_select(mask, params, params_ref)
    lp_ref = jax.nn.log_softmax(logits_fn(params_ref, inputs), axis=-1)
    lp = jax.nn.log_softmax(logits_fn(params, inputs), axis=-1)
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1)
    return jnp.mean(kl)


# --------------------------------------------------------------------------- Taylor series of the flow


def _nested_derivative(f: Callable, k: int) -> Callable:
    """t ↦ f⁽ᵏ⁾(t) for a function of a scalar t, by k nested forward-mode jvps (cost 2ᵏ)."""
    if k == 0:
        return f
    prev = _nested_derivative(f, k - 1)
    return lambda t: jax.jvp(prev, (t,), (jnp.ones_like(t),))[1]


def flow_taylor(loss_fn: Callable, params: PyTree, batch: Any, order: int,
                mask: Optional[PyTree] = None, method: str = "jet") -> list:
    """Taylor coefficients of the gradient-flow path θ(t) − θ* = Σ_{k=1}^{K} c_k t^k + O(t^{K+1}).

    θ̇ = −∇L(θ), θ(0) = θ*. Then c_1 = −g, c_2 = Hg/2, c_3 = −(H²g + D³L[g, g])/6, and in general
    (k+1) c_{k+1} = −[t^k] ∇L(θ(t)), where [t^k] is the k-th Taylor coefficient. Since
    [t^k]∇L(θ(t)) depends only on c_1..c_k, the coefficients follow one order at a time.

    Args:
      loss_fn, params (θ*), batch: the fine-tuning problem.
      order: K ≥ 1, the number of coefficients returned.
      mask: optional boolean pytree; the flow moves only θ_S (θ̇_S = −∇_S L, the rest frozen).
      method: "jet" (Taylor mode, jax.experimental.jet: O(K²) passes) or "jvp" (nested forward-mode
        jvps of t ↦ ∇L(θ* + Σ c_j t^j): 2^k passes for order k; a fallback for primitives jet lacks).
    Returns:
      [c_1, …, c_K], each a pytree shaped like params.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    if method not in ("jet", "jvp"):
        raise ValueError(f"method must be 'jet' or 'jvp'; got {method!r}")
    check_mask(mask, params)
    grad_fn = _grad_fn(loss_fn, batch, mask)
    flat0, unravel = ravel_pytree(params)

    def g_flat(x):
        return ravel_pytree(grad_fn(unravel(x)))[0]

    cs = [-g_flat(flat0)]
    for k in range(1, order):
        if method == "jet":
            # jet's series are derivative coefficients: θ^{(j)}(0) = j! c_j.
            series = [math.factorial(j) * cs[j - 1] for j in range(1, k + 1)]
            _, out = _jet.jet(g_flat, (flat0,), (series,))
            gk = out[k - 1] / math.factorial(k)
        else:
            coeffs = list(cs)

            def path_grad(t, coeffs=coeffs):
                x = flat0
                for j, c in enumerate(coeffs, start=1):
                    x = x + c * t ** j
                return g_flat(x)

            t0 = jnp.zeros((), flat0.dtype)
            gk = _nested_derivative(path_grad, k)(t0) / math.factorial(k)
        cs.append(-gk / (k + 1))
    return [unravel(c) for c in cs]


def taylor_eval(coeffs: list, t, params0: Optional[PyTree] = None) -> PyTree:
    """Σ_k c_k t^k (+ params0 if given): the order-K Taylor prediction of θ(t) for a scalar t."""
    out = None
    for k, c in enumerate(coeffs, start=1):
        term = tree_scale(t ** k, c)
        out = term if out is None else tree_map(jnp.add, out, term)
    if params0 is not None:
        out = tree_map(jnp.add, params0, out)
    return out


# --------------------------------------------------------------------------- bundle


class CurvatureOperators(NamedTuple):
    """The operators of one problem, bound to its functions and jitted (optax-style bundle).

    ``hvp(params, v, batch)``, ``third_order(params, u, v, batch)``, ``fisher_vp(params, v, inputs)``,
    ``empirical_fisher_vp(params, v, batch)``, ``kl_utility(params_ref, params, inputs)``,
    ``flow_taylor(params, batch)`` (of the bound order). Fields are None when the function they need
    (logits_fn, logprob_fn) was not given.
    """

    hvp: Callable
    third_order: Callable
    fisher_vp: Optional[Callable]
    empirical_fisher_vp: Optional[Callable]
    kl_utility: Optional[Callable]
    flow_taylor: Callable


def curvature_operators(loss_fn: Callable, logits_fn: Optional[Callable] = None,
                        logprob_fn: Optional[Callable] = None, mask: Optional[PyTree] = None,
                        taylor_order: int = 4) -> CurvatureOperators:
    """Bind the operators to one problem and jit each of them once."""
    return CurvatureOperators(
        hvp=jax.jit(lambda p, v, b: hvp(loss_fn, p, v, b, mask)),
        third_order=jax.jit(lambda p, u, v, b: third_order(loss_fn, p, u, v, b, mask)),
        fisher_vp=None if logits_fn is None else jax.jit(lambda p, v, x: fisher_vp(logits_fn, p, v, x, mask)),
        empirical_fisher_vp=None if logprob_fn is None else jax.jit(
            lambda p, v, b: empirical_fisher_vp(logprob_fn, p, v, b, mask)),
        kl_utility=None if logits_fn is None else jax.jit(
            lambda pr, p, x: kl_utility(logits_fn, pr, p, x, mask)),
        flow_taylor=jax.jit(lambda p, b: flow_taylor(loss_fn, p, b, taylor_order, mask)),
    )
