"""Taylor series along gradient flow (paper §4, Theorems 6.1–6.2, Corollary 6.3): θ(t) and Δu(θ(t)) exactly.

θ̇ = −∇L(θ), θ(0) = θ*. ``flow_taylor`` gives θ(t) − θ* = Σ_{k=1}^{K} c_k t^k + O(t^{K+1}) with c_1 = −g,
c_2 = Hg/2, c_3 = −(H²g + D³L[g, g])/6; ``utility_taylor`` gives Δu(θ(t)) = Σ_k a_k t^k with a_0 = a_1 = 0 and
a_2 = ½ gᵀFg. Notation: z = logits_fn(θ, x), J = ∂z/∂θ, Λ = diag p − ppᵀ, F = mean Jᵀ Λ J, P the projector onto
the top-d eigenvectors of F(θ*). When Jg = 0,
    a_4 = ⅛ mean ‖Λ^{1/2}(J·Hg + D²z[g, g])‖² = a4_JHg + a4_curv + a4_cross,
    a4_JHg = ⅛ ‖F^{1/2} Hg‖²  (= γ_F²/8 when Hg has no F-weight outside P),
    a4_curv = ⅛ mean ‖Λ^{1/2} D²z[g, g]‖²,  a4_cross = ¼ mean (J·Hg)ᵀ Λ D²z[g, g]   (may be < 0)
(``onset_split``): identities to check, not bounds.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet as _jet
from jax.flatten_util import ravel_pytree

from alignment_geom.curvature._taylor_mode import TaylorModeError, taylor_jaxpr, widen_precision
from alignment_geom.curvature.fisher import fisher_norm, lambda_quad
from alignment_geom.curvature.hessian import _grad_fn, hvp
from alignment_geom.curvature.utility import kl_utility
from alignment_geom.linalg.subspace import project
from alignment_geom.tree import apply_mask, check_mask, tree_dot, tree_float_dtype, tree_map, tree_scale

PyTree = Any

__all__ = ["flow_taylor", "taylor_eval", "utility_taylor", "utility_taylor_coeffs", "onset_split", "TaylorModeError"]

_METHODS = ("jet", "jvp", "experimental_jet")


def _check_method(method):
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")


def _nested_derivative(f: Callable, k: int) -> Callable:
    """t ↦ f⁽ᵏ⁾(t) for a function of a scalar t, by k nested forward-mode jvps (cost 2ᵏ)."""
    if k == 0:
        return f
    prev = _nested_derivative(f, k - 1)
    return lambda t: jax.jvp(prev, (t,), (jnp.ones_like(t),))[1]


def flow_taylor(loss_fn: Callable, params: PyTree, batch: Any, order: int,
                mask: Optional[PyTree] = None, method: str = "jet", *, widen: bool = True) -> list:
    """Taylor coefficients of the gradient-flow path θ(t) − θ* = Σ_{k=1}^{K} c_k t^k + O(t^{K+1}).

    θ̇ = −∇L(θ), θ(0) = θ*. Then c_1 = −g, c_2 = Hg/2, c_3 = −(H²g + D³L[g, g])/6, and in general
    (k+1) c_{k+1} = −[t^k] ∇L(θ(t)), where [t^k] is the k-th Taylor coefficient. Since
    [t^k]∇L(θ(t)) depends only on c_1..c_k, the coefficients follow one order at a time.

    Args:
      loss_fn, params (θ*), batch: the fine-tuning problem.
      order: K ≥ 1, the number of coefficients returned.
      mask: optional boolean pytree; the flow moves only θ_S (θ̇_S = −∇_S L, the rest frozen).
      method: "jet" (default; Taylor mode over the traced gradient, :mod:`._taylor_mode`: every primitive
        JAX can differentiate, incl. scan, while/fori, cond, remat, custom_jvp/custom_vjp; cost polynomial in
        K), "experimental_jet" (``jax.experimental.jet`` itself, for comparison: fewer primitives) or "jvp"
        (nested forward-mode jvps of t ↦ ∇L(θ* + Σ c_j t^j): 2^k passes for order k).
      widen: evaluate ``loss_fn`` without its float → narrower-float casts (:func:`widen_precision`), so a
        model that rounds inside (``jax.nn.dot_product_attention`` computes its softmax in float32 whatever
        the input dtype; bfloat16 casts) gives the coefficients of the same model at the parameters' precision.
        No effect on models without such casts.
    Raises:
      TaylorModeError: (method="jet") a primitive with neither a Taylor nor a JVP rule; the message names it.
    Returns:
      [c_1, …, c_K], each a pytree shaped like params.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    _check_method(method)
    check_mask(mask, params)
    grad_fn = _grad_fn(widen_precision(loss_fn) if widen else loss_fn, batch, mask)
    if method == "jet":
        return _flow_taylor_leaves(grad_fn, params, order)
    flat0, unravel = ravel_pytree(params)

    def g_flat(x):
        return ravel_pytree(grad_fn(unravel(x)))[0]

    cs = [-g_flat(flat0)]
    for k in range(1, order):
        if method == "experimental_jet":
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


