"""Fisher products of the safety policy (paper §2–3, §7): F v, F̂ v, per-example gradients, ‖F^{1/2} v‖, the factor of F.

Notation (arXiv:2602.15799): z = logits_fn(θ, x) ∈ ℝ^C the policy logits, π = softmax(z), J = ∂z/∂θ,
Λ = diag(p) − ppᵀ the softmax Hessian, F = mean_x Jᵀ Λ J the true Fisher (= ∇²Δu at θ* under Assumption 1),
F̂ = (1/m) Σᵢ ∇log πᵢ ∇log πᵢᵀ the empirical Fisher of m observed completions. The mean in F runs over every
leading axis of the logits (examples and token positions). ``mask`` restricts to a parameter block S (F_SS).

Cost: a ``linearized_fisher_vp`` matvec ≈ 1.5–1.7 gradients (one linearisation, then a jvp and its transpose
per matvec; J is never materialised).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from alignment_geom.linalg.operator import Factor, LinearOperator
from alignment_geom.problem import Problem
from alignment_geom.tree import apply_mask, check_like, check_mask, tree_map

PyTree = Any

__all__ = ["fisher_vp", "linearized_fisher_vp", "linearized_fisher_operator", "empirical_fisher_vp",
           "linearized_empirical_fisher_vp",
           "per_example_grads", "empirical_fisher_trace", "fisher_norm", "lambda_quad", "softmax_hessian_apply",
           "fisher_factor", "top_fisher_subspace", "fisher", "empirical_fisher"]


def softmax_hessian_apply(z, w):
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


def _softmax_sqrt_apply(z, w):
    """S w with SᵀS = Λ = diag p − ppᵀ: S = diag(√p)(I − 1pᵀ), S w = √p ⊙ (w − pᵀw), row-wise."""
    p = jax.nn.softmax(z, axis=-1)
    return jnp.sqrt(p) * (w - (p * w) @ jnp.ones((z.shape[-1], 1), z.dtype))


def _softmax_sqrt_transpose(z, u):
    """Sᵀ u = √p ⊙ u − p (√p · u), the transpose of :func:`_softmax_sqrt_apply`, row-wise."""
    p = jax.nn.softmax(z, axis=-1)
    sq = jnp.sqrt(p)
    return sq * u - p * ((sq * u) @ jnp.ones((z.shape[-1], 1), z.dtype))


def _linearized_fisher(logits_fn, params, inputs, mask):
    """One linearisation of the logits → (matvec v ↦ F v, Factor B with F = BᵀB, B v = S J v/√M)."""
    check_mask(mask, params)

    def f(p):
        return logits_fn(p, inputs)

    z, f_jvp = jax.linearize(f, params)
    f_vjp = jax.linear_transpose(f_jvp, params)
    scale = 1.0 / _num_positions(z)

    def matvec(v):
        jv = f_jvp(apply_mask(mask, v))
        w = softmax_hessian_apply(z, jv) * jnp.asarray(scale, z.dtype)
        return apply_mask(mask, f_vjp(w)[0])

    root = jnp.asarray(math.sqrt(scale), z.dtype)

    def apply(v):
        return _softmax_sqrt_apply(z, f_jvp(apply_mask(mask, v))) * root

    def transpose(u):
        return apply_mask(mask, f_vjp(_softmax_sqrt_transpose(z, u) * root)[0])

    return matvec, Factor(apply, transpose, jax.ShapeDtypeStruct(z.shape, z.dtype))


def linearized_fisher_vp(logits_fn: Callable, params: PyTree, inputs: Any,
                         mask: Optional[PyTree] = None) -> Callable:
    """A matvec ``v -> F·v`` for the true Fisher F = mean_x Jᵀ(diag p − ppᵀ)J of π = softmax(z(θ, x)).

    One ``jax.linearize`` of the logits gives z and the jvp v ↦ Jv; its transpose w ↦ Jᵀw comes from
    ``jax.linear_transpose`` and reuses the same residuals, so J is never materialised and the
    forward pass is not repeated per matvec. The mean runs over every leading axis of the logits.
    """
    return _linearized_fisher(logits_fn, params, inputs, mask)[0]


def linearized_fisher_operator(logits_fn: Callable, params: PyTree, inputs: Any,
                               mask: Optional[PyTree] = None) -> LinearOperator:
    """F as a PSD LinearOperator (the matvec of :func:`linearized_fisher_vp`) carrying its factor B, F = BᵀB:
    B v = Λ^{1/2} J v / √M ∈ ℝ^{M×C} for the M logit positions, Λ^{1/2} = diag(√p)(I − 1pᵀ) row-wise (one jvp),
    Bᵀu one transposed jvp. ``linalg.top_eigenpairs`` runs Lanczos on the Gram side B Bᵀ when M·C < n."""
    mv, factor = _linearized_fisher(logits_fn, params, inputs, mask)
    return LinearOperator(mv, params, symmetric=True, psd=True, mask=mask, name="fisher", factor=factor)


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
    check_like(params, v)
    return linearized_fisher_vp(logits_fn, params, inputs, mask)(v)


def _linearized_empirical_fisher(logprob_fn, params, batch, mask):
    """One linearisation of the log-probabilities → (matvec v ↦ F̂ v, Factor B = J/√m with F̂ = BᵀB)."""
    check_mask(mask, params)

    def f(p):
        return logprob_fn(p, batch)

    lp, f_jvp = jax.linearize(f, params)
    if lp.ndim != 1:
        raise ValueError(f"logprob_fn must return per-example log-probabilities of shape (m,); got {lp.shape}")
    f_vjp = jax.linear_transpose(f_jvp, params)
    m = lp.shape[0]
    root = jnp.asarray(1.0 / math.sqrt(m), lp.dtype)

    def matvec(v):
        return apply_mask(mask, f_vjp(f_jvp(apply_mask(mask, v)) / m)[0])

    def apply(v):
        return f_jvp(apply_mask(mask, v)) * root

    def transpose(u):
        return apply_mask(mask, f_vjp(u * root)[0])

    return matvec, Factor(apply, transpose, jax.ShapeDtypeStruct(lp.shape, lp.dtype))


def linearized_empirical_fisher_vp(logprob_fn: Callable, params: PyTree, batch: Any,
                                   mask: Optional[PyTree] = None) -> Callable:
    """A matvec ``v -> F̂·v`` for the empirical Fisher F̂ = (1/m) Σᵢ ∇log pᵢ ∇log pᵢᵀ, pᵢ = π_θ(yᵢ | xᵢ).

    Computed as (1/m) Jᵀ(J v) with J the m×n Jacobian of the per-example log-probabilities
    (``logprob_fn(params, batch) -> (m,)``): one ``jax.linearize`` and its transpose, reused by every
    matvec; the per-example gradients are never materialised.
    """
    return _linearized_empirical_fisher(logprob_fn, params, batch, mask)[0]


def empirical_fisher_vp(logprob_fn: Callable, params: PyTree, v: PyTree, batch: Any,
                        mask: Optional[PyTree] = None) -> PyTree:
    """The empirical Fisher F̂·v = (1/m) Σᵢ ∇log pᵢ (∇log pᵢ · v), pᵢ = π_θ(yᵢ | xᵢ) with the data's yᵢ
    (:func:`linearized_empirical_fisher_vp` applied once)."""
    check_like(params, v)
    return linearized_empirical_fisher_vp(logprob_fn, params, batch, mask)(v)


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


def empirical_fisher_trace(logprob_fn: Callable, params: PyTree, batch: Any, *, mask: Optional[PyTree] = None,
                           max_chunk_elements: int = 2 ** 26) -> jax.Array:
    """tr F̂ = (1/m) Σᵢ ‖∇_θ log π(yᵢ|xᵢ)‖² of the empirical Fisher F̂ = (1/m) Σᵢ ∇log πᵢ ∇log πᵢᵀ (exact).

    ``batch`` has the example axis first on every leaf (m examples; each is passed to ``logprob_fn``
    as a batch of one, as in :func:`per_example_grads`). The per-example gradients are formed in
    chunks of c = max(1, ⌊max_chunk_elements / n⌋) examples (lax.map), so memory is c × n, not m × n.
    ``mask`` restricts θ to a parameter block (the trace of F̂_SS). Returns a scalar.
    """
    check_mask(mask, params)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no leaves")
    m = int(leaves[0].shape[0])
    n = max(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)), 1)
    chunk = max(1, min(m, int(max_chunk_elements) // n))

    def sq_norm(ex):
        ex1 = tree_map(lambda x: x[None], ex)
        g = apply_mask(mask, jax.grad(lambda p: logprob_fn(p, ex1)[0])(params))
        return sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(g))

    return jnp.mean(jax.lax.map(sq_norm, batch, batch_size=chunk))


def lambda_quad(z, x, y):
    """mean over positions of xᵀ Λ y, Λ = diag p − ppᵀ, p = softmax(z) (x, y: logit-space tangents like z)."""
    p = jax.nn.softmax(z, axis=-1)
    val = jnp.sum(p * x * y, axis=-1) - jnp.sum(p * x, axis=-1) * jnp.sum(p * y, axis=-1)
    return jnp.mean(val)


def fisher_norm(logits_fn: Callable, params: PyTree, v: PyTree, inputs: Any) -> jax.Array:
    """‖F^{1/2} v‖ = (vᵀ F v)^{1/2} = sqrt(mean (Jv)ᵀ Λ (Jv)) at θ = params: one jvp of the logits."""
    z, jv = jax.jvp(lambda p: logits_fn(p, inputs), (params,), (v,))
    return jnp.sqrt(jnp.maximum(lambda_quad(z, jv, jv), 0.0))


def fisher_factor(logits_fn: Callable, params: PyTree, inputs: Any, mask: Optional[PyTree] = None) -> jax.Array:
    """A (M·C, n) with F = AᵀA: rows Λ_x^{1/2} J_x / √M, Λ^{1/2} = (I − √p√pᵀ) diag √p (M logit positions).

    Built from the M·C rows of J by reverse mode; memory M·C·n (small M·C only, e.g. the landscapes).
    """
    flat, unravel = ravel_pytree(params)

    def zf(f):
        return logits_fn(unravel(f), inputs)

    z = zf(flat)
    C = z.shape[-1]
    zz = z.reshape(-1, C)
    M = zz.shape[0]
    J = jax.jacrev(lambda f: zf(f).reshape(-1, C))(flat)  # (M, C, n)
    if mask is not None:
        mflat = ravel_pytree(tree_map(lambda mm, x: jnp.broadcast_to(jnp.asarray(mm, x.dtype), x.shape),
                                      mask, params))[0]
        J = J * mflat
    sq = jnp.sqrt(jax.nn.softmax(zz, axis=-1))
    S = sq[:, :, None] * J
    A = S - sq[:, :, None] * jnp.einsum("mc,mcn->mn", sq, S)[:, None, :]
    return (A / jnp.sqrt(jnp.asarray(M, A.dtype))).reshape(M * C, -1)


def top_fisher_subspace(logits_fn: Callable, params: PyTree, inputs: Any, d: int,
                        mask: Optional[PyTree] = None):
    """Top-d eigenvectors and eigenvalues of the true Fisher F(θ) = mean Jᵀ Λ J, exactly, from its factor.

    Thin QR + SVD of the factor A (F = AᵀA, :func:`fisher_factor`): cost M·C reverse passes + O((M·C)² n),
    memory M·C·n — cheap when M·C is small (the landscapes: M·C = 2(d + n_tail)) whatever n is; use
    Lanczos (``aic.TrueFisher()``) otherwise. Requires M·C ≥ d. Returns (basis, eigvals): basis a pytree
    like params with leading axis d (orthonormal rows), eigvals (d,) in decreasing order.
    """
    A = fisher_factor(logits_fn, params, inputs, mask)
    if A.shape[0] < d:
        raise ValueError(f"the Fisher has rank <= {A.shape[0]} < d = {d}")
    # Aᵀ = Q R (thin QR, n × k) => AᵀA = Q (R Rᵀ) Qᵀ; R = U s Vᵀ => eigenvectors Q U, eigenvalues s².
    q, r = jnp.linalg.qr(A.T)
    u, s, _ = jnp.linalg.svd(r)
    _, unravel = ravel_pytree(params)
    return jax.vmap(unravel)((q @ u[:, :d]).T), s[:d] ** 2


def fisher(problem: Problem) -> LinearOperator:
    """The true Fisher F(θ*) of ``problem``'s safety policy as a PSD LinearOperator (:func:`linearized_fisher_vp`,
    linearised once, with its factor B: F = BᵀB), restricted to ``problem.mask``. Needs ``logits_fn`` and ``inputs``."""
    problem.require("logits_fn")
    return linearized_fisher_operator(problem.logits_fn, problem.params, problem.inputs, problem.mask)


def empirical_fisher(problem: Problem) -> LinearOperator:
    """The empirical Fisher F̂(θ*) of ``problem``'s safe completions as a PSD LinearOperator
    (:func:`linearized_empirical_fisher_vp`), restricted to ``problem.mask``. Needs ``logprob_fn`` and
    ``safety_batch``."""
    problem.require("logprob_fn", "safety_batch")
    mv, factor = _linearized_empirical_fisher(problem.logprob_fn, problem.params, problem.safety_batch, problem.mask)
    return LinearOperator(mv, problem.params, symmetric=True, psd=True, mask=problem.mask, name="empirical_fisher",
                          factor=factor)