def _flow_taylor_leaves(grad_fn: Callable, params: PyTree, order: int) -> list:
    """flow_taylor's Taylor-mode path, leaf by leaf: (k+1) c_{k+1} = −[t^k] ∇L(θ* + Σ_{j≤k} c_j t^j), each
    [t^k] one Taylor-mode pass over the gradient's jaxpr traced once on the leaves of θ* (no ravelled copy of θ
    or of the series: every leaf keeps its shape and dtype)."""
    leaves0, treedef = jax.tree_util.tree_flatten(params)

    def g_leaves(*xs):
        return jax.tree_util.tree_leaves(grad_fn(jax.tree_util.tree_unflatten(treedef, list(xs))))

    closed = jax.make_jaxpr(g_leaves)(*leaves0)
    cs = [[-x for x in g_leaves(*leaves0)]]
    for k in range(1, order):
        _, outs = taylor_jaxpr(closed, leaves0, [[c[i] for c in cs] for i in range(len(leaves0))], k)
        cs.append([(jnp.zeros_like(x) if o is None else -o[k - 1] / (k + 1)) for x, o in zip(leaves0, outs)])
    return [jax.tree_util.tree_unflatten(treedef, c) for c in cs]


def taylor_eval(coeffs: list, t, params0: Optional[PyTree] = None) -> PyTree:
    """Σ_k c_k t^k (+ params0 if given): the order-K Taylor prediction of θ(t) for a scalar t."""
    out = None
    for k, c in enumerate(coeffs, start=1):
        term = tree_scale(t ** k, c)
        out = term if out is None else tree_map(jnp.add, out, term)
    if params0 is not None:
        out = tree_map(jnp.add, params0, out)
    return out


# --------------------------------------------------------------------------- Δu along the flow


def utility_taylor_coeffs(ft_loss: Callable, params: PyTree, batch: Any, logits_fn: Callable, inputs: Any,
                          order: int, *, mask: Optional[PyTree] = None, method: str = "jet",
                          widen: bool = True) -> jax.Array:
    """[a_0, …, a_order] (jnp array) with Δu(θ(t)) = Σ_k a_k t^k + O(t^{order+1}) along gradient flow.

    θ(t) is replaced by its order-K Taylor polynomial θ* + Σ_{k≤K} c_k t^k (:func:`flow_taylor`,
    exact up to t^K), and Δu(θ(t)) = kl_utility(θ*, θ(t)) (the cancellation-free KL) is expanded in t by
    Taylor mode (method="jet": this library's interpreter, any differentiable model; "experimental_jet":
    ``jax.experimental.jet``; "jvp": K nested forward-mode derivatives of the scalar function, cost 2^K).
    jit/vmap friendly. Exact for order ≤ 12 (the KL's series form, :func:`~.utility.stable_kl`).
    ``widen``: as in :func:`flow_taylor`, for both ``ft_loss`` and ``logits_fn``.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    _check_method(method)
    cs = flow_taylor(ft_loss, params, batch, order, mask, method, widen=widen)
    dtype = tree_float_dtype(params)
    if widen:
        logits_fn = widen_precision(logits_fn)

    if method == "jet":
        leaves0, treedef = jax.tree_util.tree_flatten(params)

        def du_leaves(*xs):
            return kl_utility(logits_fn, params, jax.tree_util.tree_unflatten(treedef, list(xs)), inputs)

        closed = jax.make_jaxpr(du_leaves)(*leaves0)
        c_leaves = [jax.tree_util.tree_leaves(c) for c in cs]
        (a0,), (ser,) = taylor_jaxpr(closed, leaves0, [[c[i] for c in c_leaves] for i in range(len(leaves0))],
                                     order)
        ser = [jnp.zeros((), dtype)] * order if ser is None else ser
        return jnp.stack([jnp.asarray(a, dtype) for a in [a0] + list(ser)])

    def f(t):
        return kl_utility(logits_fn, params, taylor_eval(cs, t, params), inputs)

    t0 = jnp.zeros((), dtype)
    if method == "experimental_jet":
        series = [jnp.ones((), dtype)] + [jnp.zeros((), dtype)] * (order - 1)
        y0, ys = _jet.jet(f, (t0,), (series,))
        derivs = [y0] + list(ys)
    else:
        derivs = []
        fk = f
        for _ in range(order + 1):
            derivs.append(fk(t0))
            fk = (lambda g: (lambda t: jax.jvp(g, (t,), (jnp.ones_like(t),))[1]))(fk)
    return jnp.stack([jnp.asarray(dk, dtype) / math.factorial(k) for k, dk in enumerate(derivs)])


def utility_taylor(ft_loss: Callable, params: PyTree, batch: Any, logits_fn: Callable, inputs: Any,
                   order: int, *, mask: Optional[PyTree] = None, method: str = "jet", widen: bool = True) -> list:
    """The exact Taylor coefficients [a_0, …, a_order] (Python floats) of Δu(θ(t)) along gradient flow
    θ̇ = −∇L(θ), θ(0) = θ* (see :func:`utility_taylor_coeffs`). With Jg = 0, a_2 = a_3 = 0 and
    a_4 = ⅛ mean‖Λ^{1/2}(J·Hg + D²z[g, g])‖² (:func:`onset_split`)."""
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    return [float(a) for a in np.asarray(_utility_taylor_jit(ft_loss, logits_fn, order, method, bool(widen), params,
                                                             batch, inputs, mask))]


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _utility_taylor_jit(ft_loss, logits_fn, order, method, widen, params, batch, inputs, mask):
    return utility_taylor_coeffs(ft_loss, params, batch, logits_fn, inputs, order, mask=mask, method=method,
                                 widen=widen)


def onset_split(ft_loss: Callable, params: PyTree, batch: Any, logits_fn: Callable, inputs: Any, *,
                basis: Optional[PyTree] = None, mask: Optional[PyTree] = None, order: int = 5,
                method: str = "jet", widen: bool = True) -> dict:
    """How the exact quartic coefficient a_4 splits between the loss curvature and the policy curvature.

    Returns floats:
      coeffs [a_0..a_order] (utility_taylor), a2, a3, a4, a5 (if order ≥ 5);
      a4_JHg = ⅛ ‖F^{1/2} Hg‖² = ⅛ mean (J·Hg)ᵀΛ(J·Hg)  (the paper's γ_F²/8-type part);
      a4_curv = ⅛ mean D²z[g,g]ᵀ Λ D²z[g,g]  (the model's own curvature);
      a4_cross = ¼ mean (J·Hg)ᵀ Λ D²z[g,g]  (negative when the two cancel);
      a4_rest = a4 − (a4_JHg + a4_curv + a4_cross)  (0 when Jg = 0; the ε-terms otherwise);
      Jg_F = ‖F^{1/2} g‖ (= sqrt(2 a_2));
      with ``basis`` (top-d Fisher eigenvectors at θ*): gamma_E = ‖P Hg‖, gamma_F = ‖F^{1/2}P Hg‖,
      eps_E = ‖P g‖, eps_F = ‖F^{1/2} P g‖, bound_F = γ_F²/8.
    Everything is at θ* (F = F(θ*), Λ at z(θ*)); g and Hg are masked when ``mask`` is given. ``method`` and
    ``widen`` as in :func:`flow_taylor`.
    """
    if order < 4:
        raise ValueError(f"order must be >= 4; got {order}")

    res = _onset_split_jit(ft_loss, logits_fn, int(order), method, bool(widen), params, batch, inputs, basis, mask)
    coeffs = [float(a) for a in np.asarray(res.pop("coeffs"))]
    out = {k: float(v) for k, v in res.items()}
    out["coeffs"] = coeffs
    out["a2"], out["a3"], out["a4"] = coeffs[2], coeffs[3], coeffs[4]
    if order >= 5:
        out["a5"] = coeffs[5]
    out["a4_rest"] = out["a4"] - (out["a4_JHg"] + out["a4_curv"] + out["a4_cross"])
    if basis is not None:
        out["bound_F"] = out["gamma_F"] ** 2 / 8
    return out


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _onset_split_jit(ft_loss, logits_fn, order, method, widen, params, batch, inputs, basis, mask):
    coeffs = utility_taylor_coeffs(ft_loss, params, batch, logits_fn, inputs, order, mask=mask, method=method,
                                   widen=widen)
    if widen:
        ft_loss, logits_fn = widen_precision(ft_loss), widen_precision(logits_fn)
    g = apply_mask(mask, jax.grad(ft_loss)(params, batch))
    Hg = hvp(ft_loss, params, g, batch, mask)
    zf = lambda p: logits_fn(p, inputs)  # noqa: E731
    z, Jg = jax.jvp(zf, (params,), (g,))
    _, JHg = jax.jvp(zf, (params,), (Hg,))
    _, D2z = jax.jvp(lambda p: jax.jvp(zf, (p,), (g,))[1], (params,), (g,))
    out = {"coeffs": coeffs,
           "a4_JHg": lambda_quad(z, JHg, JHg) / 8,
           "a4_curv": lambda_quad(z, D2z, D2z) / 8,
           "a4_cross": lambda_quad(z, JHg, D2z) / 4,
           "Jg_F": jnp.sqrt(jnp.maximum(lambda_quad(z, Jg, Jg), 0.0))}
    if basis is not None:
        PHg = project(basis, Hg)
        Pg = project(basis, g)
        out["gamma_E"] = jnp.sqrt(tree_dot(PHg, PHg))
        out["gamma_F"] = fisher_norm(logits_fn, params, PHg, inputs)
        out["eps_E"] = jnp.sqrt(tree_dot(Pg, Pg))
        out["eps_F"] = fisher_norm(logits_fn, params, Pg, inputs)
    return out
